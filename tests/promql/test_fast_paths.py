"""The query hot path's shortcuts against the plain way of doing the same thing.

Each shortcut (regrouping samples by moving whole runs, counting window bounds with one
bincount, spelling numbers with orjson) must give exactly what a straightforward sort, a
searchsorted per series or Python's own float formatting gives, on random inputs that include
the awkward cases: runs out of order, late and duplicate samples, empty series, irregular steps,
NaN, infinities, -0 and numbers Python writes with an exponent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from collector.promql.api import matrix_json, result_json
from collector.promql.engine import Result, _label_order
from collector.promql.values import RangeVector, format_value


def _sorted_reference(ids, sids, ts, values, stale):
    row_of = {int(s): i for i, s in enumerate(ids)}
    rows = np.array([row_of[int(s)] for s in sids], dtype=np.int64)
    order = np.lexsort((ts, rows))    # stable: duplicates keep their arrival order
    offsets = np.searchsorted(rows[order], np.arange(len(ids) + 1), side="left")
    return offsets, ts[order], values[order], stale[order]


def _stored_like(rng, n_series: int, hours: int, late: bool):
    """Samples as DuckDB hands them back: hourly chunks sorted by (series_id, ts), row groups of
    those chunks in any order, optionally followed by ingest-order rows (some late or repeated)."""
    ids = rng.choice(np.arange(1, 500), n_series, replace=False)
    chunks = []
    for h in range(hours):
        for sid in np.sort(ids):
            k = int(rng.integers(0, 6))
            ts = np.sort(rng.choice(np.arange(h * 100, h * 100 + 100), k, replace=False))
            chunks.append((np.full(k, sid), ts))
    sids = np.concatenate([c[0] for c in chunks]).astype(np.int64)
    ts = np.concatenate([c[1] for c in chunks]).astype(np.int64)
    cut = np.sort(rng.choice(np.arange(1, max(len(ts), 2)), min(4, max(len(ts) - 1, 0)), replace=False))
    groups = np.split(np.arange(len(ts)), cut)
    order = np.concatenate([groups[i] for i in rng.permutation(len(groups))]) if len(ts) else np.arange(0)
    sids, ts = sids[order], ts[order]
    if late:
        extra = int(rng.integers(1, 6))
        sids = np.concatenate([sids, rng.choice(ids, extra)])
        ts = np.concatenate([ts, rng.integers(0, hours * 100 + 1, extra)])
    values = rng.normal(size=len(ts))
    stale = rng.random(len(ts)) < 0.1
    return rng.permutation(ids).astype(np.int64), sids, ts, values, stale


@pytest.mark.parametrize("late", [False, True])
def test_label_order_matches_a_full_sort(late):
    rng = np.random.default_rng(11 + late)
    for _ in range(300):
        ids, sids, ts, values, stale = _stored_like(rng, int(rng.integers(1, 6)), int(rng.integers(1, 4)), late)
        got = _label_order(ids, sids, ts, values, stale, 0, 400)
        want = _sorted_reference(ids, sids, ts, values, stale)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def _windows_reference(rv: RangeVector):
    S, T = len(rv.labels), len(rv.ends)
    lo, hi = np.empty((S, T), dtype=np.int64), np.empty((S, T), dtype=np.int64)
    for i in range(S):
        a, b = rv.offsets[i], rv.offsets[i + 1]
        lo[i] = a + np.searchsorted(rv.ts[a:b], rv.ends - rv.range_ms, side="right")
        hi[i] = a + np.searchsorted(rv.ts[a:b], rv.ends, side="right")
    return lo, hi


def test_window_bounds_match_a_search_per_series():
    rng = np.random.default_rng(5)
    for trial in range(600):
        S, T = int(rng.integers(0, 6)), int(rng.integers(1, 9))
        counts = rng.integers(0, 12, S)
        ts = [np.sort(rng.choice(np.arange(-60, 240), c, replace=False)) for c in counts]
        ts = np.concatenate(ts).astype(np.int64) if S else np.zeros(0, dtype=np.int64)
        offsets = np.append(0, np.cumsum(counts)).astype(np.int64)
        step = int(rng.integers(1, 40))
        if trial % 4 == 0:      # irregular (or @-pinned: all equal) evaluation times
            ends = np.sort(rng.integers(-80, 260, T)).astype(np.int64)
        else:
            ends = int(rng.integers(-80, 200)) + step * np.arange(T, dtype=np.int64)
        # ranges that are and are not whole multiples of the step
        rng_ms = step * int(rng.integers(1, 12)) if trial % 2 else int(rng.integers(1, 120))
        rv = RangeVector([{}] * S, offsets, ts, np.zeros(len(ts)), ends, rng_ms)
        lo, hi = rv.windows()
        want_lo, want_hi = _windows_reference(rv)
        np.testing.assert_array_equal(lo, want_lo)
        np.testing.assert_array_equal(hi, want_hi)


def test_numbers_are_spelled_as_prometheus_does():
    rng = np.random.default_rng(3)
    values = np.concatenate([
        rng.normal(size=3000) * 10.0 ** rng.integers(-30, 30, 3000),
        np.round(rng.normal(0, 100, 1000), 2),
        rng.integers(-10 ** 6, 10 ** 6, 500).astype(float),
        [0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, 1e15, 1e16, 1e21, 1e-7, 2.5e-5, 5e-324,
         1.7976931348623157e308, 0.1 + 0.2],
    ])
    ts = 1_795_442_700_000 + np.arange(len(values), dtype=np.int64) * 15_000 + rng.integers(0, 999, len(values))
    ts[:3] = [0, -1, 1]
    series = [({"__name__": "m", "node": 'n"1'}, ts[:50], values[:50]), ({}, ts[50:], values[50:]),
              ({"empty": "yes"}, ts[:0], values[:0])]
    doc = json.loads(result_json(Result("matrix", series)))
    assert doc["resultType"] == "matrix"
    assert [s["metric"] for s in doc["result"]] == [lb for lb, _, _ in series]
    for got, (_, t, v) in zip(doc["result"], series):
        assert [p[0] for p in got["values"]] == (t / 1000).tolist()
        assert [p[1] for p in got["values"]] == [format_value(x) for x in v.tolist()]
    # Go's strconv.FormatFloat(v, 'f', -1, 64), as Prometheus writes sample values
    pinned = {1.0: "1", -0.0: "-0", 1e21: "1000000000000000000000", 1e-7: "0.0000001", 2.5e-5: "0.000025",
              0.1 + 0.2: "0.30000000000000004", 1e16: "10000000000000000", 123.25: "123.25",
              float("inf"): "+Inf", float("-inf"): "-Inf", float("nan"): "NaN"}
    doc = json.loads(matrix_json([({}, np.arange(len(pinned), dtype=np.int64), np.array(list(pinned)))]).join(
        [b"[", b"]"]))
    assert [p[1] for p in doc[0]["values"]] == list(pinned.values())
    assert b'"-0"' in matrix_json(series) and b'"NaN"' in matrix_json(series)
    assert json.loads(result_json(Result("matrix", []))) == {"resultType": "matrix", "result": []}


def test_compacted_samples_read_by_hour_match_a_scan():
    """Selectors prune compacted samples on their `hour` column: windows that start or end on
    either side of an hour boundary, before or after compaction, see exactly the samples in them."""
    from collector.store import maintenance
    from collector.store.core import Store
    from collector.promql.engine import Engine

    store = Store()
    ts = np.arange(0, 5 * 3_600_000, 420_000, dtype=np.int64) + 3_600_000 * 1000   # every 7 min, 5 h
    rows = [("m", {"s": str(i)}, int(t), float(i + k)) for i in range(3) for k, t in enumerate(ts)]
    store.append_series(rows)
    engine = Engine(store)

    def answers():
        out = []
        for end_s in (ts[0] / 1000 + 3599.0, ts[0] / 1000 + 3600.0, ts[0] / 1000 + 7321.5, ts[-1] / 1000 + 1.0):
            res = engine.range("count_over_time(m[61m])", end_s - 600, end_s, 60)
            out.append([(lb["s"], vs.tolist()) for lb, _, vs in res.value])
            res = engine.range("m", end_s - 600, end_s, 60)
            out.append([(lb["s"], vs.tolist()) for lb, _, vs in res.value])
        return out

    before = answers()
    assert maintenance.compact(store, int(ts[-1]) + 3 * 3_600_000, 3_600_000) >= 5
    assert store.con.execute("SELECT count(*) FROM samples_hot").fetchone()[0] == 0
    assert answers() == before
    # and against counting by hand, at times all around the hour boundaries
    for end_ms in range(int(ts[0]), int(ts[-1]) + 3_600_000, 210_000):
        for window_min in (5, 61):
            want = sum(1 for t in ts if end_ms - window_min * 60_000 < t <= end_ms)
            got = engine.instant(f"count_over_time(m[{window_min}m])", end_ms / 1000).value
            assert [v for _, v in got] == ([float(want)] * 3 if want else []), (end_ms, window_min)
