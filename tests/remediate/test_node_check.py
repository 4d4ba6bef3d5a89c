"""`shopfloor health-check` on recorded kernel logs / NVML, draining a node of the real Slurm."""

from __future__ import annotations

import copy
import os
import json
import shutil
import subprocess
import time

import pytest

from agent.sources.nvml import NvmlSource
from collector.health.node_check import NodeCheck
from collector.remediate.slurm import SlurmBackend
from tests.agent.nvml_replay import NvmlReplay
from tests.support import FIXTURES, PYTHON, ROOT, stop

PROCFS = FIXTURES / "procfs"
XID79_GPU0 = "4,{seq},{usec},-;NVRM: Xid (PCI:0000:1b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.\n"
APP_ONLY = "".join(
    f"4,{100 + i},{1000 + i},-;NVRM: Xid (PCI:0000:1b:00): {code}, pid=2231, name=python3, application fault\n"
    for i, code in enumerate([13, 31, 43, 45, 13, 999]))


def health_check(slurm, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "shopfloor", "health-check", "--procfs", str(PROCFS), "--no-nvml",
                           "--cluster", "c1", *args], capture_output=True, text=True, env=slurm.env, cwd=ROOT,
                          timeout=60)


@pytest.fixture
def kmsg(tmp_path):
    path = tmp_path / "kmsg"
    shutil.copy(FIXTURES / "kmsg" / "kmsg.log", path)
    return path


def test_fatal_xids_in_the_kernel_log_drain_the_node_once_per_boot(slurm, kmsg, tmp_path):
    state = tmp_path / "state"
    out = health_check(slurm, "--node", "gpu-001", "--kmsg", str(kmsg), "--state-dir", str(state))
    assert out.returncode == 1, out.stdout + out.stderr
    f = slurm.node_fields("gpu-001")
    assert "DRAIN" in f["State"]
    reason = f["Reason"]
    # the recorded log has XID 48 on bus 52 (chip 2) and XID 79 + 154 on bus 9d (chip 4)
    assert reason.startswith("shopfloor: health-check: chip 4 (")
    assert "chip 4 (GPU-2fa91425-cb00-4853-9d2c-67eda13ffe79): XID 79: GPU has fallen off the bus" in reason
    assert "XID 48: double-bit ECC error" in reason
    for harmless in ("XID 13", "XID 94", "XID 999"):
        assert harmless not in reason
    # an operator fixes and resumes the node: the same old log lines do not drain it again
    slurm.run("update", "NodeName=gpu-001", "State=RESUME")
    out = health_check(slurm, "--node", "gpu-001", "--kmsg", str(kmsg), "--state-dir", str(state))
    assert out.returncode == 0 and "already acted on" in out.stdout
    assert "DRAIN" not in slurm.node_fields("gpu-001")["State"]
    # a new XID 79 does
    with open(kmsg, "a") as f:
        f.write(XID79_GPU0.format(seq=5000, usec=9000000000))
    out = health_check(slurm, "--node", "gpu-001", "--kmsg", str(kmsg), "--state-dir", str(state))
    assert out.returncode == 1
    assert "chip 0 (GPU-db5b5fab" in slurm.node_fields("gpu-001")["Reason"]


def test_application_and_unknown_xids_never_drain(slurm, tmp_path):
    log = tmp_path / "kmsg"
    log.write_text(APP_ONLY)
    out = health_check(slurm, "--node", "gpu-002", "--kmsg", str(log))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "XID 999" in out.stdout and "unknown XID" in out.stdout   # reported and watched
    assert "DRAIN" not in slurm.node_fields("gpu-002")["State"]


def test_a_human_drain_is_left_alone(slurm, kmsg):
    slurm.run("update", "NodeName=gpu-003", "State=DRAIN", "Reason=bad PSU, ticket 99")
    out = health_check(slurm, "--node", "gpu-003", "--kmsg", str(kmsg))
    assert out.returncode == 1 and "held_by_other" in out.stdout
    assert slurm.node_fields("gpu-003")["Reason"] == "bad PSU, ticket 99"


def test_dry_run_and_bad_input(slurm, kmsg, tmp_path):
    out = health_check(slurm, "--node", "gpu-004", "--kmsg", str(kmsg), "--dry-run")
    assert out.returncode == 1 and "would drain gpu-004" in out.stdout
    assert "DRAIN" not in slurm.node_fields("gpu-004")["State"]
    out = health_check(slurm, "--node", "gpu-004;reboot", "--kmsg", str(kmsg))
    assert out.returncode == 2 and "invalid node name" in out.stderr
    out = health_check(slurm, "--node", "gpu-004", "--kmsg", str(tmp_path / "missing"))
    assert out.returncode == 3 and "could not run" in out.stdout
    out = health_check(slurm, "--node", "gpu-999", "--kmsg", str(kmsg))   # slurm does not know it
    assert out.returncode == 3 and "failed" in out.stdout


def test_nvml_row_remap_failure_and_recovery_action_drain(slurm):
    recording = json.loads((FIXTURES / "nvml" / "recorded_b200x8.json").read_text())
    rec = copy.deepcopy(recording)
    for dev in rec["devices"]:                   # a healthy machine first
        dev["calls"]["nvmlDeviceGetRemappedRows"] = [0, 0, 0, 0]
        dev["calls"]["nvmlDeviceGetFieldValues"]["230"]["value"] = 0
    backend = SlurmBackend(slurm.scontrol, env={"SLURM_CONF": str(slurm.conf)})
    logs: list[str] = []
    check = NodeCheck(backend, "gpu-002", "c1", nvml_source=NvmlSource(NvmlReplay(rec), xid_events=False),
                      log=logs.append)
    assert check.run_once() == 0
    assert "DRAIN" not in slurm.node_fields("gpu-002")["State"]
    rec["devices"][2]["calls"]["nvmlDeviceGetRemappedRows"] = [3, 1, 0, 1]        # remap failed
    rec["devices"][5]["calls"]["nvmlDeviceGetFieldValues"]["230"]["value"] = 2     # node reboot
    check = NodeCheck(backend, "gpu-002", "c1", nvml_source=NvmlSource(NvmlReplay(rec), xid_events=False),
                      log=logs.append)
    assert check.run_once() == 1
    reason = slurm.node_fields("gpu-002")["Reason"]
    assert "chip 2" in reason and "row remap failed" in reason
    assert "chip 5" in reason and "NVML recovery action 2: driver requires a node reboot" in reason


@pytest.mark.timeout(60)
def test_follow_drains_as_soon_as_the_xid_line_appears(slurm, tmp_path):
    log = tmp_path / "kmsg"
    log.write_text(APP_ONLY)
    proc = subprocess.Popen([PYTHON, "-m", "shopfloor", "health-check", "--follow", "--procfs", str(PROCFS),
                             "--no-nvml", "--node", "gpu-004", "--kmsg", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=slurm.env,
                            cwd=ROOT, start_new_session=True)
    try:
        first_pass = [proc.stdout.readline() for _ in range(4)]   # 3 watch lines, then "following"
        assert first_pass[-1].startswith("following"), first_pass
        with open(log, "a") as f:
            f.write(XID79_GPU0.format(seq=6000, usec=9100000000))
        deadline = time.monotonic() + 10
        while "DRAIN" not in slurm.node_fields("gpu-004")["State"]:
            assert time.monotonic() < deadline, "not drained within 10 s"
            time.sleep(0.05)
        assert "XID 79" in slurm.node_fields("gpu-004")["Reason"]
    finally:
        stop(proc)
        proc.stdout.close()


@pytest.mark.timeout(120)
def test_slurmd_runs_it_as_its_health_check_program(tmp_path):
    """slurm.conf HealthCheckProgram -> `shopfloor health-check` -> the node drains itself."""
    from tests.remediate.conftest import require_slurm_lab
    from tests.remediate.slurmlab import slurm_lab
    require_slurm_lab()
    kmsg = tmp_path / "kmsg"
    shutil.copy(FIXTURES / "kmsg" / "kmsg.log", kmsg)
    script = tmp_path / "shopfloor-health-check"
    os.chmod(tmp_path, 0o755)
    with slurm_lab(["gpu-hc1"], extra_conf=[f"HealthCheckProgram={script}", "HealthCheckInterval=1",
                                            "HealthCheckNodeState=ANY"]) as lab:
        # what a site installs (slurmd runs it as root with SLURMD_NODENAME set and a scrubbed
        # environment; SLURM_CONF is only needed because this cluster's slurm.conf is not in /etc)
        script.write_text(f"#!/bin/sh\nSLURM_CONF={lab.conf} exec {PYTHON} -m shopfloor health-check --no-nvml "
                          f"--cluster c1 --kmsg {kmsg} --procfs {PROCFS} --state-dir {tmp_path}/state "
                          f">> {tmp_path}/hc.log 2>&1\n")
        script.chmod(0o755)
        deadline = time.monotonic() + 60
        while "DRAIN" not in lab.node_fields("gpu-hc1")["State"]:
            assert time.monotonic() < deadline, (tmp_path / "hc.log").read_text()[-2000:]
            time.sleep(0.2)
        assert lab.node_fields("gpu-hc1")["Reason"].startswith("shopfloor: health-check: chip 4 (GPU-2fa91425")


def test_collector_rule_verdicts_drain_through_health_check(slurm, tmp_path):
    """--collector: a real collector's live health job judged an XID 79 pushed over OTLP."""
    import yaml

    from agent.export.otlp import OtlpSender, encode_request
    from agent.sources.base import point
    from tests.support import free_port, running

    token = "node-check-token"
    port = free_port()
    cfg = tmp_path / "collector.yaml"
    cfg.write_text(yaml.safe_dump({"listen": f"127.0.0.1:{port}", "db": str(tmp_path / "c.duckdb"),
                                   "health": {"interval": 1, "jobs": "none"}}))
    url = f"http://127.0.0.1:{port}"
    empty = tmp_path / "kmsg"
    empty.write_text("")
    env = {**slurm.env, "SHOPFLOOR_COLLECTOR_TOKEN": token}
    with running([PYTHON, "-m", "shopfloor", "collector", "--config", str(cfg)], env=env, cwd=ROOT,
                 ready_url=f"{url}/-/healthy", log=tmp_path / "collector.log"):
        sender = OtlpSender(f"{url}/v1/metrics", headers={"Authorization": f"Bearer {token}"}, compression="none")
        chips = [dict(chip=str(c), uuid=f"GPU-{c}", vendor="nvidia", model="H100") for c in range(8)]
        resource = {"cluster": "c1", "node": "gpu-001", "rack": "r1"}
        start = time.time_ns() - 60 * 10**9
        assert sender.send(encode_request([point("hw.gpu.utilization", 0.5, **c) for c in chips], resource, start,
                                          time.time_ns() - 5 * 10**9)).ok
        assert sender.send(encode_request([point("hw.gpu.xid.errors", 1, xid=95, **chips[2])], resource, start,
                                          time.time_ns())).ok
        time.sleep(2.5)   # the live health job (every second) has judged it
        args = ["--node", "gpu-001", "--kmsg", str(empty), "--collector", url]
        out = health_check(slurm, *args)   # no token: the collector refuses, the local checks still ran
        assert out.returncode == 0 and "collector: skipped" in out.stdout and "401" in out.stdout
        out = subprocess.run([PYTHON, "-m", "shopfloor", "health-check", "--procfs", str(PROCFS), "--no-nvml",
                              "--cluster", "c1", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert out.returncode == 1, out.stdout + out.stderr
    reason = slurm.node_fields("gpu-001")["Reason"]
    assert reason.startswith("shopfloor: health-check: chip 2 (GPU-2): XID 95: uncontained uncorrectable ECC error")
    assert reason.endswith("(collector)")
