"""Storage upkeep on an embedded DuckDB file: rollups, compaction, retention, Parquet export."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from collector.config import Config
from collector.store import maintenance
from collector.store.core import Matcher, Store
from collector.store.writer import Writer

H = 3_600_000
T0 = 1_700_000_000_000 // (24 * H) * (24 * H)   # a UTC midnight


class Ctx:
    def __init__(self, path, **storage):
        self.config = Config(db=str(path))
        for k, v in storage.items():
            setattr(self.config.storage, k, v)
        self.store = Store(str(path), sandbox=True)
        self.writer = Writer(self.store)


def fill(writer, start, end, step=10_000, series=3):
    rows = []
    for t in range(start, end, step):
        for s in range(series):
            rows.append(("hw_power_watts", {"chip": str(s), "rack": "r1"}, t, float((t - start) // step + s)))
    assert writer.write(rows).accepted == len(rows)
    return rows


def test_rollups_5m_and_1h(tmp_path):
    ctx = Ctx(tmp_path / "r.duckdb")
    fill(ctx.writer, T0, T0 + 2 * H)
    ctx.writer.write([("hw_power_watts", {"chip": "0", "rack": "r1"}, T0 + 1000, None)])   # stale: ignored
    maintenance.rollup(ctx.store, T0 + 3 * H, ctx.writer.take_dirty())
    cur = ctx.store.cursor()
    r5 = cur.execute("SELECT min, max, avg, sum, count, last FROM rollup_5m "
                     "WHERE labels['chip'] = '1' AND ts = make_timestamp(?::BIGINT * 1000)", [T0 + 300_000]).fetchone()
    # chip 1 in [5m, 10m): values 30+1 .. 59+1
    assert r5 == (31.0, 60.0, 45.5, sum(range(31, 61)), 30, 60.0)
    r1 = cur.execute("SELECT min, max, avg, count, last FROM rollup_1h WHERE labels['chip'] = '0' ORDER BY ts").fetchall()
    assert r1 == [(0.0, 359.0, 179.5, 360, 359.0), (360.0, 719.0, 539.5, 360, 719.0)]
    # samples arriving later for buckets behind the watermark (a backfill, a replayed spool,
    # while live data keeps arriving) are rolled up by the next pass, without double counting
    fill(ctx.writer, T0 + 2 * H, T0 + 2 * H + 600_000)
    fill(ctx.writer, T0 + 5 * H, T0 + 5 * H + 60_000)
    maintenance.rollup(ctx.store, T0 + 5 * H + 60_000, ctx.writer.take_dirty())
    assert cur.execute("SELECT count(*), sum(count) FROM rollup_1h_data").fetchone() == (12, 3 * 720 + 3 * 60 + 3 * 6)
    assert cur.execute("SELECT count(*) FROM rollup_5m_data WHERE bucket = ?", [T0 + 2 * H + 300_000]).fetchone() == (3,)


def test_compaction_keeps_every_sample_sorts_and_dedups(tmp_path):
    ctx = Ctx(tmp_path / "c.duckdb")
    rows = fill(ctx.writer, T0, T0 + 3 * H, series=20)
    dup = rows[:50]
    ctx.writer.write([(m, lab, t, v + 1000) for m, lab, t, v in dup])   # rewritten: last write wins
    before = ctx.store.cursor().execute("SELECT count(*) FROM samples").fetchone()[0]
    assert before == len(rows) + 50
    hours = maintenance.compact(ctx.store, T0 + 4 * H, compact_after_ms=H)
    assert hours == 3
    cur = ctx.store.cursor()
    assert cur.execute("SELECT count(*) FROM samples").fetchone()[0] == len(rows)
    ids = [sid for sid, _, _ in ctx.store.select_series([Matcher("__name__", "=", "hw_power_watts")])]
    got = ctx.store.fetch(ids, T0, T0 + 3 * H)
    assert len(got.ts) == len(rows)
    first = {(lab["chip"], t): v for _, lab, t, v in dup}
    stored = dict(cur.execute("SELECT (se.labels['chip'], s.ts), s.value FROM samples s JOIN series se "
                              "ON se.id = s.series_id WHERE s.ts < ?", [T0 + 30_000]).fetchall())
    for (chip, t), v in first.items():
        assert stored[(chip, t)] == v + 1000
    # rows are physically sorted by (series_id, ts) within each compacted hour
    order = cur.execute("SELECT series_id, ts FROM samples_cold WHERE ts >= ? AND ts < ? ORDER BY rowid",
                        [T0 + H, T0 + 2 * H]).fetchnumpy()
    key = order["series_id"].astype(np.int64) * (1 << 42) + (order["ts"] - T0)
    assert np.all(np.diff(key) > 0)
    assert maintenance.compact(ctx.store, T0 + 4 * H, compact_after_ms=H) == 0   # idempotent
    assert cur.execute("SELECT count(*) FROM samples_hot").fetchall()[0][0] == 0
    # a late sample for an hour compacted before moves out of samples_hot with the next hour
    ctx.writer.write([("hw_power_watts", {"chip": "0", "rack": "r1"}, T0 + 5, 42.0)])
    fill(ctx.writer, T0 + 3 * H, T0 + 4 * H, series=20)
    assert maintenance.compact(ctx.store, T0 + 5 * H, compact_after_ms=H) == 1
    assert cur.execute("SELECT count(*) FROM samples_hot").fetchall()[0][0] == 0
    assert cur.execute("SELECT value FROM samples WHERE ts = ?", [T0 + 5]).fetchall() == [(42.0,)]


def test_compressed_layout(tmp_path):
    ctx = Ctx(tmp_path / "z.duckdb")
    fill(ctx.writer, T0, T0 + 6 * H, series=50)
    maintenance.compact(ctx.store, T0 + 7 * H, compact_after_ms=H)
    info = ctx.store.cursor().execute(
        "SELECT DISTINCT column_name, compression FROM pragma_storage_info('samples_cold') WHERE segment_type <> 'VALIDITY'"
    ).fetchall()
    kinds = {c: set() for c, _ in info}
    for c, comp in info:
        kinds[c].add(comp)
    assert "Uncompressed" not in kinds["series_id"] | kinds["ts_shifted"] | kinds["shift"], kinds
    # Each compacted hour is one evenly spaced ts_shifted sequence across series boundaries (what
    # bit-packs to ~0 bits); only the 5 boundaries between the 6 hourly batches jump.
    cur = ctx.store.cursor()
    shifted = cur.execute("SELECT ts_shifted FROM samples_cold ORDER BY rowid").fetchnumpy()["ts_shifted"]
    assert len(shifted) == 6 * 360 * 50
    assert np.count_nonzero(np.diff(shifted) != 10_000) == 5
    # ... and the virtual ts gives the samples back exactly
    assert cur.execute("SELECT count(*), count(DISTINCT (series_id, ts)), min(ts), max(ts) FROM samples_cold"
                       ).fetchall() == [(6 * 360 * 50, 6 * 360 * 50, T0, T0 + 6 * H - 10_000)]


def test_retention_never_drops_what_is_not_rolled_up_or_exported(tmp_path):
    ctx = Ctx(tmp_path / "k.duckdb", export_dir=str(tmp_path / "export"), retention_raw=3600)
    fill(ctx.writer, T0, T0 + 2 * H)
    cur = ctx.store.cursor()
    # nothing rolled up or exported yet: retention keeps everything
    maintenance.retention(ctx.store, T0 + 10 * H, raw_ms=H, rollup_ms=100 * H, exporting=True)
    assert cur.execute("SELECT count(*) FROM samples").fetchone()[0] == 2 * 360 * 3
    done = maintenance.run_once(ctx, now_ms=T0 + 30 * H)
    # rolled up and exported: now raw retention applies
    assert done["exported_days"] and done["raw_deleted"] == 2 * 360 * 3
    assert cur.execute("SELECT count(*) FROM samples").fetchone()[0] == 0
    assert cur.execute("SELECT sum(count) FROM rollup_1h").fetchone()[0] == 2 * 360 * 3   # history kept
    # 5-minute rollups go after retention_rollup_5m, hourly ones after retention_rollup
    done = maintenance.retention(ctx.store, T0 + 10 * 24 * H, raw_ms=H, rollup_ms=20 * 24 * H, exporting=True,
                                 rollup_5m_ms=5 * 24 * H)
    assert done["rollup_deleted"] == 2 * 12 * 3
    assert cur.execute("SELECT count(*) FROM rollup_5m").fetchone()[0] == 0
    assert cur.execute("SELECT count(*) FROM rollup_1h").fetchone()[0] == 2 * 3


def test_parquet_export_reads_back_with_hive_partitions(tmp_path):
    ctx = Ctx(tmp_path / "e.duckdb")
    rows = fill(ctx.writer, T0, T0 + 26 * H, step=60_000)
    ctx.writer.write([("hw_gpu_utilization_ratio", {"chip": "0"}, T0 + 5, 0.25)])
    out = tmp_path / "export"
    days = maintenance.export_days(ctx.store, out, now_ms=T0 + 50 * H)
    assert len(days) == 2 and days[0] < days[1]
    assert maintenance.export_days(ctx.store, out, now_ms=T0 + 50 * H) == []   # each day once
    con = duckdb.connect()
    got = con.execute(
        f"SELECT day, metric, count(*), min(value), max(value) FROM read_parquet('{out}/*/*/*.parquet', "
        "hive_partitioning = true) GROUP BY ALL ORDER BY ALL").fetchall()
    per_day = {}
    for day, metric, n, lo, hi in got:
        per_day.setdefault(str(day), {})[metric] = n
    first = str(days[0])
    assert per_day[first]["hw_power_watts"] == 24 * 60 * 3 and per_day[first]["hw_gpu_utilization_ratio"] == 1
    assert sum(d.get("hw_power_watts", 0) for d in per_day.values()) == len(rows)
    schema = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{out}/day={first}/metric=hw_power_watts/part-0.parquet')"
                         ).fetchall()
    assert [(c, t) for c, t, *_ in schema][:3] == [("ts", "TIMESTAMP WITH TIME ZONE"), ("labels", "MAP(VARCHAR, VARCHAR)"),
                                               ("value", "DOUBLE")]
    chip1 = con.execute(f"SELECT value FROM read_parquet('{out}/day={first}/metric=hw_power_watts/part-0.parquet') "
                        "WHERE labels['chip'] = '1' ORDER BY ts LIMIT 3").fetchall()
    assert chip1 == [(1.0,), (2.0,), (3.0,)]


def test_store_reopens_with_series_cache(tmp_path):
    path = tmp_path / "o.duckdb"
    ctx = Ctx(path)
    fill(ctx.writer, T0, T0 + 60_000)
    ctx.store.close()
    store = Store(str(path))
    assert store.series_count() == 3 and store.metric_series_count("hw_power_watts") == 3
    w = Writer(store, max_series_per_metric=3)
    res = w.write([("hw_power_watts", {"chip": "0", "rack": "r1"}, T0 + 60_000, 1.0),
                   ("hw_power_watts", {"chip": "9", "rack": "r1"}, T0 + 60_000, 1.0)])
    assert (res.accepted, res.limited) == (1, 1)
    assert store.series_count() == 3


@pytest.mark.parametrize("bad", [
    ("bad-name", {}, 1, 1.0), ("ok", {"__name__": "y"}, 1, 1.0), ("ok", {"a": 1}, 1, 1.0),
    ("ok", {"a": "b"}, "soon", 1.0), ("ok", {"a": "b"}, 1, "x"), ("ok", {"a": "b"}, 2**63, 1.0), ("only", "three"),
])
def test_writer_rejects_bad_rows_with_a_reason(tmp_path, bad):
    store = Store(":memory:")
    res = Writer(store).write([bad, ("fine", {"a": "b"}, 5, 2.0)])
    assert res.rejected == 1 and res.accepted == 1 and res.errors
    assert store.cursor().execute("SELECT count(*) FROM samples").fetchone()[0] == 1


def test_writer_keeps_reserved_prefix_labels_like_prometheus():
    """Prometheus' TSDB stores __-prefixed labels (e.g. an un-relabelled __address__); so do we."""
    store = Store(":memory:")
    res = Writer(store).write([("up", {"__address__": "10.0.0.1:9100", "job": "node"}, 5, 1.0)])
    assert res.accepted == 1 and not res.errors
    (sid, metric, labels), = store.select_series([Matcher("__address__", "=", "10.0.0.1:9100")])
    assert metric == "up" and labels == {"__address__": "10.0.0.1:9100", "job": "node"}


def test_old_and_sparse_data_do_not_stall_maintenance(tmp_path):
    """Years between the oldest sample and now: compaction and export jump over empty hours/days."""
    ctx = Ctx(tmp_path / "s.duckdb", export_dir=str(tmp_path / "export"))
    fill(ctx.writer, T0, T0 + 600_000)
    fill(ctx.writer, T0 + 900 * 24 * H, T0 + 900 * 24 * H + 600_000)
    done = maintenance.run_once(ctx, now_ms=T0 + 1000 * 24 * H)
    assert done["compacted_hours"] == 2 and len(done["exported_days"]) == 2
    assert done["raw_deleted"] == 2 * 60 * 3   # rolled up, exported, then past raw retention


def test_closed_days_are_merged_into_one_sort_per_day(tmp_path):
    """Hourly compaction leaves hour-long runs per series; once every hour of a UTC day is
    compacted the day is rewritten as one sort by (series_id, ts), rollups by (series_id, bucket),
    with the same samples, duplicates of late samples collapsed, and the open day left alone."""
    ctx = Ctx(tmp_path / "m.duckdb")
    rows = fill(ctx.writer, T0 + 20 * H, T0 + 26 * H, step=60_000, series=4)   # 4 h of day 1, 2 h of day 2
    maintenance.rollup(ctx.store, T0 + 27 * H, ctx.writer.take_dirty())
    assert maintenance.compact(ctx.store, T0 + 23 * H, compact_after_ms=H) == 2   # hours 20, 21
    # a late sample of hour 20 and a rewrite of an hour-21 sample: compacted apart from the rest
    late = [("hw_power_watts", {"chip": "0", "rack": "r1"}, T0 + 20 * H + 30_000, -1.0),
            ("hw_power_watts", {"chip": "3", "rack": "r1"}, T0 + 21 * H, 999.0)]
    ctx.writer.write(late)
    assert maintenance.compact(ctx.store, T0 + 27 * H, compact_after_ms=H) == 4
    cur = ctx.store.cursor()
    ids = [sid for sid, _, _ in ctx.store.select_series([Matcher("__name__", "=", "hw_power_watts")])]
    before = ctx.store.fetch(ids, T0, T0 + 2 * 24 * H)
    r5_before = cur.execute("SELECT * FROM rollup_5m_data ORDER BY series_id, bucket").fetchall()
    assert len(before.ts) == len(rows) + 2   # the rewrite is kept twice until the merge
    assert maintenance.merge_days(ctx.store) == 1   # day 2 has hours not yet compacted
    assert maintenance.merge_days(ctx.store) == 0
    after = ctx.store.fetch(ids, T0, T0 + 2 * 24 * H)
    assert len(after.ts) == len(rows) + 1
    got = dict(zip(zip(after.series_ids.tolist(), after.ts.tolist()), after.values.tolist()))
    want = dict(zip(zip(before.series_ids.tolist(), before.ts.tolist()), before.values.tolist()))
    want[(ids[3], T0 + 21 * H)] = 999.0
    assert got == want
    assert cur.execute("SELECT value FROM samples s JOIN series se ON se.id = s.series_id "
                       "WHERE labels['chip'] = '3' AND ts = ?", [T0 + 21 * H]).fetchall() == [(999.0,)]
    assert cur.execute("SELECT * FROM rollup_5m_data ORDER BY series_id, bucket").fetchall() == r5_before
    # day 1 is now one sorted run: rows in physical order are sorted by (series_id, ts)
    for table, col in (("samples_cold", "ts"), ("rollup_5m_data", "bucket"), ("rollup_1h_data", "bucket")):
        order = cur.execute(f"SELECT series_id, {col} FROM {table} WHERE {col} < ? ORDER BY rowid",
                            [T0 + 24 * H]).fetchnumpy()
        key = order["series_id"].astype(np.int64) * (1 << 42) + (order[col] - T0)
        assert len(key) > 4 and np.all(np.diff(key) > 0), table
    # day 2's two compacted hours are still two runs (not sorted as one)
    order = cur.execute("SELECT series_id FROM samples_cold WHERE ts >= ? ORDER BY rowid", [T0 + 24 * H]).fetchnumpy()
    assert np.any(np.diff(order["series_id"]) < 0)
    assert cur.execute("SELECT done_until FROM maintenance_state WHERE job = 'merge'").fetchone() == (T0 + 24 * H,)


def test_files_with_the_unshifted_cold_layout_are_rewritten_on_open(tmp_path):
    """samples_cold(series_id, ts, value) from before the shifted layout: every sample survives."""
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE samples_hot (series_id INTEGER NOT NULL, ts BIGINT NOT NULL, value DOUBLE)")
    con.execute("CREATE TABLE samples_cold (series_id INTEGER NOT NULL, ts BIGINT NOT NULL, value DOUBLE)")
    con.execute("CREATE VIEW samples AS SELECT series_id, ts, value FROM samples_cold "
                "UNION ALL SELECT series_id, ts, value FROM samples_hot")
    rows = [(s, T0 + k * 15_000, None if k == 7 else float(s * 1000 + k)) for s in (3, 1, 2) for k in range(500)]
    con.executemany("INSERT INTO samples_cold VALUES (?, ?, ?)", rows)
    con.execute("INSERT INTO samples_hot VALUES (1, ?, 5.0)", [T0 + 10 * H])
    con.close()
    store = Store(str(path))
    cur = store.cursor()
    assert sorted(cur.execute("SELECT series_id, ts, value FROM samples_cold").fetchall()) == sorted(rows)
    assert cur.execute("SELECT count(*) FROM samples").fetchall() == [(len(rows) + 1,)]
    got = store.fetch([2], T0, T0 + H)
    assert got.ts.tolist() == [T0 + k * 15_000 for k in range(241)]
    assert got.stale.tolist() == [k == 7 for k in range(241)]
    store.close()


def test_times_before_1970_are_found_after_compaction(tmp_path):
    """`hour` is floor(ts / 1 h): a sample at -5 ms lies in hour -1, and a fetch of [-10, -1]
    must look there (truncating division would file it under hour 0)."""
    ctx = Ctx(tmp_path / "neg.duckdb")
    rows = [("hw_power_watts", {"chip": "0"}, t, float(t)) for t in (-H - 5, -5, 0, 5, H + 5)]
    assert ctx.writer.write(rows).accepted == 5
    assert maintenance.compact(ctx.store, 3 * H, compact_after_ms=0) > 0
    cur = ctx.store.cursor()
    assert cur.execute("SELECT count(*) FROM samples_hot").fetchall() == [(0,)]
    assert cur.execute("SELECT ts, hour FROM samples_cold ORDER BY ts").fetchall() == [
        (-H - 5, -2), (-5, -1), (0, 0), (5, 0), (H + 5, 1)]
    sid = ctx.store.select_series([Matcher("__name__", "=", "hw_power_watts")])[0][0]
    assert ctx.store.fetch([sid], -10, -1).ts.tolist() == [-5]
    assert ctx.store.fetch([sid], -H - 10, 10).ts.tolist() == [-H - 5, -5, 0, 5]
