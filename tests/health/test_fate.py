"""Fate-sharing: the same XID on many nodes of one job (or rack) at once is one alert, no cordons."""

import polars as pl

from collector.health.evaluate import evaluate, verdicts
from collector.health.fate import MIN_NODES, find_storms
from collector.health.features import load_trace
from collector.health.verdict import Action, State
from tests.health.tracegen import HOUR, START_MS, Trace

AT = START_MS + 10 * HOUR + 5 * 60_000


def storm_trace(xid: str, nodes_hit: int, lone_79: bool = False) -> Trace:
    t = Trace(nodes=6, chips=2, hours=24).baseline()
    # one job on nodes 0-4, racks of 4 nodes: nodes 0-3 rack r0, 4-5 rack r1
    for n in range(5):
        t.jobs.append(("job42", t.node(n), START_MS, START_MS + 20 * HOUR))
    t.jobs.append(("job7", t.node(5), START_MS, START_MS + 20 * HOUR))
    hit = [t.node(n) for n in range(nodes_hit)]
    for n in range(nodes_hit):
        at = AT + n * 9_000          # within a minute, as the kernel logs land
        t.counter(n, n % 2, "hw.gpu.xid.errors", {at: 1}, from_ts=at, xid=xid)
    t.storms.append((AT, "job42", int(xid), hit))
    if lone_79:
        t.counter(5, 0, "hw.gpu.xid.errors", {AT + 20_000: 1}, from_ts=AT + 20_000, xid="79")
    return t


def run(tmp_path, t):
    r, ev, lo, hi = load_trace(t.write(str(tmp_path / "trace")))
    jobs = pl.DataFrame(t.jobs, schema={"job": pl.String, "node": pl.String, "start": pl.Int64, "end": pl.Int64},
                        orient="row")
    e = evaluate(r, ev, jobs, None, end_hour=(hi - 1) // HOUR)
    return e, verdicts(e, None, hour=AT // HOUR)


def test_storm_of_application_xids_is_one_alert_and_no_cordon(tmp_path):
    e, vs = run(tmp_path, storm_trace("31", 4))
    storms = [v for v in vs if v.source == "fate-sharing"]
    assert len(storms) == 1
    s = storms[0]
    assert s.job == "job42" and s.chip.node == "job/job42" and (s.state, s.action) == (State.WATCH, Action.WATCH)
    assert "XID 31 on 4 nodes of job job42" in s.reasons[0]
    chips = [v for v in vs if v.source != "fate-sharing"]
    assert chips and all(v.state == State.HEALTHY for v in chips), [v for v in chips if v.state != State.HEALTHY]


def test_storm_of_fatal_xids_cordons_nothing_but_a_lone_one_elsewhere_is_cordoned(tmp_path):
    e, vs = run(tmp_path, storm_trace("79", 5, lone_79=True))
    assert not any(v.action.takes_out_of_service for v in vs if v.chip.node != "n005")
    lone = [v for v in vs if v.chip.node == "n005" and v.chip.chip == "0"][0]
    assert (lone.state, lone.action) == (State.FAILING, Action.REBOOT_NODE)
    assert len([v for v in vs if v.source == "fate-sharing"]) == 1


def test_too_few_nodes_is_not_a_storm(tmp_path):
    e, vs = run(tmp_path, storm_trace("79", MIN_NODES - 1))
    assert not e.storms
    cordoned = {v.chip.node for v in vs if v.action.takes_out_of_service}
    assert cordoned == {"n000", "n001"}


def test_without_job_membership_racks_group_the_storm(tmp_path):
    t = storm_trace("45", 4)
    r, ev, lo, hi = load_trace(t.write(str(tmp_path / "trace")))
    storms, marked = find_storms(ev, None)
    assert [(s.key_type, s.key, len(s.nodes)) for s in storms] == [("rack", "r0", 4)]
    assert marked["in_storm"].all()


def test_storms_far_apart_in_time_are_separate(tmp_path):
    ev = pl.DataFrame({
        "ts": [0, 1000, 2000, 10 * 60_000, 10 * 60_000 + 500, 10 * 60_000 + 900],
        "cluster": ["c"] * 6, "rack": ["r0", "r1", "r2"] * 2, "node": ["a", "b", "c"] * 2,
        "chip": ["0"] * 6, "uuid": ["u"] * 6, "xid": [13] * 6, "count": [1] * 6})
    jobs = pl.DataFrame({"job": ["j"] * 3, "node": ["a", "b", "c"], "start": [0] * 3, "end": [1 << 40] * 3})
    storms, marked = find_storms(ev, jobs)
    assert [(s.key, s.start_ms) for s in storms] == [("j", 0), ("j", 600_000)]
