"""Engine behaviour the conformance files do not pin down: parser work-arounds and limits."""

from __future__ import annotations

import math

import pytest

from collector.promql.engine import Engine, Limits
from collector.promql.values import PromQLError
from collector.store.core import Store
from collector.store.writer import Writer


@pytest.fixture()
def engine():
    store = Store(":memory:")
    # one sample every 10 s from -100 s to +100 s
    res = Writer(store).write([("m", {"a": "x"}, t * 1000, float(t)) for t in range(-100, 101, 10)])
    assert res.accepted == 21
    yield Engine(store, {"lookback_delta_s": 30})
    store.close()


def test_negative_at_modifier(engine):
    # promql_parser panics on `@ <negative>`; the engine swaps in placeholders and maps them back
    assert engine.instant("m @ -45", 100).value == [({"__name__": "m", "a": "x"}, -50.0)]
    assert engine.instant('m{a="x"} @ -45.5 offset 10s', 0).value == [({"__name__": "m", "a": "x"}, -60.0)]
    # an "@ -1" inside a string is left alone
    assert engine.instant('label_replace(m @ -1, "b", "@ -1", "a", ".*")', 0).value == \
        [({"__name__": "m", "a": "x", "b": "@ -1"}, -10.0)]


def test_lookback_delta_is_configurable(engine):
    assert engine.instant("m", 125).value == [({"__name__": "m", "a": "x"}, 100.0)]
    assert engine.instant("m", 131).value == []       # 31 s after the last sample, lookback 30 s


def test_range_points_limit_and_steps(engine):
    small = Engine(engine.store, Limits(max_points_per_series=10))
    with pytest.raises(PromQLError) as err:
        small.range("m", 0, 100, 10)                   # 11 points
    assert err.value.kind == "bad_data"
    res = small.range("m * 2", 0, 90, 10)
    ((labels, ts, vals),) = res.value
    assert labels == {"a": "x"} and list(ts) == list(range(0, 90_001, 10_000))
    assert list(vals) == [2.0 * t for t in range(0, 91, 10)]


def test_limits_from_config_strings():
    lim = Limits.from_config({"timeout_s": "2m", "max_samples": "1000", "lookback_delta_s": "1m"})
    assert (lim.timeout_s, lim.max_samples, lim.lookback_delta_s) == (120.0, 1000, 60.0)
    with pytest.raises(ValueError, match="unknown settings"):
        Limits.from_config({"timeout": 3})
    with pytest.raises(ValueError, match="positive"):
        Limits.from_config({"max_samples": 0})


def test_errors_are_typed(engine):
    with pytest.raises(PromQLError) as err:
        engine.instant("sum(", 0)
    assert err.value.kind == "bad_data"
    with pytest.raises(PromQLError) as err:
        engine.instant('m{a=~"("}', 0)
    assert err.value.kind == "bad_data"
    with pytest.raises(PromQLError) as err:
        engine.range('"text"', 0, 10, 1)
    assert err.value.kind == "bad_data"


def test_stale_marker_ends_series():
    store = Store(":memory:")
    Writer(store).write([("g", {}, 0, 1.0), ("g", {}, 10_000, None), ("g", {}, 20_000, 3.0)])
    e = Engine(store)
    assert e.instant("g", 5).value == [({"__name__": "g"}, 1.0)]
    assert e.instant("g", 15).value == []              # the staleness marker hides the old sample
    assert e.instant("g", 25).value == [({"__name__": "g"}, 3.0)]
    assert e.instant("count_over_time(g[1m])", 25).value == [({}, 2.0)]   # markers are not samples
    scalar = e.instant("scalar(g)", 15)
    assert scalar.type == "scalar" and math.isnan(scalar.value)


def test_label_replace_takes_re2_inline_flags(engine):
    # RE2 (Go) scopes `(?i)` to the rest of its group; Python's re refuses it mid-pattern
    res = engine.instant('label_replace(m, "b", "$1", "a", "(?s)((?i)X)")', 0)
    assert res.value == [({"__name__": "m", "a": "x", "b": "x"}, 0.0)]
    res = engine.instant('label_replace(m, "b", "$1", "a", "(x)(?i)Y")', 0)   # no match: unchanged
    assert res.value == [({"__name__": "m", "a": "x"}, 0.0)]


def test_watchdog_fires_due_actions_and_skips_cancelled_ones():
    import threading
    import time

    from collector.promql.engine import _Watchdog

    dog = _Watchdog()
    fired = threading.Event()
    cancelled = []
    late = dog.watch(time.monotonic() + 0.05, lambda: cancelled.append("late"))
    dog.cancel(late)
    dog.watch(time.monotonic() + 0.02, fired.set)
    assert fired.wait(5)
    time.sleep(0.1)
    assert cancelled == []


def test_watchdog_interrupts_a_long_duckdb_read():
    import time

    import duckdb

    from collector.promql.engine import _WATCHDOG

    store = Store(":memory:")
    cur = store.cursor()
    t0 = time.monotonic()
    token = _WATCHDOG.watch(t0 + 0.2, cur.interrupt)
    with pytest.raises(duckdb.InterruptException):
        cur.execute("SELECT count(*) FROM range(100000000000) a, range(10) b").fetchall()
    _WATCHDOG.cancel(token)
    assert time.monotonic() - t0 < 30
    cur.close()
    store.close()


def test_string_literals_that_are_not_utf8_in_go_are_found():
    """Go decodes \\xNN and octal escapes to single bytes: "\\xff" is invalid UTF-8 (not a label
    name), "\\xc3\\xbf" is the valid 'ÿ'; raw `...` strings keep their backslashes."""
    from collector.promql.engine import invalid_utf8_literals

    assert invalid_utf8_literals(r'label_replace(m, "\xff", "", "src", "(.*)")') == {"\xff"}
    assert invalid_utf8_literals(r'label_replace(m, "\xc3\xbf", "a\n", "src", "(.*)")') == frozenset()
    assert invalid_utf8_literals(r'm{a="\377b"} + on() n{b=`\xff`}') == {"\xffb"}
    assert invalid_utf8_literals(r"m{a='\xffz\'q'}") == {"\xffz'q"}
    assert invalid_utf8_literals('label_replace(m, "ÿ", "", "src", "(.*)")') == frozenset()
