"""The feature layer gives the same answer on a trace directory and on the collector's store, and
the same answer whether the data is read in one chunk or hour by hour (the live service)."""

import json

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from collector.health.features import (MODEL_FEATURES, StoreSource, TraceSource, features, load_trace,
                                       read_hours)
from collector.store.core import Store
from tests.health.tracegen import HOUR, START_MS, Trace

AT = START_MS + 30 * HOUR + 600_000


def crafted() -> Trace:
    t = Trace(nodes=2, chips=2, hours=40)
    t.silent[(1, 1)] = AT
    t.baseline()
    t.counter(0, 0, "hw.gpu.ecc.errors", {START_MS + h * HOUR + 60_000: (1 if h < 30 else 20) for h in range(40)},
              type="corrected", memory="device", scope="aggregate")
    t.counter(0, 1, "hw.gpu.nvlink.errors", {START_MS + 5 * HOUR: 7, START_MS + 35 * HOUR: 100}, link="3", type="crc_flit")
    t.counter(1, 0, "hw.gpu.xid.errors", {AT: 1, AT + 2 * HOUR: 2}, from_ts=AT, xid="13")
    t.gauge(0, 0, "hw.gpu.row_remap.pending", {START_MS: 0, AT: 1})
    return t


def store_from(t: Trace) -> Store:
    s = Store(":memory:")
    s.append_series((name, json.loads(labels), ts, value) for ts, name, labels, value in t.rows)
    return s


def grid_of(r, ev, end_hour):
    g = features(r, ev, end_hour=end_hour)
    return g.select("cluster", "node", "chip", "uuid", "hour", *MODEL_FEATURES, "silent_min").sort("node", "chip", "hour")


def test_trace_and_store_give_identical_features(tmp_path):
    t = crafted()
    r1, ev1, lo, hi = load_trace(t.write(str(tmp_path / "trace")))
    s = store_from(t)
    r2, ev2 = read_hours(StoreSource(s), lo, hi, data_start_ms=lo)
    end = (hi - 1) // HOUR
    assert_frame_equal(ev1.sort("ts", "node"), ev2.sort("ts", "node"))
    g1, g2 = grid_of(r1, ev1, end), grid_of(r2, ev2, end)
    assert g1.height == 2 * 2 * 40
    assert_frame_equal(g1, g2)


def test_hourly_chunks_equal_one_pass(tmp_path):
    t = crafted()
    d = t.write(str(tmp_path / "trace"))
    src = TraceSource(d)
    lo, hi = src.time_range()
    r1, ev1 = read_hours(src, lo, hi + 1, chunk_hours=24 * 10)
    r2, ev2 = read_hours(src, lo, hi + 1, chunk_hours=1)
    end = hi // HOUR
    assert_frame_equal(grid_of(r1, ev1, end), grid_of(r2, ev2, end))


def test_feature_values(tmp_path):
    t = crafted()
    r, ev, lo, hi = load_trace(t.write(str(tmp_path / "trace")))
    g = features(r, ev, end_hour=(hi - 1) // HOUR)
    h = START_MS // HOUR

    def at(node, chip, hour):
        return g.filter((pl.col("node") == node) & (pl.col("chip") == chip) & (pl.col("hour") == h + hour)).row(0, named=True)

    # correctable ECC: 1/h for 30 h, then 20/h
    row = at("n000", "0", 33)
    assert row["ecc_corr_1h"] == 20 and row["ecc_corr_24h"] == 4 * 20 + 20 * 1
    assert row["ecc_corr_base"] == pytest.approx(1.0)       # the hours before the last 24 h
    assert row["ecc_corr_ratio"] == pytest.approx((100 / 24) / 1.0)
    assert row["remap_pending"] == 1
    assert at("n000", "0", 29)["remap_pending"] == 0
    # NVLink errors: a jump of 100 in hour 35
    assert at("n000", "1", 35)["nvlink_1h"] == 100 and at("n000", "1", 35)["nvlink_24h"] == 100
    assert at("n000", "1", 5)["nvlink_1h"] == 7 and at("n000", "1", 6)["nvlink_1h"] == 0
    # XID counter created by its first XID counts from zero: 1 then 2 more
    assert at("n001", "0", 30)["xid_7d"] == 1 and at("n001", "0", 32)["xid_7d"] == 3
    # the silent chip: minutes since its last sample, while its node keeps reporting
    row = at("n001", "1", 32)
    assert row["silent_min"] > 100 and row["node_silent_min"] < 10
    assert at("n001", "1", 29)["silent_min"] < 10


def test_bad_trace_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="samples"):
        TraceSource(str(tmp_path))
