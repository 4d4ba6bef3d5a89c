"""Small builders shared by the remediation tests."""

from __future__ import annotations

from collector.health.verdict import Action, ChipRef, State, Verdict
from collector.remediate.audit import Audit
from collector.remediate.budget import Budget, BudgetConfig, Inventory
from collector.remediate.remediator import Remediator
from collector.store.core import Store

NODES = [f"gpu-{i:03d}" for i in range(1, 5)]
RACK = {"gpu-001": "r1", "gpu-002": "r1", "gpu-003": "r2", "gpu-004": "r2"}
NOW = 1_790_000_000.0


def chip(node: str, idx: str = "3", cluster: str = "c1") -> ChipRef:
    return ChipRef(cluster, node, idx, uuid=f"GPU-{node}-{idx}", rack=RACK.get(node, "r9"),
                   vendor="nvidia", model="H100")


def failing(node: str, idx: str = "3", *, at: float = NOW, source: str = "rule", job: str | None = None,
            reason: str = "XID 79: GPU has fallen off the bus") -> Verdict:
    return Verdict(chip(node, idx), State.FAILING, Action.REBOOT_NODE, (reason,), source, at, job=job)


def healthy(node: str, idx: str = "3", *, at: float = NOW) -> Verdict:
    return Verdict(chip(node, idx), State.HEALTHY, Action.NONE, ("no fault signals",), "rule", at)


def storm(node: str, job: str, *, at: float = NOW) -> Verdict:
    return Verdict(chip(node, "0"), State.WATCH, Action.RESTART_APP,
                   (f"XID 13 on many nodes of job {job} at once",), "fate-sharing", at, job=job)


def inventory(nodes=NODES, chips: int = 8, cluster: str = "c1") -> Inventory:
    return Inventory({(cluster, n): chips for n in nodes})


def make(backend, store: Store | None = None, *, dry_run: bool = False, **budget) -> Remediator:
    store = store or Store(":memory:")
    cfg = BudgetConfig(**{"max_cluster_percent": 100.0, "max_nodes_per_rack": 10, "max_new_per_hour": 10,
                          **budget})
    return Remediator(backend, Budget(cfg, inventory()), Audit(store), dry_run=dry_run,
                      healthy_window_s=600.0)
