"""From stored samples to Slurm: the collector's store (D's Writer) -> the health layer's rules
and fate-sharing (G1: read_hours / evaluate / verdicts, job membership from the real squeue)
-> Remediator -> scontrol on the real slurmctld."""

from __future__ import annotations

import subprocess
import time

import pytest

from agent.catalog import catalog
from collector.health.evaluate import evaluate, verdicts
from collector.health.fate import jobs_from_squeue
from collector.health.features import HOUR_MS, StoreSource, read_hours
from collector.remediate.audit import Audit
from collector.remediate.budget import Budget, BudgetConfig, Inventory
from collector.remediate.remediator import Remediator
from collector.remediate.slurm import SlurmBackend
from collector.store.core import Store
from collector.store.writer import Writer
from tests.remediate.helpers import NODES, RACK
from tests.support import require_binary


def fleet_store(now_ms: int) -> Store:
    """Three hours of a healthy 4-node x 8-GPU fleet, as the agents would have sent it."""
    cat = catalog()
    store = Store(":memory:")
    rows = []
    for node in NODES:
        for c in range(8):
            labels = {"cluster": "c1", "node": node, "rack": RACK[node], "chip": str(c),
                      "uuid": f"GPU-{node}-{c}", "vendor": "nvidia", "model": "H100"}
            for t in range(now_ms - 3 * HOUR_MS, now_ms, 120_000):
                rows.append((cat.prom("hw.gpu.utilization"), labels, t, 0.9))
                rows.append((cat.prom("hw.gpu.info"), labels, t, 1.0))
    assert Writer(store).write(rows).accepted == len(rows)
    return store


def xid(store: Store, node: str, chip: str, code: int, ts_ms: int) -> None:
    labels = {"cluster": "c1", "node": node, "rack": RACK[node], "chip": chip, "uuid": f"GPU-{node}-{chip}",
              "vendor": "nvidia", "model": "H100", "xid": str(code)}
    Writer(store).write([(catalog().prom("hw.gpu.xid.errors"), labels, ts_ms - 60_000, 0.0),
                         (catalog().prom("hw.gpu.xid.errors"), labels, ts_ms, 1.0)])


def health_verdicts(store: Store, now_ms: int, jobs=None):
    rollup, events = read_hours(StoreSource(store), now_ms - 3 * HOUR_MS, now_ms + 1)
    return verdicts(evaluate(rollup, events, jobs, None), None)


def remediator(slurm, store: Store) -> Remediator:
    budget = Budget(BudgetConfig(max_cluster_percent=50, max_nodes_per_rack=2, max_new_per_hour=5),
                    Inventory({}))
    return Remediator(SlurmBackend(slurm.scontrol, env={"SLURM_CONF": str(slurm.conf)}), budget, Audit(store),
                      dry_run=False, inventory_loader=lambda: Inventory.from_store(store))


def test_an_xid79_sample_drains_its_node_through_the_health_rules(slurm):
    now_ms = int(time.time() * 1000)
    store = fleet_store(now_ms)
    xid(store, "gpu-003", "5", 79, now_ms - 30_000)
    xid(store, "gpu-001", "2", 13, now_ms - 30_000)       # an application error: no drain
    decisions = remediator(slurm, store).apply(health_verdicts(store, now_ms), now=now_ms / 1000)
    assert [(d.node, d.chip, d.action, d.outcome) for d in decisions] == [("gpu-003", "5", "cordon", "done")]
    fields = slurm.node_fields("gpu-003")
    assert "DRAIN" in fields["State"]
    assert fields["Reason"].startswith("shopfloor: chip 5 (GPU-gpu-003-5): XID 79: GPU has fallen off the bus")
    assert decisions[0].budget_state["cluster_chips"] == 32       # inventory read from hw_gpu_info
    assert all("DRAIN" not in slurm.node_fields(n)["State"] for n in ("gpu-001", "gpu-002", "gpu-004"))


def test_an_xid_storm_on_the_nodes_of_one_real_job_drains_nothing(slurm, monkeypatch):
    for tool in ("sbatch", "squeue", "scancel"):
        require_binary(tool)
    # environment only: the health layer's squeue/scontrol calls find this test cluster
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    job = subprocess.run(["sbatch", "--parsable", "-N", "3", "-w", "gpu-001,gpu-002,gpu-003", "-o", "/dev/null",
                          "--wrap", "sleep 300"], env=slurm.env, capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.monotonic() + 30
        while True:
            jobs = jobs_from_squeue()
            if len(jobs) == 3:
                break
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.2)
        assert sorted(jobs["node"]) == ["gpu-001", "gpu-002", "gpu-003"] and set(jobs["job"]) == {job}
        now_ms = int(time.time() * 1000)
        store = fleet_store(now_ms)
        for i, node in enumerate(("gpu-001", "gpu-002", "gpu-003")):
            xid(store, node, str(i), 79, now_ms - 40_000 + i * 5_000)    # the same XID within 10 s
        out = health_verdicts(store, now_ms, jobs)
        [storm] = [v for v in out if v.source == "fate-sharing"]
        assert storm.job == job
        decisions = remediator(slurm, store).apply(out, now=now_ms / 1000)
        assert [d.outcome for d in decisions] == ["refused"]
        assert "fate-sharing" in " ".join(decisions[0].reasons)
        for node in NODES:
            assert "DRAIN" not in slurm.node_fields(node)["State"]
    finally:
        subprocess.run(["scancel", job], env=slurm.env, check=False)
        deadline = time.monotonic() + 30
        while subprocess.run(["squeue", "-h"], env=slurm.env, capture_output=True, text=True).stdout.strip():
            if time.monotonic() > deadline:
                pytest.fail("job not cancelled")
            time.sleep(0.2)
