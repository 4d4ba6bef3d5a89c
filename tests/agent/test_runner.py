"""The agent as it runs: `shopfloor agent --config` as a process (push + /metrics + clean
SIGTERM), and XID events pushed at once, before the next collection."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.request

from agent.catalog import catalog
from agent.config import parse
from agent.runner import Agent
from tests.agent.otlp_server import serve_in_thread
from tests.support import FIXTURES, PYTHON, ROOT, free_port, stop, wait_http

NO_HW = {"nvml": {"enabled": False}, "dcgm": {"enabled": False}, "neuron": {"enabled": False}}


def test_agent_process_pushes_serves_and_stops_cleanly(tmp_path):
    receiver = serve_in_thread(token="node-token")
    metrics_port = free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(json.dumps({   # JSON is YAML
        "labels": {"cluster": "proc", "node": "n7", "rack": "r2"},
        "sysfs_root": str(FIXTURES / "sysfs"), "procfs_root": str(FIXTURES / "procfs"),
        "kmsg_path": str(FIXTURES / "kmsg" / "kmsg.log"),
        "ipmitool_command": [str(FIXTURES / "ipmitool" / "fake-ipmitool")],
        "collector_endpoint": f"http://127.0.0.1:{receiver.server_address[1]}",
        "interval": "300ms", "listen": f"127.0.0.1:{metrics_port}",
        "spool_dir": str(tmp_path / "spool"), "state_dir": str(tmp_path / "state"), "sources": NO_HW}))
    env = {"SHOPFLOOR_AGENT_TOKEN": "node-token", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([PYTHON, "-m", "shopfloor.cli", "agent", "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{metrics_port}/metrics", 30, proc)
        deadline = time.monotonic() + 30
        while len(receiver.requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(receiver.requests) >= 3
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert f'{catalog().prom("hw.gpu.xid.errors")}{{chip="4"' in body
        assert f'{catalog().prom("shopfloor.agent.export.requests")}{{cluster="proc",node="n7",outcome="success",rack="r2"}}' in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        stop(proc)
        receiver.shutdown()
        receiver.server_close()
    # the token from the environment authenticated every push (the receiver answers 401 otherwise)
    assert all(r["headers"]["Authorization"] == "Bearer node-token" for r in receiver.requests)
    # a scheduled collection (an XID event push may come first: the log already has XIDs)
    batch = next(r for r in receiver.requests if any(p[0] == "shopfloor.agent.scrape.success" for p in r["points"]))
    names = {p[0] for p in batch["points"]}
    assert {"hw.efa.port.stat", "hw.gpu.xid.errors", "hw.host.temperature"} <= names
    labels = next(p[1] for p in batch["points"] if p[0] == "hw.gpu.xid.errors")
    assert labels["cluster"] == "proc" and labels["service.instance.id"] == "n7"


def test_xid_event_is_pushed_before_the_next_collection(tmp_path):
    receiver = serve_in_thread()
    kmsg = tmp_path / "kmsg.log"
    shutil.copy(FIXTURES / "kmsg" / "kmsg.log", kmsg)
    cfg = parse({
        "labels": {"cluster": "ev", "node": "n1"}, "sysfs_root": str(tmp_path), "procfs_root": str(FIXTURES / "procfs"),
        "kmsg_path": str(kmsg), "ipmitool_command": [str(tmp_path / "none")],
        "collector_endpoint": f"http://127.0.0.1:{receiver.server_address[1]}/v1/metrics",
        "interval": "1h", "listen": "", "spool_dir": str(tmp_path / "spool"), "state_dir": str(tmp_path / "state"),
        "sources": {**NO_HW, "efa": {"enabled": False}, "power": {"enabled": False}},
    }, env={})
    agent = Agent(cfg)
    agent.start()
    try:
        agent.collect_once()
        assert agent.shipper.wait_idle(10)
        before = len(receiver.requests)
        with open(kmsg, "a") as f:   # the driver logs a new XID 79 on GPU 2 (bus 52)
            f.write("4,1300,8000000000,-;NVRM: Xid (PCI:0000:52:00): 79, pid='<unknown>', name=<unknown>, "
                    "GPU has fallen off the bus.\n")
        deadline = time.monotonic() + 10
        while len(receiver.requests) == before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert agent.collections == 1                       # no collection happened meanwhile
        event = receiver.requests[before]["points"]
        assert [(p[0], p[1]["chip"], p[1]["xid"], p[3]) for p in event] == [("hw.gpu.xid.errors", "2", "79", 1.0)]
    finally:
        agent.stop()
        receiver.shutdown()
        receiver.server_close()


def test_agent_that_cannot_bind_metrics_exits_with_the_reason(tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = tmp_path / "agent.yaml"
        cfg.write_text(json.dumps({"labels": {"cluster": "c"}, "listen": f"127.0.0.1:{taken.getsockname()[1]}",
                                   "collector_endpoint": "", "sources": {n: {"enabled": False} for n in
                                   ("nvml", "dcgm", "neuron", "efa", "power", "xid")}}))
        proc = subprocess.run([PYTHON, "-m", "shopfloor.cli", "agent", "--config", str(cfg)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "shopfloor agent: cannot start:" in proc.stderr and "Address already in use" in proc.stderr


def test_agent_runs_without_the_collector_stack(tmp_path):
    """The agent never imports collector/ nor the collector's dependencies: with them made
    unimportable, `scrape --once` still works."""
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(json.dumps({"labels": {"cluster": "c", "node": "n"}, "sysfs_root": str(FIXTURES / "sysfs"),
                               "ipmitool_command": [str(FIXTURES / "ipmitool" / "fake-ipmitool")],
                               "sources": {n: {"enabled": False} for n in ("nvml", "dcgm", "neuron", "xid")}}))
    blocked = ["collector", "duckdb", "fastapi", "uvicorn", "polars", "numpy", "pyarrow", "sklearn", "apscheduler"]
    code = ("import sys\n"
            f"for m in {blocked!r}: sys.modules[m] = None  # import of any of them raises ImportError\n"
            "from shopfloor.cli import main\n"
            f"sys.exit(main(['agent', 'scrape', '--once', '--config', {str(cfg)!r}]))\n")
    proc = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f'{catalog().prom("shopfloor.agent.scrape.success")}{{cluster="c",node="n",source="efa"}} 1.0' in proc.stdout
