"""`shopfloor cordon` and the HTTP API, on a real collector process and the real Slurm."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import yaml

from collector.remediate.audit import Audit
from collector.remediate.slurm import SlurmBackend
from collector.store.core import Store
from tests.remediate.helpers import NOW, failing, make
from tests.support import PYTHON, ROOT, free_port, running

TOKEN = "remediation-test-token"


def cordon(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "shopfloor", "cordon", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)


def test_list_audit_healthy_and_confirm_through_a_running_collector(slurm, tmp_path):
    db = tmp_path / "collector.duckdb"
    backend = SlurmBackend(slurm.scontrol, env={"SLURM_CONF": str(slurm.conf)})
    # a live drain decided earlier, stored in the collector's own database
    store = Store(str(db))
    rem = make(backend, store)
    rem.apply([failing("gpu-001"), failing("gpu-003", "6")], now=NOW)
    store.close()
    assert "DRAIN" in slurm.node_fields("gpu-001")["State"]

    port = free_port()
    cfg = tmp_path / "collector.yaml"
    cfg.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "db": str(db),
        "remediation": {"backend": "slurm", "dry_run": False, "slurm": {"scontrol": slurm.scontrol}}}))
    env = {**slurm.env, "SHOPFLOOR_COLLECTOR_TOKEN": TOKEN}
    url = f"http://127.0.0.1:{port}"
    with running([PYTHON, "-m", "shopfloor", "collector", "--config", str(cfg)], env=env, cwd=ROOT,
                 ready_url=f"{url}/-/healthy", log=tmp_path / "collector.log"):
        cli_env = {**env, "SHOPFLOOR_COLLECTOR_URL": url}
        out = cordon("list", "--json", env=cli_env)
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert [(r["node"], r["chip"], r["state"], r["dry_run"]) for r in rows] == [
            ("gpu-001", "3", "cordoned", False), ("gpu-003", "6", "cordoned", False)]
        table = cordon("list", env=cli_env).stdout
        assert "gpu-001" in table and "XID 79" in table

        # without the token: refused, nothing changes
        no_token = {k: v for k, v in cli_env.items() if k != "SHOPFLOOR_COLLECTOR_TOKEN"}
        out = cordon("healthy", "c1/gpu-001/3", "--by", "mallory", env=no_token)
        assert out.returncode == 1 and "401" in out.stderr
        assert "DRAIN" in slurm.node_fields("gpu-001")["State"]

        out = cordon("healthy", "c1/gpu-001/3", "--by", "dave", env=cli_env)
        assert out.returncode == 0, out.stderr
        assert "mark_healthy c1/gpu-001/3: done" in out.stdout
        assert "DRAIN" not in slurm.node_fields("gpu-001")["State"]

        out = cordon("confirm", "c1/gpu-003/6", "--by", "erin", "--mode", "hbm_uncorrectable",
                     "--note", "RMA 1234", "--at", "2026-11-20T04:10:00Z", env=cli_env)
        assert out.returncode == 0, out.stderr

        audit = json.loads(cordon("audit", "--json", "--limit", "10", env=cli_env).stdout)
        assert [(a["action"], a["outcome"], a["actor"]) for a in audit[:2]] == [
            ("confirm_failure", "done", "erin"), ("mark_healthy", "done", "dave")]

        headers = {"Authorization": f"Bearer {TOKEN}"}
        r = httpx.post(f"{url}/api/v1/cordons/c1/gpu-001/3/healthy", content=b"x" * 10000, headers=headers)
        assert r.status_code == 413
        r = httpx.post(f"{url}/api/v1/cordons/c1/gpu-001/3/healthy", json={}, headers=headers)
        assert r.status_code == 400 and "operator" in r.json()["error"]
        r = httpx.post(f"{url}/api/v1/cordons/c1/bad%20node/3/healthy", json={"by": "x"}, headers=headers)
        assert r.status_code == 400
        r = httpx.get(f"{url}/api/v1/remediation/audit", params={"node": "gpu-003"}, headers=headers)
        assert {a["action"] for a in r.json()["data"]} == {"cordon", "confirm_failure"}

    # collector stopped: the same answers straight from the DuckDB file
    out = cordon("list", "--db", str(db), "--json", env=os.environ.copy())
    assert [r["node"] for r in json.loads(out.stdout)] == ["gpu-003"]
    con = Store(str(db), read_only=True)
    assert con.con.execute("SELECT ts, node, chip, mode, confirmed_by FROM health_confirmed_failures").fetchall() == [
        (1795147800000, "gpu-003", "6", "hbm_uncorrectable", "erin")]
    assert len(Audit(con).history(100)) == 4
    con.close()


def test_cli_reports_bad_input_clearly(tmp_path):
    env = {**os.environ, "SHOPFLOOR_COLLECTOR_URL": "http://127.0.0.1:9"}
    out = cordon("healthy", "gpu-001", "--by", "x", env=env)
    assert out.returncode == 1 and "CLUSTER/NODE/CHIP" in out.stderr
    out = cordon("list", env=env)
    assert out.returncode == 1 and "cannot reach the collector" in out.stderr
    out = cordon("list", "--db", str(tmp_path / "missing.duckdb"), env=env)
    assert out.returncode == 1 and "no database" in out.stderr


def test_an_xid79_pushed_over_otlp_drains_through_the_collectors_live_health_job(slurm, tmp_path):
    """agent exporter (OTLP) -> collector -> live health job -> Remediator -> real scontrol."""
    import time

    from agent.export.otlp import OtlpSender, encode_request
    from agent.sources.base import point

    port = free_port()
    cfg = tmp_path / "collector.yaml"
    cfg.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "db": str(tmp_path / "c.duckdb"),
        "health": {"interval": 1, "jobs": "none"},
        "remediation": {"backend": "slurm", "dry_run": False, "budget": {"max_cluster_percent": 100}}}))
    url = f"http://127.0.0.1:{port}"
    with running([PYTHON, "-m", "shopfloor", "collector", "--config", str(cfg)], env=slurm.env, cwd=ROOT,
                 ready_url=f"{url}/-/healthy", log=tmp_path / "collector.log"):
        sender = OtlpSender(f"{url}/v1/metrics", compression="none")
        resource = {"cluster": "c1", "node": "gpu-002", "rack": "r1"}
        start = time.time_ns() - 60 * 10**9
        chips = [dict(chip=str(c), uuid=f"GPU-{c}", vendor="nvidia", model="H100") for c in range(8)]
        ok = sender.send(encode_request([point("hw.gpu.info", 1, **c) for c in chips]
                                        + [point("hw.gpu.utilization", 0.9, **c) for c in chips],
                                        resource, start, time.time_ns() - 5 * 10**9))
        assert ok.ok, ok
        ok = sender.send(encode_request([point("hw.gpu.xid.errors", 1, xid=79, **chips[6])], resource, start,
                                        time.time_ns()))
        assert ok.ok, ok
        deadline = time.monotonic() + 20
        while "DRAIN" not in slurm.node_fields("gpu-002")["State"]:
            assert time.monotonic() < deadline, (tmp_path / "collector.log").read_text()[-3000:]
            time.sleep(0.1)
        assert slurm.node_fields("gpu-002")["Reason"].startswith(
            "shopfloor: chip 6 (GPU-6): XID 79: GPU has fallen off the bus")
        out = cordon("list", "--json", env={**slurm.env, "SHOPFLOOR_COLLECTOR_URL": url})
        assert [(r["node"], r["chip"], r["state"]) for r in json.loads(out.stdout)] == [("gpu-002", "6", "cordoned")]
