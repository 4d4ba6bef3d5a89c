"""The collector goes away for a while, and comes back: nothing is lost and order is kept.

The agent (agent.runner.Agent, with the EFA and power sources on the recorded sysfs fixture)
collects on; the receiving side is a real separate process that is stopped and started again
on the same port. Two receivers:
  * the real collector (`shopfloor collector`, DuckDB file): after the outage every collection's
    samples are in the store, none twice;
  * a minimal OTLP receiver process (tests/agent/otlp_server.py) that logs arrival order, to show
    the batches arrive in collection order.
The agent is also restarted during the outage, which shows the spool survives a restart.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from agent.catalog import catalog
from agent.config import parse
from agent.runner import Agent
from tests.support import FIXTURES, PYTHON, ROOT, free_port, stop, wait_http

HERE = Path(__file__).resolve().parent
MARKER = "shopfloor.agent.source.supported"   # one point per collection and source, batch time


def _config(tmp_path: Path, port: int):
    return parse({
        "labels": {"cluster": "outage", "node": "n1", "rack": "r1"},
        "sysfs_root": str(FIXTURES / "sysfs"),
        "ipmitool_command": [str(FIXTURES / "ipmitool" / "fake-ipmitool")],
        "collector_endpoint": f"http://127.0.0.1:{port}/v1/metrics",
        "export_timeout": "10s",     # a loaded CI machine can take seconds to commit a batch
        "interval": "200ms",          # also caps the retry backoff at 1 s
        "listen": "",
        "spool_dir": str(tmp_path / "spool"),
        "state_dir": str(tmp_path / "state"),
        "sources": {"nvml": {"enabled": False}, "dcgm": {"enabled": False},
                    "neuron": {"enabled": False}, "xid": {"enabled": False}},
    }, env={})


def _start(cmd: list[str], ready_url: str, log: Path) -> subprocess.Popen:
    """Start a receiving process (stopped and restarted by the test, so not a `with` block)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        wait_http(ready_url, 60, proc)
    except Exception:
        stop(proc)
        raise AssertionError(log.read_text(errors="replace")[-3000:]) from None
    return proc


def _collect(agent: Agent, n: int, produced: list[int]) -> None:
    for _ in range(n):
        agent.collect_once()
        produced.append(agent.last_time_ns)
        time.sleep(0.02)


def _why(agent: Agent, tmp_path: Path) -> str:
    """What the shipper saw, and the end of the receivers' logs (for a failure message)."""
    logs = "".join(f.read_text(errors="replace")[-1500:] for f in sorted(tmp_path.glob("*.log")))
    return f"counts={agent.shipper.counts} spooled={len(agent.shipper.spool)} last_error={agent.shipper.last_error!r}\n{logs}"


def _run_outage(tmp_path: Path, port: int, start_receiver) -> tuple[list[int], Agent]:
    """5 collections up, outage (agent restarted in the middle), receiver back. Returns the
    batch timestamps in collection order and the final agent."""
    cfg = _config(tmp_path, port)
    produced: list[int] = []
    proc = start_receiver()
    agent = Agent(cfg)
    agent.start()
    try:
        _collect(agent, 5, produced)
        assert agent.shipper.wait_idle(90), _why(agent, tmp_path)
        assert agent.shipper.counts["success"] == 5, _why(agent, tmp_path)

        stop(proc)                                    # the collector goes away
        _collect(agent, 8, produced)
        time.sleep(0.3)
        assert len(agent.shipper.spool) >= 1 and agent.shipper.counts["retry"] >= 1, _why(agent, tmp_path)
        agent.stop()                                  # and the agent restarts meanwhile
        agent = Agent(cfg)
        assert len(agent.shipper.spool) == 8, _why(agent, tmp_path)   # every outage batch survived on disk
        agent.start()
        _collect(agent, 4, produced)
        # the agent reports its own spool while it waits
        spooled = [p for p in agent.latest.points if p.name == "shopfloor.agent.spool.batches"]
        assert spooled and spooled[0].value >= 8

        proc = start_receiver()                       # the collector is back
        assert agent.shipper.wait_idle(90), _why(agent, tmp_path)
        _collect(agent, 3, produced)
        assert agent.shipper.wait_idle(90), _why(agent, tmp_path)
        assert agent.shipper.spool.bytes == 0
    finally:
        agent.stop()
        stop(proc)
    return produced, agent


def test_outage_nothing_lost_order_kept(tmp_path):
    port = free_port()
    log = tmp_path / "received.jsonl"

    def start_receiver():
        return _start([PYTHON, str(HERE / "otlp_server.py"), str(port), str(log)],
                      f"http://127.0.0.1:{port}/", tmp_path / "receiver.log")

    produced, _ = _run_outage(tmp_path, port, start_receiver)
    received = []
    for line in log.read_text().splitlines():
        batch = json.loads(line)
        times = {p[2] for p in batch["points"] if p[0] == MARKER and p[1]["source"] == "efa"}
        assert len(times) == 1                         # one collection per batch
        received.append(times.pop())
    assert received == produced                        # all of them, once each, in order
    assert len(produced) == 20


def test_outage_with_real_collector(tmp_path):
    pytest.importorskip("duckdb", reason="missing tool: duckdb (the collector's store)")
    from collector.store.core import Matcher, Store

    port = free_port()
    db = tmp_path / "collector.duckdb"

    def start_receiver():
        return _start([PYTHON, "-m", "shopfloor.cli", "collector", "--listen", f"127.0.0.1:{port}",
                       "--db", str(db), "--log-level", "warning"],
                      f"http://127.0.0.1:{port}/-/ready", tmp_path / "collector.log")

    produced, _ = _run_outage(tmp_path, port, start_receiver)
    store = Store(str(db), read_only=True)
    try:
        series = store.select_series([Matcher("__name__", "=", catalog().prom(MARKER)),
                                      Matcher("source", "=", "efa"), Matcher("cluster", "=", "outage")])
        assert len(series) == 1
        samples = store.fetch([series[0][0]], 0, 2**62)
        assert list(samples.ts) == [t // 1_000_000 for t in produced]   # every collection, once
        assert set(samples.values) == {1.0}
    finally:
        store.close()
