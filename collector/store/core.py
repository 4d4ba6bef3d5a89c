"""The DuckDB store: series identity apart from samples.

Layout (docs/storage.md has the user-facing description):

    series(id INTEGER, metric VARCHAR, labels MAP(VARCHAR, VARCHAR), fingerprint UBIGINT)
        one row per distinct label set; `labels` excludes __name__ (that is `metric`).
    samples(series_id INTEGER, ts BIGINT, value DOUBLE)
        ts in milliseconds since the epoch; value NULL is a Prometheus staleness marker
        (DuckDB does not keep NaN payload bits, so the special stale NaN cannot be stored as-is).
        A view over two tables: samples_hot(series_id, ts, value), where ingest appends in
        arrival order, and samples_cold, where maintenance.compact moves closed hours sorted by
        (series_id, ts). Read `samples` (or `samples_by_hour`, which adds the hour a time range
        prunes on); only the writer and maintenance touch the two tables.
    samples_cold(series_id INTEGER, hour INTEGER, ts_shifted BIGINT, shift BIGINT, value DOUBLE,
                 ts = ts_shifted - shift, a virtual column)
        Why not a plain ts: sorted by (series_id, ts), ts jumps back at every series boundary.
        DuckDB bit-packs a column in groups of 2,048 values with one bit width per group, so a
        group holding one such jump stores every timestamp in it at ~26 bits (2.1 B/sample over
        12-hour runs, more than the value). Shifting each series' run so that it continues where
        the previous run ended (ts_shifted = ts + shift, shift constant per run, see
        COLD_INSERT) makes ts_shifted one evenly spaced sequence across series boundaries, which
        bit-packs at ~0 bits per value; `shift` is one RLE run per series. `hour` (floor(ts / 1 h),
        RLE too) gives zone maps that a time range can prune row groups on, which ts_shifted
        cannot.

Small integer ids, millisecond integers and doubles compress well in DuckDB's columnar
segments (bit-packing, delta, ALP); compaction (see writer) keeps samples clustered by series.

All writes go through one connection guarded by a lock; readers use their own cursors so a
query never holds the writer up for long (DuckDB MVCC).
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import duckdb
import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id          INTEGER PRIMARY KEY,
    metric      VARCHAR NOT NULL,
    labels      MAP(VARCHAR, VARCHAR) NOT NULL,
    fingerprint UBIGINT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS samples_hot (
    series_id INTEGER NOT NULL,
    ts        BIGINT  NOT NULL,
    value     DOUBLE
);
CREATE TABLE IF NOT EXISTS samples_cold (
    series_id  INTEGER NOT NULL,
    hour       INTEGER NOT NULL,
    ts_shifted BIGINT  NOT NULL,
    shift      BIGINT  NOT NULL,
    value      DOUBLE,
    ts         BIGINT GENERATED ALWAYS AS (ts_shifted - shift) VIRTUAL
);
CREATE OR REPLACE VIEW samples_by_hour AS
    SELECT series_id, hour, ts, value FROM samples_cold
    UNION ALL
    SELECT series_id, floor(ts / 3600000)::INTEGER AS hour, ts, value FROM samples_hot;
CREATE OR REPLACE VIEW samples AS
    SELECT series_id, ts, value FROM samples_by_hour;
-- Keys of acknowledged ingest batches, written in the same transaction as their samples, so a
-- retried batch (the client never saw our 200) is recognised and not stored twice.
CREATE TABLE IF NOT EXISTS ingest_batches (
    key         BLOB PRIMARY KEY,
    received_ms BIGINT NOT NULL,
    samples     INTEGER NOT NULL
);
-- Downsampled history (collector.store.rollup): one row per series per bucket; bucket is the
-- bucket's start in ms. avg is sum/count, computed in the rollup_* views.
CREATE TABLE IF NOT EXISTS rollup_5m_data (
    series_id INTEGER NOT NULL, bucket BIGINT NOT NULL,
    min DOUBLE, max DOUBLE, sum DOUBLE, count INTEGER NOT NULL, last DOUBLE
);
CREATE TABLE IF NOT EXISTS rollup_1h_data (
    series_id INTEGER NOT NULL, bucket BIGINT NOT NULL,
    min DOUBLE, max DOUBLE, sum DOUBLE, count INTEGER NOT NULL, last DOUBLE
);
-- Watermarks of the maintenance jobs (rollups, compaction, export), in ms.
CREATE TABLE IF NOT EXISTS maintenance_state (
    job VARCHAR PRIMARY KEY, done_until BIGINT NOT NULL
);
"""

NAME = "__name__"
HOUR_MS = 3_600_000
_INT32 = 2 ** 31 - 1


def hour_of(ts_ms: int) -> int:
    """The `hour` column's value for a time: floor(ts / 1 h) as Python's // computes it (SQL's
    // on integers rounds toward zero instead, so the tables use floor(ts / 3600000)), clamped
    to the INTEGER range so that any time is a valid bound."""
    return min(max(int(ts_ms) // HOUR_MS, -_INT32), _INT32)


def cold_insert_sql(source: str) -> str:
    """INSERT of `source` (a query with columns series_id, ts, value; one row per (series_id, ts))
    into samples_cold, sorted by (series_id, ts), each series' run shifted to continue the
    previous one: shift_r = shift_(r-1) + last_(r-1) + step_r - first_r, so the first ts_shifted
    of a run lies one step (the run's mean spacing) after the last ts_shifted of the one before."""
    return f"""
        INSERT INTO samples_cold (series_id, hour, ts_shifted, shift, value)
        WITH src AS ({source}),
        runs AS (
            SELECT series_id, min(ts) AS first, max(ts) AS last, count(*) AS n FROM src GROUP BY series_id),
        gaps AS (
            SELECT series_id,
                   coalesce(lag(last) OVER (ORDER BY series_id)
                            + CASE WHEN n > 1 THEN (last - first) // (n - 1) ELSE 0 END - first, 0) AS gap
            FROM runs),
        shifts AS (
            SELECT series_id, sum(gap) OVER (ORDER BY series_id ROWS UNBOUNDED PRECEDING)::BIGINT AS shift
            FROM gaps)
        SELECT s.series_id, floor(s.ts / {HOUR_MS})::INTEGER, s.ts + h.shift, h.shift, s.value
        FROM src s JOIN shifts h USING (series_id)
        ORDER BY s.series_id, s.ts"""


def fingerprint(metric: str, labels: Mapping[str, str]) -> int:
    """Stable 64-bit identity of a label set (independent of label order)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(metric.encode())
    for k in sorted(labels):
        h.update(b"\xff" + k.encode() + b"\xfe" + labels[k].encode())
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True)
class Matcher:
    """A label matcher as PromQL writes it: name op value, op one of = != =~ !~."""

    name: str
    op: str
    value: str

    def sql(self, params: list) -> str:
        """A SQL predicate over the `series` table (Prometheus semantics: a missing label is '')."""
        col = "metric" if self.name == NAME else "coalesce(labels[?], '')"
        if self.name != NAME:
            params.append(self.name)
        params.append(self.value)
        if self.op == "=":
            return f"{col} = ?"
        if self.op == "!=":
            return f"{col} <> ?"
        # Prometheus regexes are RE2 and fully anchored; DuckDB uses RE2 too.
        if self.op == "=~":
            return f"regexp_full_match({col}, ?)"
        if self.op == "!~":
            return f"NOT regexp_full_match({col}, ?)"
        raise ValueError(f"unknown matcher op {self.op!r}")

    def matches(self, value: str) -> bool:
        if self.op == "=":
            return value == self.value
        if self.op == "!=":
            return value != self.value
        hit = re.fullmatch(self.value, value, re.DOTALL) is not None
        return hit if self.op == "=~" else not hit


@dataclass
class SeriesSamples:
    """Samples of many series, as flat numpy arrays sorted by (series, ts)."""

    series_ids: np.ndarray   # int32, one per sample
    ts: np.ndarray           # int64 ms
    values: np.ndarray       # float64; NaN where the stored value was NULL (stale) -> see `stale`
    stale: np.ndarray        # bool


class Store:
    """Embedded DuckDB store. One instance per process; thread-safe."""

    def __init__(self, path: str = ":memory:", *, read_only: bool = False, threads: int | None = None,
                 sandbox: bool = False):
        """sandbox=True turns off DuckDB's file and network access for the whole database (the
        collector does this so user SQL cannot read files; its own Parquet export goes through
        pyarrow, not DuckDB's COPY)."""
        config = {"threads": threads} if threads else {}
        self.path = path
        self.con = duckdb.connect(path, read_only=read_only, config=config)
        self.write_lock = threading.RLock()
        # Guards _next_id only. Never take write_lock while holding it (the writer takes this
        # lock inside write_lock), so the two cannot deadlock.
        self._alloc_lock = threading.Lock()
        if not read_only:
            self._migrate()
            self.con.execute(SCHEMA)
            from collector.store.views import create_views
            create_views(self.con)
        if sandbox:
            self.con.execute("SET enable_external_access = false")
        self._ids: dict[int, int] = {}   # fingerprint -> series id
        self._metric_series: dict[str, int] = {}   # metric -> number of series (cardinality limits)
        self._next_id = 1
        self._load_series_cache()

    def _migrate(self) -> None:
        """Files from before the hot/cold split had a `samples` table: it becomes samples_hot.
        Files from before the shifted layout had samples_cold(series_id, ts, value): rewritten."""
        kind = self.con.execute("SELECT table_type FROM information_schema.tables "
                                "WHERE table_name = 'samples'").fetchall()
        if kind and kind[0][0] == "BASE TABLE":
            self.con.execute("ALTER TABLE samples RENAME TO samples_hot")
        cold = {c for (c,) in self.con.execute("SELECT column_name FROM information_schema.columns "
                                               "WHERE table_name = 'samples_cold'").fetchall()}
        if cold and "ts_shifted" not in cold:
            self.con.execute("BEGIN TRANSACTION")
            self.con.execute("ALTER TABLE samples_cold RENAME TO samples_cold_v1")
            self.con.execute(SCHEMA)
            self.con.execute(cold_insert_sql("SELECT series_id, ts, value FROM samples_cold_v1"))
            self.con.execute("DROP TABLE samples_cold_v1")
            self.con.execute("COMMIT")

    # ------------------------------------------------------------------ series identity
    def _load_series_cache(self) -> None:
        rows = self.con.execute("SELECT fingerprint, id FROM series").fetchall()
        self._ids = {int(fp): int(i) for fp, i in rows}
        self._next_id = max(self._ids.values(), default=0) + 1
        self._metric_series = {m: int(n) for m, n in
                               self.con.execute("SELECT metric, count(*) FROM series GROUP BY metric").fetchall()}

    def allocate_id(self) -> int:
        """A fresh series id (the row is inserted by the caller)."""
        with self._alloc_lock:
            sid = self._next_id
            self._next_id += 1
            return sid

    def metric_series_count(self, metric: str) -> int:
        return self._metric_series.get(metric, 0)

    def series_count(self) -> int:
        return len(self._ids)

    def series_id(self, metric: str, labels: Mapping[str, str], *, create: bool = True) -> int | None:
        """Id of a label set, creating it (committed at once) when new."""
        fp = fingerprint(metric, labels)
        sid = self._ids.get(fp)
        if sid is not None or not create:
            return sid
        with self.write_lock:
            sid = self._ids.get(fp)
            if sid is None:
                sid = self.allocate_id()
                keys = sorted(labels)
                self.con.execute("INSERT INTO series VALUES (?, ?, MAP(?, ?), ?)",
                                 [sid, metric, keys, [labels[k] for k in keys], fp])
                self._ids[fp] = sid
                self._metric_series[metric] = self._metric_series.get(metric, 0) + 1
        return sid

    # ------------------------------------------------------------------ writes
    def append(self, series_ids: Sequence[int] | np.ndarray, ts: Sequence[int] | np.ndarray,
               values: Sequence[float | None] | np.ndarray) -> None:
        """Append samples in one transaction (values: None or NaN-with-stale flag -> NULL)."""
        import pyarrow as pa

        vals = pa.array(values, type=pa.float64(), from_pandas=False)
        table = pa.table({"series_id": pa.array(series_ids, type=pa.int32()),
                          "ts": pa.array(ts, type=pa.int64()), "value": vals})
        with self.write_lock:
            self.con.from_arrow(table).insert_into("samples_hot")   # as the writer appends

    def append_series(self, rows: Iterable[tuple[str, Mapping[str, str], int, float | None]]) -> int:
        """Convenience for tests and loaders: (metric, labels, ts_ms, value) rows."""
        sids, tss, vals = [], [], []
        for metric, labels, ts, value in rows:
            sids.append(self.series_id(metric, labels))
            tss.append(ts)
            vals.append(value)
        if sids:
            self.append(sids, tss, vals)
        return len(sids)

    # ------------------------------------------------------------------ reads
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A reader cursor of its own (use one per thread/query)."""
        return self.con.cursor()

    def select_series(self, matchers: Sequence[Matcher], cur=None) -> list[tuple[int, str, dict[str, str]]]:
        """(id, metric, labels) of every series that all matchers select."""
        params: list = []
        where = " AND ".join(m.sql(params) for m in matchers) or "TRUE"
        cur = cur or self.cursor()
        rows = cur.execute(f"SELECT id, metric, labels FROM series WHERE {where} ORDER BY id",
                           params).fetchall()
        return [(int(i), metric, dict(labels)) for i, metric, labels in rows]

    def fetch(self, series_ids: Sequence[int], start_ms: int, end_ms: int, cur=None) -> SeriesSamples:
        """Samples with start_ms <= ts <= end_ms of the given series, sorted by (series, ts)."""
        cur = cur or self.cursor()
        if len(series_ids) == 0:
            empty = np.empty(0)
            return SeriesSamples(empty.astype(np.int32), empty.astype(np.int64), empty, empty.astype(bool))
        res = cur.execute(
            "SELECT series_id, ts, value FROM samples_by_hour "
            "WHERE series_id IN (SELECT unnest(?::INTEGER[])) AND hour BETWEEN ? AND ? AND ts BETWEEN ? AND ? "
            "ORDER BY series_id, ts",
            [list(map(int, series_ids)), hour_of(start_ms), hour_of(end_ms),
             int(start_ms), int(end_ms)],
        ).fetchnumpy()
        values = res["value"]
        if np.ma.isMaskedArray(values):
            stale = np.ma.getmaskarray(values)
            values = values.filled(np.nan)
        else:
            stale = np.zeros(len(values), dtype=bool)
        return SeriesSamples(np.asarray(res["series_id"], dtype=np.int32),
                             np.asarray(res["ts"], dtype=np.int64),
                             np.asarray(values, dtype=np.float64), stale)

    def close(self) -> None:
        self.con.close()
