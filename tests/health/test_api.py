"""The live evaluation in the collector: reads the store, writes risk/state series through the
Writer, serves /api/v1/health/chips, and hands verdicts to remediation in one call."""

import json

import pytest
from fastapi.testclient import TestClient

from agent.catalog import catalog
from collector.app import create_app, make_context
from collector.config import from_dict
from collector.health.api import HealthConfigError, LiveHealth
from collector.store.core import Matcher
from collector.store.writer import Writer
from tests.health.tracegen import HOUR, START_MS, Trace

AT = START_MS + 30 * HOUR + 10 * 60_000
NOW = START_MS + 30 * HOUR + 40 * 60_000     # evaluated 30 min after the signal


def trace() -> Trace:
    t = Trace(nodes=2, chips=2, hours=31)
    t.silent[(1, 1)] = AT + 5 * 60_000          # falls off the bus 35 min before NOW
    t.baseline()
    t.counter(0, 0, "hw.gpu.ecc.errors", {AT: 3}, type="uncorrected", memory="device", scope="aggregate")
    t.rows = [r for r in t.rows if r[0] <= NOW]
    return t


def load(store, t: Trace):
    Writer(store).write((name, json.loads(labels), ts, value) for ts, name, labels, value in t.rows)


def test_live_evaluation_writes_series_and_remediates(tmp_path):
    ctx = make_context(from_dict({"db": str(tmp_path / "c.duckdb")}))
    load(ctx.store, trace())
    handed = []
    live = LiveHealth(ctx.store, ctx.writer, {"interval": 60}, remediate=handed.append)
    vs = live.run_once(now_ms=NOW)
    by = {(v.chip.node, v.chip.chip): v for v in vs}
    assert by[("n000", "0")].state.value == "failing" and by[("n000", "0")].action.value == "reset_gpu"
    assert "uncorrectable ECC errors: 3" in by[("n000", "0")].reasons[0]
    assert by[("n001", "1")].action.value == "reboot_node"
    assert by[("n000", "1")].state.value == "healthy" and by[("n001", "0")].state.value == "healthy"
    assert handed == [vs]
    # state series: 1 for the current state, 0 for the others
    state = catalog().prom("shopfloor.health.state")
    sel = ctx.store.select_series([Matcher("__name__", "=", state), Matcher("node", "=", "n000"),
                                   Matcher("chip", "=", "0")])
    got = {}
    for sid, _, labels in sel:
        s = ctx.store.fetch([sid], NOW, NOW)
        got[labels["state"]] = float(s.values[-1])
    assert got["failing"] == 1.0 and got["healthy"] == 0.0 and sum(got.values()) == 1.0
    # an hour later, without new data: the failing chip stays failing (a fatal signal holds for a
    # day), the others are unknown (stale data is no ground for a judgement)
    vs2 = {(v.chip.node, v.chip.chip): v for v in live.run_once(now_ms=NOW + HOUR)}
    assert vs2[("n000", "0")].state.value == "failing"
    assert vs2[("n000", "1")].state.value == "unknown" and "no data from node n000" in vs2[("n000", "1")].reasons[0]
    ctx.store.close()


def test_http_endpoint(tmp_path):
    app = create_app(from_dict({"db": str(tmp_path / "c.duckdb"), "health": {"interval": 3600}}))
    ctx = app.state.ctx
    load(ctx.store, trace())
    ctx.extras["health"].run_once(now_ms=NOW)
    with TestClient(app) as client:
        assert ctx.scheduler.get_job("health-evaluate") is not None
        r = client.get("/api/v1/health/chips", params={"state": "failing"})
        assert r.status_code == 200
        data = r.json()["data"]
        assert {(v["node"], v["chip"]) for v in data["verdicts"]} == {("n000", "0"), ("n001", "1")}
        assert all(v["reasons"] for v in data["verdicts"])
        r = client.get("/api/v1/health/chips", params={"node": "n000"})
        assert {v["chip"] for v in r.json()["data"]["verdicts"]} == {"0", "1"}
        r = client.get("/api/v1/health/chips", params={"state": "exploded"})
        assert r.status_code == 400 and r.json()["status"] == "error"


def test_unknown_config_key_is_refused(tmp_path):
    with pytest.raises(HealthConfigError, match="unknown keys"):
        create_app(from_dict({"db": str(tmp_path / "c.duckdb"), "health": {"intervall": 5}}))


def test_live_fate_sharing_with_a_job_label(tmp_path):
    ctx = make_context(from_dict({"db": str(tmp_path / "c.duckdb")}))
    t = Trace(nodes=4, chips=1, hours=31)
    t.baseline()
    for n in range(3):        # XID 79 on three nodes of job 77 within a minute: a fabric event
        at = AT + n * 20_000
        t.counter(n, 0, "hw.gpu.xid.errors", {at: 1}, from_ts=at, xid="79", slurm_job="77")
    t.rows = [r for r in t.rows if r[0] <= NOW]
    load(ctx.store, t)
    live = LiveHealth(ctx.store, ctx.writer, {"jobs": "label:slurm_job"})
    vs = live.run_once(now_ms=NOW)
    storms = [v for v in vs if v.source == "fate-sharing"]
    assert len(storms) == 1 and storms[0].job == "77" and "XID 79 on 3 nodes of job 77" in storms[0].reasons[0]
    assert not any(v.action.takes_out_of_service for v in vs)
    ctx.store.close()


def test_live_job_catches_an_efa_retransmit_surge_within_the_hour(tmp_path):
    """The live job runs every few minutes on the current, partial hour: a NIC failing within the
    hour is drained before the hour ends (the hourly backtest cannot show this)."""
    surge = START_MS + 8 * 24 * HOUR + 10 * HOUR          # at the top of an hour
    now = surge + 20 * 60_000                              # the job runs 20 min later
    t = Trace(nodes=2, chips=1, hours=8 * 24 + 11).baseline()
    t.efa(0, {START_MS: 1800.0, surge: 1800.0 * 50})
    t.efa(1, {START_MS: 1800.0})
    t.rows = [r for r in t.rows if r[0] <= now]
    ctx = make_context(from_dict({"db": str(tmp_path / "c.duckdb")}))
    load(ctx.store, t)
    live = LiveHealth(ctx.store, None, {"interval": 300})
    by = {(v.chip.node, v.chip.chip): v for v in live.run_once(now_ms=now)}
    v = by[("n000", "")]
    assert (v.state.value, v.action.value) == ("degraded", "drain") and "EFA retransmits" in v.reasons[0], v
    assert ("n001", "") not in by
    ctx.store.close()
