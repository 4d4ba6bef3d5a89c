"""The backtest: its scoring on a crafted trace with known answers, and the CLI on a small trace
from the real simulator (`shopfloor simulate --out`)."""

import json
import subprocess

import pytest

from collector.health import backtest as bt
from tests.health.tracegen import HOUR, START_MS, Trace
from tests.support import PYTHON, ROOT


def test_scoring_on_a_crafted_trace(tmp_path):
    t = Trace(nodes=4, chips=2, hours=48)
    fail_ts = START_MS + 30 * HOUR + 1_200_000
    t.silent[(0, 0)] = fail_ts            # chip n000/0 falls off the bus at hour 30 ...
    t.baseline()
    # ... after 8 h of sustained thermal throttling (a rule catches it: lead ~8 h)
    t.gauge(0, 0, "hw.gpu.clock.event.active", {START_MS: 0, fail_ts - 8 * HOUR - 3 * 3600_000: 1}, reason="hw_thermal")
    t.failures.append({"ts": fail_ts, "rack": "r0", "node": "n000", "chip": "0", "uuid": "GPU-000-0",
                       "mode": "thermal", "precursor_start": fail_ts - 12 * HOUR})
    # n001/1 fails with no warning (GSP): detected right after, not before
    gsp_ts = START_MS + 20 * HOUR + 600_000
    t.gauge(1, 1, "hw.gpu.recovery_action", {START_MS: 0, gsp_ts: 1, gsp_ts + HOUR: 0})
    t.failures.append({"ts": gsp_ts, "rack": "r0", "node": "n001", "chip": "1", "uuid": "GPU-001-1",
                       "mode": "gsp", "precursor_start": None})
    # n002/0: an NVLink down, and the chip never fails: a false cordon
    t.gauge(2, 0, "hw.gpu.nvlink.up", {START_MS: 1, START_MS + 10 * HOUR: 0, START_MS + 12 * HOUR: 1}, link="0")
    # a storm of XID 13 on 4 nodes of one job: no cordon
    for n in range(4):
        t.jobs.append(("j1", t.node(n), START_MS, START_MS + 48 * HOUR))
        at = START_MS + 40 * HOUR + n * 5000
        t.counter(n, 1, "hw.gpu.xid.errors", {at: 1}, from_ts=at, xid="13")
    t.storms.append((START_MS + 40 * HOUR, "j1", 13, [t.node(n) for n in range(4)]))
    td = bt.read_trace(t.write(str(tmp_path / "trace")))
    rep = bt.score(td, None)
    assert rep["failures"] == 2 and rep["caught_before"] == 1 and rep["recall"] == 0.5
    assert rep["precursor_failures"] == 1 and rep["precursor_recall"] == 1.0
    assert 7 <= rep["lead_h_median"] <= 9
    assert rep["detected_after"] == 1
    assert rep["cordons"] == 3 and rep["true_cordons"] == 2 and rep["false_cordons"] == 1
    assert rep["precision"] == pytest.approx(2 / 3)
    assert rep["false_cordons_per_10k_chip_days"] == pytest.approx(1 / rep["chip_days"] * 1e4)
    assert rep["storms"] == 1 and rep["fate_sharing_alerts"] == 1 and rep["cordons_during_storms"] == 0
    text = bt.render(rep)
    for words in ("recall", "lead time", "precision", "false cordons per 10,000 chip-days", "cordons during storms"):
        assert words in text


def test_cli_on_a_simulated_trace(tmp_path):
    out = tmp_path / "sim"
    subprocess.run([PYTHON, "-m", "shopfloor", "simulate", "--nodes", "12", "--duration", "6d", "--step", "300",
                    "--seed", "21", "--out", str(out)], check=True, cwd=ROOT, capture_output=True, timeout=120)
    r = subprocess.run([PYTHON, "-m", "shopfloor", "health", "backtest", "--trace", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for words in ("recall", "lead time", "median", "p10", "p90", "precision",
                  "false cordons per 10,000 chip-days", "cordons during storms"):
        assert words in r.stdout, r.stdout
    r = subprocess.run([PYTHON, "-m", "shopfloor", "health", "backtest", "--trace", str(out), "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    rep = json.loads(r.stdout)
    import polars as pl

    assert rep["storms"] == pl.read_parquet(out / "storms.parquet").height
    assert rep["failures"] == pl.read_parquet(out / "failures.parquet").height
    assert rep["cordons_during_storms"] == 0
    assert rep["chips"] >= 96


def test_cli_refuses_a_missing_trace(tmp_path):
    r = subprocess.run([PYTHON, "-m", "shopfloor", "health", "backtest", "--trace", str(tmp_path / "none")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_backtest_sees_a_nic_failure_within_the_hour_as_the_live_job_does(tmp_path):
    """EFA retransmits surge 5 min into an hour and the NIC fails 40 min later: the live job
    (every 5 min, the partial hour scaled to an hourly rate) drains the node before it fails; the
    backtest replays those steps, so it counts the catch. Hour ends alone see it only after."""
    hour0 = START_MS + 8 * 24 * HOUR + 10 * HOUR
    surge, fail_ts = hour0 + 5 * 60_000, hour0 + 45 * 60_000
    t = Trace(nodes=2, chips=1, hours=8 * 24 + 14).baseline()
    t.efa(0, {START_MS: 1800.0, surge: 1800.0 * 50, fail_ts: 0.0})
    t.efa(1, {START_MS: 1800.0})
    t.failures.append({"ts": fail_ts, "rack": "r0", "node": "n000", "chip": "", "mode": "nic", "precursor_start": surge})
    td = bt.read_trace(t.write(str(tmp_path / "trace")))
    live = bt.score(td, None)
    assert live["caught_before"] == 1 and live["precursor_recall"] == 1.0
    # the first step whose partial hour shows the surge: 10 min in (a scaled rate needs 10 min of data)
    assert live["lead_h_median"] == pytest.approx((fail_ts - hour0 - 10 * 60_000) / HOUR)
    assert live["cordons"] == 1 and live["false_cordons"] == 0 and live["started_within_hour"] == 1
    hourly = bt.score(td, None, subhour=False)
    # the whole hour's rate (the surge ends at the failure, 40 of 60 min) stays under the rule's 40x
    assert hourly["caught_before"] == 0 and hourly["cordons"] == 0 and hourly["started_within_hour"] == 0
