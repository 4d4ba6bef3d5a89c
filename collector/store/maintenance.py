"""Scheduled storage upkeep: rollups, compaction, Parquet export, retention (one apscheduler job).

Every pass, in this order (each step is its own short transaction, so ingest waits at most for
one step of one chunk):

1. rollups. rollup_5m_data from raw samples, rollup_1h_data from rollup_5m_data: min, max, sum,
   count and last per series per bucket (stale markers and NaN are left out). Buckets from the
   watermark on are recomputed, so a bucket still open at the last pass is completed. The
   watermark follows the newest data (so a backfill is rolled up as it goes) but stays at least
   `LATE_MS` behind real time; samples older than the watermark when they arrive (a spool
   replaying hours later) stay in raw storage but are not added to rollups.
2. compaction. Raw samples of closed hours (older than storage.compact_after_s) move from
   samples_hot (arrival order) to samples_cold sorted by (series_id, ts), duplicates of
   (series_id, ts) collapsed to the last one written (within what moves together). Samples
   arriving late for an hour compacted before move with the next hour.
   Sorted, a row group holds long runs of one series with evenly spaced timestamps and similar
   values, which DuckDB's RLE, bit-packing (delta) and ALP compress to a few bits per column.
   Then the daily merge (merge_days): a UTC day whose hours are all compacted is rewritten as
   one sort, so each series is one day-long run (and its rollup rows one run per series).
3. export (when storage.export_dir is set). Closed UTC days are written as Hive-partitioned
   Parquet: <export_dir>/day=YYYY-MM-DD/metric=<name>/part-0.parquet with columns
   ts TIMESTAMP(ms, UTC), labels MAP<string,string>, value DOUBLE (sorted by series, then ts).
   Files are written through pyarrow (the store's DuckDB has file access switched off).
4. retention. Raw samples older than storage.retention_raw are deleted - never before they are
   rolled up (and exported, when export is on); rollup_5m rows older than
   storage.retention_rollup_5m (90 d) and rollup_1h rows older than storage.retention_rollup (400 d);
   batch keys older than a day are forgotten.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from pathlib import Path

from collector.store.core import cold_insert_sql

log = logging.getLogger(__name__)

STEPS = {"5m": 300_000, "1h": 3_600_000}
HOUR = 3_600_000
DAY = 86_400_000
LATE_MS = 300_000


def _get(con, job: str) -> int | None:
    rows = con.execute("SELECT done_until FROM maintenance_state WHERE job = ?", [job]).fetchall()
    return int(rows[0][0]) if rows else None


def _set(con, job: str, value: int) -> None:
    con.execute("INSERT OR REPLACE INTO maintenance_state VALUES (?, ?)", [job, int(value)])


def _min_ts(con, table: str, column: str) -> int | None:
    value = con.execute(f"SELECT min({column}) FROM {table}").fetchall()[0][0]
    return None if value is None else int(value)


def _max_ts(con, table: str, column: str) -> int | None:
    value = con.execute(f"SELECT max({column}) FROM {table}").fetchall()[0][0]
    return None if value is None else int(value)


def rollup(store, now_ms: int, dirty: set[int] | frozenset[int] = frozenset()) -> dict:
    """Recompute the rollup buckets that may have changed: every bucket from the watermark on
    (recent data), plus the `dirty` 5-minute buckets the writer saw samples for that are older
    than the watermark (a backfill, or a spool replaying after an outage)."""
    done = {}
    con = store.con
    step5, step1 = STEPS["5m"], STEPS["1h"]
    with store.write_lock:
        start5 = _get(con, "rollup_5m")
        if start5 is None:
            first = _min_ts(con, "samples", "ts")
            if first is None:
                return done
            start5 = first // step5 * step5
        old5 = sorted(b for b in dirty if b < start5)
        start1 = min(_get(con, "rollup_1h") or start5, start5 // step1 * step1)
        old1 = sorted({b // step1 * step1 for b in old5 if b < start1})
        con.execute("BEGIN TRANSACTION")
        try:
            # samples_by_hour: the hour predicate lets the scan skip compacted row groups
            # (a ts predicate cannot, see collector.store.core)
            n5 = _recompute(con, "rollup_5m_data", "samples_by_hour", "ts", step5, start5, old5,
                            "min(value), max(value), sum(value), count(value), arg_max(value, ts)",
                            " AND value IS NOT NULL AND NOT isnan(value)"
                            f" AND hour >= {min([start5] + old5) // HOUR}")
            n1 = _recompute(con, "rollup_1h_data", "rollup_5m_data", "bucket", step1, start1, old1,
                            "min(min), max(max), sum(sum), sum(count)::INTEGER, arg_max(last, bucket)", "")
            # The watermark follows the wall clock (not the newest sample, which live data or
            # the collector's own metrics would move ahead of a running backfill).
            _set(con, "rollup_5m", max(start5, (now_ms - LATE_MS) // step5 * step5))
            _set(con, "rollup_1h", max(start1, (now_ms - LATE_MS) // step1 * step1))
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
    done["rollup_5m_rows"], done["rollup_1h_rows"] = n5, n1
    return done


def _recompute(con, table: str, source: str, ts_col: str, step: int, start: int, old: list[int],
               aggregates: str, value_filter: str) -> int:
    """Rebuild `table` buckets >= start and the listed older buckets from `source`."""
    where = f"({ts_col} >= ?" + (f" OR {ts_col} // {step} * {step} IN (SELECT unnest(?::BIGINT[]))" if old else "")
    where += ")" + value_filter
    params = [start] + ([old] if old else [])
    con.execute(f"DELETE FROM {table} WHERE bucket >= ?" + (" OR bucket IN (SELECT unnest(?::BIGINT[]))" if old else ""),
                params)
    return int(con.execute(
        f"INSERT INTO {table} SELECT series_id, {ts_col} // {step} * {step} AS b, {aggregates} "
        f"FROM {source} WHERE {where} GROUP BY series_id, b ORDER BY series_id, b", params).fetchall()[0][0])


def compact(store, now_ms: int, compact_after_ms: int) -> int:
    """Rewrite closed hours of raw samples sorted by (series_id, ts); returns hours rewritten."""
    con = store.con
    closed = (now_ms - compact_after_ms) // HOUR * HOUR
    with store.write_lock:
        start = _get(con, "compact")
        if start is None:
            first = _min_ts(con, "samples_hot", "ts")
            if first is None:
                return 0
            start = first // HOUR * HOUR
    hours = 0
    cur = store.cursor()   # reads outside the write lock need their own cursor: the writer's
    #                        connection refuses a second concurrent call
    while start + HOUR <= closed:
        # Jump over hours with nothing to move (old or sparse data must not cost a transaction
        # per empty hour).
        first = _min_ts(cur, "samples_hot", "ts")
        if first is None or first >= closed:
            break
        start = max(start, first // HOUR * HOUR)
        end = start + HOUR
        with store.write_lock:
            con.execute("BEGIN TRANSACTION")
            try:
                # samples_cold is append-only and sorted; what moves out of samples_hot leaves
                # whole row groups empty (hot rows arrive in time order), which a checkpoint frees.
                # "ts < end", not "ts >= start AND ...": late samples of hours compacted before
                # move along with this hour, so samples_hot only ever holds open hours.
                con.execute(cold_insert_sql(
                    "SELECT series_id, ts, arg_max(value, rowid) AS value "
                    "FROM samples_hot WHERE ts < $end GROUP BY series_id, ts"), {"end": end})
                con.execute("DELETE FROM samples_hot WHERE ts < ?", [end])
                _set(con, "compact", end)
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
        start = end
        hours += 1
    if hours:
        checkpoint(store)
    return hours


def merge_days(store) -> int:
    """Rewrite every UTC day whose hours are all compacted as one sort by (series_id, ts), and
    its rollup rows by (series_id, bucket); returns the days rewritten.

    Hourly compaction leaves a series in runs of one hour (360 samples at 10 s). DuckDB packs a
    column in groups of 2048 values, so most groups straddle series boundaries where `ts` jumps
    back an hour and the whole group is bit-packed at ~22 bits per timestamp. A day-long run
    (8,640 samples) fills whole groups with evenly spaced timestamps (near zero bits). Rollup
    rows are appended a bucket at a time across all series; sorted per series their values are
    similar and compress far better. Done in transactions of ~MERGE_ROWS samples (a range of
    series ids each), so ingest waits for one chunk at most and memory stays bounded; a day
    interrupted half-way is merged again from the start (the rewrite is idempotent).
    Duplicates of (series_id, ts) that reached samples_cold in different compactions (late
    samples) are collapsed to the last one written, as compaction does.
    """
    cur = store.cursor()
    compacted = _get(cur, "compact")
    if compacted is None:
        return 0
    day = _get(cur, "merge")
    days = 0
    while True:
        first = cur.execute("SELECT min(hour) FROM samples_cold WHERE hour >= ?",
                            [-(1 << 31) if day is None else day // HOUR]).fetchall()[0][0]
        if first is None:
            break
        day = int(first) * HOUR // DAY * DAY   # jump over days without cold data
        if day + DAY > compacted:
            break
        _merge_day(store, cur, day)
        days += 1
        day += DAY
    if days:
        checkpoint(store)
    return days


MERGE_ROWS = 4_000_000   # samples per merge transaction (~100 MB of DuckDB memory at most)
_NO_ID = 1 << 40          # beyond any INTEGER series id


def _merge_day(store, cur, day: int) -> None:
    n, lo, hi = cur.execute("SELECT count(*), min(series_id), max(series_id) FROM samples_cold "
                            "WHERE hour >= ? AND hour < ?", [day // HOUR, (day + DAY) // HOUR]).fetchall()[0]
    parts = max(1, -(-int(n) // MERGE_ROWS))
    width = (int(hi) - int(lo)) // parts + 1
    edges = [-_NO_ID] + [int(lo) + k * width for k in range(1, parts)] + [_NO_ID]
    con = store.con
    for first_id, end_id in zip(edges, edges[1:]):
        with store.write_lock:
            con.execute("BEGIN TRANSACTION")
            try:
                _rewrite_cold(con, [day // HOUR, (day + DAY) // HOUR, first_id, end_id])
                for table in ("rollup_5m_data", "rollup_1h_data"):
                    _rewrite_sorted(con, table, [day, day + DAY, first_id, end_id])
                if end_id == _NO_ID:
                    _set(con, "merge", day + DAY)
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise


# Both rewrites go through a temporary table: the new rows must not be deleted with the old
# ones (the temporary table goes away with a rollback too).

def _rewrite_cold(con, params: list) -> None:
    """Rewrite the samples_cold rows of an hour x series-id range as one sorted, shifted run
    per series, collapsing duplicate (series_id, ts) rows to the last one written."""
    where = "hour >= ? AND hour < ? AND series_id >= ? AND series_id < ?"
    con.execute("CREATE OR REPLACE TEMP TABLE _merge AS SELECT series_id, ts, arg_max(value, rowid) AS value "
                f"FROM samples_cold WHERE {where} GROUP BY series_id, ts", params)
    con.execute(f"DELETE FROM samples_cold WHERE {where}", params)
    con.execute(cold_insert_sql("SELECT series_id, ts, value FROM _merge"))
    con.execute("DROP TABLE _merge")


def _rewrite_sorted(con, table: str, params: list) -> None:
    """Delete the rows of a bucket x series-id range of a rollup table and append them again
    sorted by (series_id, bucket)."""
    where = "bucket >= ? AND bucket < ? AND series_id >= ? AND series_id < ?"
    con.execute(f"CREATE OR REPLACE TEMP TABLE _merge AS SELECT * FROM {table} WHERE {where}", params)
    con.execute(f"DELETE FROM {table} WHERE {where}", params)
    con.execute(f"INSERT INTO {table} SELECT * FROM _merge ORDER BY series_id, bucket")
    con.execute("DROP TABLE _merge")


def checkpoint(store) -> bool:
    """Fold the WAL into the database file now, so the rewritten row groups are compressed and
    the deleted ones freed. Best effort: DuckDB refuses while another transaction is open, and
    then checkpoints by itself later (when the WAL passes checkpoint_threshold)."""
    import duckdb

    with store.write_lock:
        try:
            store.con.execute("CHECKPOINT")
            return True
        except duckdb.TransactionException:
            return False


def export_days(store, export_dir: str | os.PathLike, now_ms: int, grace_ms: int = HOUR) -> list[str]:
    """Write closed UTC days as Hive-partitioned Parquet; returns the days written."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    con = store.con
    cur = store.cursor()
    start = _get(cur, "export")
    if start is None:
        first = _min_ts(cur, "samples", "ts")
        if first is None:
            return []
        start = first // DAY * DAY
    written = []
    root = Path(export_dir)
    while start + DAY + grace_ms <= now_ms:
        first = cur.execute("SELECT min(ts) FROM samples_by_hour WHERE hour >= ? AND ts >= ?",
                            [start // HOUR, start]).fetchall()[0][0]
        if first is None:
            break
        start = max(start, first // DAY * DAY)   # skip days without data
        if start + DAY + grace_ms > now_ms:
            break
        day = dt.datetime.fromtimestamp(start / 1000, dt.timezone.utc).strftime("%Y-%m-%d")
        table = cur.sql(
            "SELECT se.metric AS metric, s.ts AS ts, se.labels AS labels, s.value AS value "
            "FROM samples_by_hour s JOIN series se ON se.id = s.series_id "
            "WHERE s.hour >= $3 AND s.hour < $4 AND s.ts >= $1 AND s.ts < $2 "
            "ORDER BY se.metric, s.series_id, s.ts",
            params=[start, start + DAY, start // HOUR, (start + DAY) // HOUR]).to_arrow_table()
        if table.num_rows:
            ts = pc.cast(table["ts"], pa.timestamp("ms", tz="UTC"))
            data = pa.table({"ts": ts, "labels": table["labels"], "value": table["value"]})
            metrics = table["metric"].to_pylist()
            i = 0
            while i < len(metrics):
                j = i
                name = metrics[i]
                while j < len(metrics) and metrics[j] == name:
                    j += 1
                target = root / f"day={day}" / f"metric={name}"
                target.mkdir(parents=True, exist_ok=True)
                tmp = target / ".part-0.parquet.tmp"
                pq.write_table(data.slice(i, j - i), tmp, compression="zstd")
                os.replace(tmp, target / "part-0.parquet")   # readers never see half a file
                i = j
        with store.write_lock:
            _set(con, "export", start + DAY)
        written.append(day)
        start += DAY
    return written


def retention(store, now_ms: int, raw_ms: int, rollup_ms: int, exporting: bool,
              rollup_5m_ms: int | None = None) -> dict:
    con = store.con
    with store.write_lock:
        limit = now_ms - raw_ms
        for job in ("rollup_5m",) + (("export",) if exporting else ()):
            mark = _get(con, job)
            limit = min(limit, mark if mark is not None else -(1 << 62))
        raw = con.execute("DELETE FROM samples_cold WHERE hour <= ? AND ts < ?",
                          [limit // HOUR, limit]).fetchall()[0][0]
        raw += con.execute("DELETE FROM samples_hot WHERE ts < ?", [limit]).fetchall()[0][0]
        old5 = now_ms - (rollup_ms if rollup_5m_ms is None else rollup_5m_ms)
        r5 = con.execute("DELETE FROM rollup_5m_data WHERE bucket < ?", [old5]).fetchall()[0][0]
        r1 = con.execute("DELETE FROM rollup_1h_data WHERE bucket < ?", [now_ms - rollup_ms]).fetchall()[0][0]
    return {"raw_deleted": int(raw), "rollup_deleted": int(r5) + int(r1)}


def run_once(ctx, now_ms: int | None = None) -> dict:
    """One maintenance pass; returns what it did (for logs and tests)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    storage = ctx.config.storage
    dirty = ctx.writer.take_dirty()
    try:
        done = rollup(ctx.store, now_ms, dirty)
    except Exception:
        ctx.writer.mark_dirty(dirty)   # retried by the next pass
        raise
    done["compacted_hours"] = compact(ctx.store, now_ms, int(storage.compact_after_s * 1000))
    done["merged_days"] = merge_days(ctx.store)
    if storage.export_dir:
        done["exported_days"] = export_days(ctx.store, storage.export_dir, now_ms)
    done.update(retention(ctx.store, now_ms, int(storage.retention_raw * 1000),
                          int(storage.retention_rollup * 1000), bool(storage.export_dir),
                          rollup_5m_ms=int(storage.retention_rollup_5m * 1000)))
    done["batch_keys_forgotten"] = ctx.writer.forget_batch_keys(now_ms)
    return done


def schedule(ctx) -> None:
    def job() -> None:
        try:
            log.info("maintenance: %s", run_once(ctx))
        except Exception:  # noqa: BLE001 - a failed pass is logged and retried next interval
            log.exception("maintenance pass failed")

    ctx.scheduler.add_job(job, "interval", seconds=ctx.config.storage.maintenance_interval_s,
                          id="storage-maintenance", max_instances=1, coalesce=True)
