"""Budget arithmetic, configuration, scontrol output parsing, audit and metrics (no servers)."""

from __future__ import annotations

import pytest

from collector.config import ConfigError
from collector.remediate.audit import Audit, Cordon, Decision
from collector.remediate.base import clean_reason
from collector.remediate.budget import Budget, BudgetConfig, Inventory
from collector.remediate.service import build
from collector.remediate.slurm import is_drained, parse_show_node
from collector.store.core import Store
from collector.store.writer import Writer
from tests.remediate.helpers import NOW, failing, inventory


def held(node: str, rack: str, cluster: str = "c1", state: str = "cordoned") -> Cordon:
    return Cordon(cluster, node, "0", "", rack, "slurm", state, False, NOW, "x")


def test_cluster_budget_counts_whole_nodes():
    b = Budget(BudgetConfig(max_cluster_percent=25, max_nodes_per_rack=9, max_new_per_hour=9), inventory())
    assert b.check_new_hold("c1", "gpu-001", "r1", [], 0).allowed             # 8 of 32 = 25%
    chk = b.check_new_hold("c1", "gpu-002", "r1", [held("gpu-001", "r1")], 1)  # 16 of 32
    assert not chk.allowed and chk.tripped == ("cluster/c1",)
    assert chk.state["chips_out"] == 8 and chk.state["cluster_chips"] == 32
    # held_by_other nodes are not Shopfloor's holds and cost nothing
    assert b.check_new_hold("c1", "gpu-002", "r1", [held("gpu-001", "r1", state="held_by_other")], 0).allowed
    # other clusters' holds do not count against this one
    other = Budget(BudgetConfig(max_cluster_percent=25), Inventory({("c1", "a"): 8, ("c1", "b"): 8, ("c1", "c"): 8,
                                                                    ("c1", "d"): 8, ("c2", "x"): 8}))
    assert other.check_new_hold("c1", "a", "r1", [held("x", "r7", cluster="c2")], 0).allowed


def test_tripped_scopes_clear_when_room_returns():
    b = Budget(BudgetConfig(max_cluster_percent=100, max_nodes_per_rack=1, max_new_per_hour=1), inventory())
    chk = b.check_new_hold("c1", "gpu-002", "r1", [held("gpu-001", "r1")], 1)
    assert set(chk.tripped) == {"rack/r1", "rate"}
    b.refresh_tripped([held("gpu-001", "r1")], 1)
    assert set(b.tripped) == {"rack/r1", "rate"}
    b.refresh_tripped([], 0)
    assert b.tripped == {}


def test_zero_budget_and_unknown_inventory_refuse():
    b = Budget(BudgetConfig(max_cluster_percent=0), inventory())
    assert not b.check_new_hold("c1", "gpu-001", "r1", [], 0).allowed
    b = Budget(BudgetConfig(), Inventory({}))
    chk = b.check_new_hold("c1", "gpu-001", "r1", [], 0)
    assert not chk.allowed and "no chip inventory" in chk.reasons[0]


def test_inventory_from_the_collector_store():
    store = Store(":memory:")
    Writer(store).write([("hw_gpu_info", {"cluster": "c1", "node": n, "chip": str(c), "uuid": f"{n}-{c}"}, 1000, 1.0)
                         for n in ("a", "b") for c in range(8)])
    inv = Inventory.from_store(store)
    assert inv.cluster_chips("c1") == 16 and inv.node_chips("c1", "a") == 8


def test_budget_config_validation():
    cfg = BudgetConfig.from_dict({"max_cluster_percent": 5, "max_nodes_per_rack": 2, "max_new_per_hour": 3,
                                  "max_age": "2m"})
    assert (cfg.max_cluster_percent, cfg.max_nodes_per_rack, cfg.max_new_per_hour, cfg.max_age_s) == (5, 2, 3, 120)
    for bad in ({"max_cluster_percent": 150}, {"max_age": "soon"}, {"max_new_per_hour": "many"}, {"nodes": 1}):
        with pytest.raises(ConfigError):
            BudgetConfig.from_dict(bad)


def test_service_config_validation():
    store = Store(":memory:")
    rem = build({}, store)
    assert rem.dry_run is True and rem.backend.name == "slurm" and rem.healthy_window_s == 3600
    for bad in ({"backend": "pagerduty"}, {"dry_run": "no"}, {"verify_command": "dcgmi diag -r 2"},
                {"webhook": {"url": "https://x"}, "backend": "webhook"}, {"colour": "red"}):
        with pytest.raises(ConfigError):
            build(bad, store, env={})
    hook = build({"backend": "webhook", "webhook": {"url": "https://ops/hook"}}, store,
                 env={"SHOPFLOOR_WEBHOOK_SECRET": "k"})
    assert hook.backend.name == "webhook"


def test_parse_scontrol_show_node():
    line = ("NodeName=gpu-001 Arch=x86_64 CoresPerSocket=1 Gres=gpu:8 OS=Linux 6.1 #1 SMP PREEMPT_DYNAMIC "
            "State=MIXED+DRAIN ThreadsPerCore=1 Partitions=gpu Reason=shopfloor: chip 3: XID=79 bad "
            "[root@2026-11-23T18:23:41] Comment=(null)\n")
    f = parse_show_node(line)
    assert f["NodeName"] == "gpu-001" and f["State"] == "MIXED+DRAIN" and f["OS"] == "Linux 6.1 #1 SMP PREEMPT_DYNAMIC"
    assert f["Reason"] == "shopfloor: chip 3: XID=79 bad" and f["Comment"] == "(null)"
    assert parse_show_node("NodeName=x State=IDLE\n").get("Reason") is None
    assert [is_drained(s) for s in ("IDLE+DRAIN", "DRAINED", "DOWN*+DRAIN", "IDLE", "DOWN*", "ALLOCATED")] == [
        True, True, True, False, False, False]


def test_clean_reason():
    assert clean_reason("disk\nreplaced\x00 now") == "shopfloor: disk replaced now"
    assert clean_reason("shopfloor: x") == "shopfloor: x"
    assert len(clean_reason("shopfloor: " + "y" * 1000)) == 400


def test_audit_round_trip_and_rate_count():
    audit = Audit(Store(":memory:"))
    audit.record(Decision(NOW, "c1", "n1", "0", "cordon", "done", False, "slurm", ["a"], {"new_hold": True}))
    audit.record(Decision(NOW + 1, "c1", "n1", "1", "cordon", "done", False, "slurm", ["b"], {"new_hold": False}))
    audit.record(Decision(NOW + 2, "c1", "n2", "0", "cordon", "refused", False, "slurm", ["c"], {"new_hold": True}))
    assert audit.count_new_cordons(NOW - 10, dry_run=False) == 1
    assert audit.count_new_cordons(NOW + 0.5, dry_run=False) == 0
    [latest] = audit.history(1)
    assert (latest.ts, latest.reasons, latest.outcome) == (NOW + 2, ["c"], "refused")
    assert [d.chip for d in audit.history(10, node="n1")] == ["1", "0"]


def test_repeated_refusals_are_audited_once_per_window():
    from collector.remediate.webhook import WebhookBackend
    # the backend is never reached: the verdicts are stale
    rem = build({"backend": "webhook", "dry_run": False, "webhook": {"url": "http://127.0.0.1:9/x"}},
                Store(":memory:"), env={"SHOPFLOOR_WEBHOOK_SECRET": "k"})
    assert isinstance(rem.backend, WebhookBackend)
    old = failing("gpu-001", at=NOW - 3600)
    assert len(rem.apply([old], now=NOW)) == 1
    assert rem.apply([old], now=NOW + 30) == []
    assert len(rem.apply([old], now=NOW + 700)) == 1
    assert len(rem.audit.history(10)) == 2


def test_metric_rows_are_catalog_names_the_writer_accepts():
    from collector.remediate.webhook import WebhookBackend
    store = Store(":memory:")
    rem = build({"backend": "webhook", "dry_run": True, "budget": {"max_cluster_percent": 100},
                 "webhook": {"url": "http://127.0.0.1:9/x"}}, store, env={"SHOPFLOOR_WEBHOOK_SECRET": "k"},
                metrics_sink=Writer(store).write)
    assert isinstance(rem.backend, WebhookBackend)
    rem.inventory_loader = lambda: inventory()
    [d] = rem.apply([failing("gpu-001")], now=NOW)
    assert d.outcome == "dry_run"
    got = store.con.execute("SELECT s.metric, s.labels['chip'], v.value FROM samples v JOIN series s "
                            "ON s.id = v.series_id ORDER BY 1").fetchall()
    assert ("shopfloor_remediation_cordoned", "3", 1.0) in got
    assert ("shopfloor_remediation_decisions_total", None, 1.0) in got
    rem.mark_healthy("c1", "gpu-001", "3", by="ops", now=NOW + 5)
    last = store.con.execute("SELECT v.value FROM samples v JOIN series s ON s.id = v.series_id "
                             "WHERE s.metric = 'shopfloor_remediation_cordoned' ORDER BY v.ts DESC LIMIT 1").fetchone()
    assert last == (None,)   # staleness marker: the cordon ended
