"""The single ingest path: every sample that enters the store goes through Writer.write.

OTLP, remote write, test/conformance loaders and the health module's own outputs all call it,
so validation, cardinality limits, de-duplication and durability are implemented once.

Durability and retries. One call is one DuckDB transaction: the new series, the samples and the
batch key are committed together (DuckDB writes its WAL and syncs it at COMMIT), and the caller
acknowledges only after write() returns. If the process is killed before COMMIT nothing of the
batch is visible after restart; after COMMIT all of it is. A client that never saw our answer
sends the same batch again: its key (a hash of the decoded request, chosen by the receiver) is
found in `ingest_batches` and the batch is answered as a duplicate instead of stored twice.
Keys are kept for `batch_key_ttl_s` (one day by default; agents give up retrying long before).

Cardinality. A new series is refused (outcome "limited") when its metric already has
`max_series_per_metric` series or the store has `max_series_total`; known series are never
refused. The check is a dictionary lookup, so a flood of new series cannot slow the rest.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import pyarrow as pa

from collector.store.core import Store, fingerprint

log = logging.getLogger(__name__)

METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MAX_ERRORS = 5            # distinct reasons kept per result (the message stays readable)
MAX_LABEL_VALUE = 4096    # bytes; longer values are almost always a bug upstream


@dataclass
class WriteResult:
    accepted: int = 0      # committed
    duplicate: int = 0     # the whole batch was committed before (same batch key)
    limited: int = 0       # refused by a cardinality limit
    rejected: int = 0      # invalid (bad name, label, timestamp or value)
    errors: list[str] = field(default_factory=list)

    @property
    def refused(self) -> int:
        return self.limited + self.rejected

    def reason(self, text: str) -> None:
        if len(self.errors) < MAX_ERRORS and text not in self.errors:
            self.errors.append(text)

    @property
    def message(self) -> str:
        return "; ".join(self.errors)


_MAP_TYPE = pa.map_(pa.string(), pa.string())


class Writer:
    def __init__(self, store: Store, *, max_series_per_metric: int | None = None,
                 max_series_total: int | None = None, batch_key_ttl_s: float = 86400.0):
        self.store = store
        self.max_series_per_metric = max_series_per_metric
        self.max_series_total = max_series_total
        self.batch_key_ttl_s = batch_key_ttl_s
        # (metric, sorted label items) -> series id; saves re-hashing known label sets.
        self._keys: dict[tuple, int] = {}
        # Ids handed out for series not committed yet (fingerprint -> (id, metric, labels)),
        # shared by concurrent writers so the same new series gets one id.
        self._pending: dict[int, tuple[int, str, tuple]] = {}
        self._pending_ids: set[int] = set()
        self._id_lock = threading.Lock()

    # ------------------------------------------------------------------ helpers
    def seen(self, batch_key: bytes, cur=None) -> bool:
        cur = cur or self.store.cursor()
        return cur.execute("SELECT 1 FROM ingest_batches WHERE key = ?", [batch_key]).fetchall() != []

    def _new_series(self, metric: str, items: tuple, res: WriteResult, pending_per_metric: dict) -> int | None:
        """Id for a label set the store does not know yet, or None when invalid/over a limit."""
        if not METRIC_NAME.match(metric):
            res.reason(f"invalid metric name {metric[:80]!r}")
            return -1
        for k, v in items:
            if not isinstance(k, str) or not LABEL_NAME.match(k) or k.startswith("__"):
                res.reason(f"{metric}: invalid label name {str(k)[:80]!r}")
                return -1
            if not isinstance(v, str) or len(v) > MAX_LABEL_VALUE:
                res.reason(f"{metric}: label {k} value must be a string of at most {MAX_LABEL_VALUE} bytes")
                return -1
        labels = dict(items)
        fp = fingerprint(metric, labels)
        store = self.store
        sid = store._ids.get(fp)
        if sid is not None:
            return sid
        with self._id_lock:
            sid = store._ids.get(fp)
            if sid is not None:
                return sid
            pend = self._pending.get(fp)
            if pend is not None:
                return pend[0]
            per_metric = store.metric_series_count(metric) + pending_per_metric.get(metric, 0)
            if self.max_series_per_metric is not None and per_metric >= self.max_series_per_metric:
                res.reason(f"{metric}: series limit per metric ({self.max_series_per_metric}) reached")
                return None
            if self.max_series_total is not None and \
                    store.series_count() + len(self._pending) >= self.max_series_total:
                res.reason(f"total series limit ({self.max_series_total}) reached")
                return None
            with store.write_lock:   # store.series_id() may allocate from another thread
                sid = store._next_id
                store._next_id += 1
            self._pending[fp] = (sid, metric, items)
            self._pending_ids.add(sid)
            pending_per_metric[metric] = pending_per_metric.get(metric, 0) + 1
            return sid

    # ------------------------------------------------------------------ the ingest path
    def write(self, rows: Iterable[tuple[str, Mapping[str, str], int, float | None]],
              batch_key: bytes | None = None) -> WriteResult:
        """Validate, resolve series, and commit samples (and the batch key) in one transaction.

        rows: (metric, labels, ts_ms, value); value None is a staleness marker.
        """
        res = WriteResult()
        if batch_key is not None and self.seen(batch_key):
            res.duplicate = sum(1 for _ in rows)
            return res
        keys = self._keys
        sids: list[int] = []
        tss: list[int] = []
        vals: list[float | None] = []
        used_new: set[int] = set()
        pending_per_metric: dict[str, int] = {}
        for row in rows:
            try:
                metric, labels, ts, value = row
                items = tuple(sorted(labels.items()))
            except (TypeError, ValueError, AttributeError):
                res.rejected += 1
                res.reason("row must be (metric, labels dict, ts_ms, value)")
                continue
            if type(ts) is not int:
                if isinstance(ts, float) and math.isfinite(ts) and ts.is_integer():
                    ts = int(ts)
                else:
                    res.rejected += 1
                    res.reason(f"{str(metric)[:80]}: timestamp must be an integer (ms), got {ts!r}"[:200])
                    continue
            if not -(1 << 62) < ts < (1 << 62):
                res.rejected += 1
                res.reason(f"{str(metric)[:80]}: timestamp {ts} out of range")
                continue
            if value is not None and type(value) is not float:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    res.rejected += 1
                    res.reason(f"{str(metric)[:80]}: value must be a number, got {type(value).__name__}")
                    continue
            key = (metric, items)
            sid = keys.get(key)
            if sid is None:
                if not isinstance(metric, str):
                    res.rejected += 1
                    res.reason("metric name must be a string")
                    continue
                sid = self._new_series(metric, items, res, pending_per_metric)
                if sid is None:
                    res.limited += 1
                    continue
                if sid < 0:
                    res.rejected += 1
                    continue
                if sid in self._pending_ids:
                    used_new.add(sid)
                else:
                    keys[key] = sid
            sids.append(sid)
            tss.append(ts)
            vals.append(value)
        if not sids:
            return res
        self._commit(sids, tss, vals, used_new, batch_key, res)
        return res

    def _commit(self, sids, tss, vals, used_new: set[int], batch_key: bytes | None, res: WriteResult) -> None:
        store = self.store
        samples = pa.table({"series_id": pa.array(sids, type=pa.int32()),
                            "ts": pa.array(tss, type=pa.int64()),
                            "value": pa.array(vals, type=pa.float64())})
        with store.write_lock:
            con = store.con
            # Series another writer committed meanwhile are not inserted again.
            with self._id_lock:
                new = [(fp, p) for fp, p in self._pending.items()
                       if p[0] in used_new and fp not in store._ids]
            try:
                con.execute("BEGIN TRANSACTION")
                if new:
                    series = pa.table({
                        "id": pa.array([p[0] for _, p in new], type=pa.int32()),
                        "metric": pa.array([p[1] for _, p in new], type=pa.string()),
                        "labels": pa.array([list(p[2]) for _, p in new], type=_MAP_TYPE),
                        "fingerprint": pa.array([fp for fp, _ in new], type=pa.uint64()),
                    })
                    con.register("_new_series", series)
                    con.execute("INSERT INTO series SELECT id, metric, labels, fingerprint FROM _new_series")
                con.register("_incoming", samples)
                con.execute("INSERT INTO samples SELECT series_id, ts, value FROM _incoming")
                if batch_key is not None:
                    con.execute("INSERT INTO ingest_batches VALUES (?, ?, ?)",
                                [batch_key, int(time.time() * 1000), len(sids)])
                con.execute("COMMIT")
            except Exception as exc:
                con.execute("ROLLBACK")
                if batch_key is not None and "ingest_batches" in str(exc) and self.seen(batch_key):
                    res.duplicate = len(sids)   # an identical batch committed concurrently
                    return
                raise
            finally:
                for name in ("_new_series", "_incoming"):
                    try:
                        con.unregister(name)
                    except Exception:  # noqa: BLE001 - not registered on this path
                        pass
            with self._id_lock:
                for fp, (sid, metric, items) in new:
                    store._ids[fp] = sid
                    store._metric_series[metric] = store._metric_series.get(metric, 0) + 1
                    self._pending.pop(fp, None)
                    self._pending_ids.discard(sid)
                    self._keys[(metric, items)] = sid
        res.accepted += len(sids)

    def forget_batch_keys(self, now_ms: int | None = None) -> int:
        """Drop batch keys older than the TTL (called by the maintenance job)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now_ms - int(self.batch_key_ttl_s * 1000)
        with self.store.write_lock:
            n = self.store.con.execute("DELETE FROM ingest_batches WHERE received_ms < ?", [cutoff]).fetchall()
        return int(n[0][0]) if n else 0
