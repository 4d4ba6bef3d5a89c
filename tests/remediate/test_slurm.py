"""Slurm remediation against a real slurmctld/slurmd started on 127.0.0.1 (see conftest.py)."""

from __future__ import annotations

import sys

import pytest

from collector.remediate.audit import Audit
from collector.remediate.base import Result
from collector.remediate.slurm import SlurmBackend
from collector.store.core import Store
from tests.remediate.helpers import NOW, chip, failing, healthy, make, storm


@pytest.fixture
def backend(slurm):
    return SlurmBackend(slurm.scontrol, env={"SLURM_CONF": str(slurm.conf)})


def drained(slurm, node):
    f = slurm.node_fields(node)
    return "DRAIN" in f["State"], f.get("Reason", "")


def test_failing_chip_drains_its_node_with_a_shopfloor_reason(slurm, backend):
    rem = make(backend)
    [d] = rem.apply([failing("gpu-001")], now=NOW + 5)
    assert (d.action, d.outcome, d.node, d.chip) == ("cordon", "done", "gpu-001", "3")
    is_drained, reason = drained(slurm, "gpu-001")
    assert is_drained
    assert reason.startswith("shopfloor:")
    assert "chip 3 (GPU-gpu-001-3)" in reason and "XID 79: GPU has fallen off the bus" in reason
    for other in ("gpu-002", "gpu-003", "gpu-004"):
        assert drained(slurm, other) == (False, "")
    # the same verdict again changes nothing and audits nothing new
    assert rem.apply([failing("gpu-001", at=NOW + 30)], now=NOW + 31) == []
    assert [c.key for c in rem.audit.cordons()] == ["c1/gpu-001/3"]


def test_fate_sharing_storm_drains_nothing(slurm, backend):
    rem = make(backend)
    # the health layer's fate-sharing verdicts, and failing verdicts of one job on many nodes
    decisions = rem.apply([storm(n, "job-42") for n in ("gpu-001", "gpu-002", "gpu-003")], now=NOW)
    decisions += rem.apply([failing(n, job="job-77", reason="XID 13: graphics engine exception")
                            for n in ("gpu-001", "gpu-002", "gpu-003", "gpu-004")], now=NOW + 1)
    assert len(decisions) == 7 and all(d.outcome == "refused" for d in decisions)
    assert all("fate-sharing" in " ".join(d.reasons) for d in decisions)
    for node in ("gpu-001", "gpu-002", "gpu-003", "gpu-004"):
        assert drained(slurm, node) == (False, "")
    assert rem.audit.cordons() == []


def test_human_drain_is_never_undone_nor_rewritten(slurm, backend):
    slurm.run("update", "NodeName=gpu-002", "State=DRAIN", "Reason=disk replaced by ops")
    rem = make(backend)
    [d] = rem.apply([failing("gpu-002")], now=NOW)
    assert d.outcome == "held_by_other"
    assert drained(slurm, "gpu-002") == (True, "disk replaced by ops")
    # healthy long enough, operator says healthy, direct backend calls: still the human's drain
    rem.apply([healthy("gpu-002", at=NOW + 10)], now=NOW + 10)
    rem.apply([healthy("gpu-002", at=NOW + 1000)], now=NOW + 1000)
    rem.mark_healthy("c1", "gpu-002", "3", by="alice", now=NOW + 1001)
    assert backend.uncordon(chip("gpu-002")) == Result.HELD_BY_OTHER
    assert backend.cordon(chip("gpu-002"), "shopfloor: chip 3: test") == Result.HELD_BY_OTHER
    assert drained(slurm, "gpu-002") == (True, "disk replaced by ops")


def test_budget_stops_the_third_new_drain_and_uncordon_still_works(slurm, backend):
    rem = make(backend, max_new_per_hour=2)
    out = [rem.apply([failing(n)], now=NOW + i)[0] for i, n in enumerate(["gpu-001", "gpu-002", "gpu-003"])]
    assert [d.outcome for d in out] == ["done", "done", "refused"]
    assert "rate budget" in " ".join(out[2].reasons)
    assert out[2].budget_state["new_last_hour"] == 2
    assert drained(slurm, "gpu-003") == (False, "")
    assert rem.budget.tripped.keys() == {"rate"}
    rows = {(m, tuple(sorted(lbl.items()))): v for m, lbl, _, v in rem.metric_rows(NOW + 3)}
    assert rows[("shopfloor_remediation_budget_tripped", (("scope", "rate"),))] == 1.0
    # a second chip on an already drained node needs no budget: the node is out already
    [second] = rem.apply([failing("gpu-001", "5")], now=NOW + 4)
    assert second.outcome == "already"
    reason = drained(slurm, "gpu-001")[1]
    assert "chip 5" in reason and "chip 3" in reason
    # un-cordoning still works while the budget is tripped
    d = rem.mark_healthy("c1", "gpu-002", "3", by="bob", now=NOW + 5)
    assert d.outcome == "done"
    assert drained(slurm, "gpu-002") == (False, "")


def test_rack_and_cluster_budgets(slurm, backend):
    rem = make(backend, max_nodes_per_rack=1, max_cluster_percent=50)
    a = rem.apply([failing("gpu-001")], now=NOW)[0]
    b = rem.apply([failing("gpu-002")], now=NOW + 1)[0]   # same rack r1
    c = rem.apply([failing("gpu-003")], now=NOW + 2)[0]   # rack r2: 16 of 32 chips = 50%, allowed
    d = rem.apply([failing("gpu-004")], now=NOW + 3)[0]   # 24 of 32 would exceed 50%
    assert [x.outcome for x in (a, b, c, d)] == ["done", "refused", "done", "refused"]
    assert "rack budget" in " ".join(b.reasons)
    assert "cluster budget" in " ".join(d.reasons)
    assert {"rack/r1", "cluster/c1", "rack/r2"} <= set(rem.budget.tripped)
    assert [drained(slurm, n)[0] for n in ("gpu-001", "gpu-002", "gpu-003", "gpu-004")] == [True, False, True, False]


def test_dry_run_changes_nothing_but_audits(slurm, backend):
    store = Store(":memory:")
    rem = make(backend, store, dry_run=True)
    [d] = rem.apply([failing("gpu-004")], now=NOW)
    assert (d.outcome, d.dry_run) == ("dry_run", True)
    assert drained(slurm, "gpu-004") == (False, "")
    [row] = Audit(store).history()
    assert row.outcome == "dry_run" and "would set slurm reason" in row.reasons[-1]
    assert rem.metric_rows(NOW)[0][0] == "shopfloor_remediation_cordoned"
    # dry-run reads the scheduler's state (read-only): a human's drain is reported, not touched
    slurm.run("update", "NodeName=gpu-003", "State=DRAIN", "Reason=firmware update")
    [h] = rem.apply([failing("gpu-003")], now=NOW)
    assert (h.outcome, h.dry_run) == ("held_by_other", True) and "firmware update" in h.reasons[-1]
    assert drained(slurm, "gpu-003") == (True, "firmware update")
    # the same store going live does not mistake the dry-run record for a real drain
    live = make(backend, store, dry_run=False)
    [d2] = live.apply([failing("gpu-004", at=NOW + 1)], now=NOW + 1)
    assert d2.outcome == "done" and drained(slurm, "gpu-004")[0]


def test_operator_marks_chip_healthy_and_it_resumes(slurm, backend):
    rem = make(backend)
    rem.apply([failing("gpu-003")], now=NOW)
    assert drained(slurm, "gpu-003")[0]
    d = rem.mark_healthy("c1", "gpu-003", "3", by="carol", now=NOW + 60)
    assert (d.action, d.outcome, d.actor) == ("mark_healthy", "done", "carol")
    assert drained(slurm, "gpu-003") == (False, "")
    assert rem.audit.cordons() == []
    assert rem.audit.history(1)[0].actor == "carol"


def test_stale_data_is_refused(slurm, backend):
    rem = make(backend, max_age_s=120)
    [d] = rem.apply([failing("gpu-001", at=NOW - 600)], now=NOW)
    assert d.outcome == "refused" and "stale data" in " ".join(d.reasons)
    assert drained(slurm, "gpu-001") == (False, "")


def test_return_to_service_after_healthy_window_and_verification(slurm, backend):
    rem = make(backend)
    # verification passes only for chip 3: a real command run with the chip's identity
    rem.verify_command = [sys.executable, "-c", "import sys; sys.exit(0 if sys.argv[1] == '3' else 1)", "{chip}"]
    rem.apply([failing("gpu-001", "3"), failing("gpu-002", "4")], now=NOW)
    assert drained(slurm, "gpu-001")[0] and drained(slurm, "gpu-002")[0]
    # healthy, but not yet for the whole window
    assert rem.apply([healthy("gpu-001", "3", at=NOW + 10), healthy("gpu-002", "4", at=NOW + 10)], now=NOW + 10) == []
    # a relapse breaks the streak
    rem.apply([failing("gpu-002", "4", at=NOW + 300)], now=NOW + 300)
    rem.apply([healthy("gpu-002", "4", at=NOW + 310)], now=NOW + 310)
    decisions = rem.apply([healthy("gpu-001", "3", at=NOW + 700), healthy("gpu-002", "4", at=NOW + 700)],
                          now=NOW + 700)
    assert [(d.node, d.action, d.outcome) for d in decisions] == [("gpu-001", "uncordon", "done")]
    assert "verification passed" in " ".join(decisions[0].reasons)
    assert drained(slurm, "gpu-001") == (False, "")
    assert drained(slurm, "gpu-002")[0]
    decisions = rem.apply([healthy("gpu-002", "4", at=NOW + 1000)], now=NOW + 1000)
    assert [(d.action, d.outcome) for d in decisions] == [("uncordon", "refused")]
    assert "verification failed" in " ".join(decisions[0].reasons)
    assert drained(slurm, "gpu-002")[0]


def test_node_names_are_validated_before_scontrol_runs(slurm, backend):
    for bad in ("gpu-001 State=RESUME", "gpu-001;reboot", "-h", "", "gpu/001"):
        with pytest.raises(ValueError):
            backend.cordon(chip(bad), "shopfloor: x")
    assert all(drained(slurm, n) == (False, "") for n in ("gpu-001", "gpu-002"))


def test_scontrol_failure_is_audited_as_failed_and_holds_nothing(slurm, backend):
    rem = make(backend)
    [d] = rem.apply([failing("gpu-999")], now=NOW)   # a node slurm does not know
    assert d.outcome == "refused" and "no chip inventory" in " ".join(d.reasons)
    rem.budget.inventory.chips_by_node[("c1", "gpu-999")] = 8
    [d] = rem.apply([failing("gpu-999", at=NOW + 1)], now=NOW + 1)
    assert d.outcome == "failed" and "slurm failed" in " ".join(d.reasons)
    assert rem.audit.cordons() == []


def test_verdict_from_the_health_xid_table_and_two_chips_on_one_node(slurm, backend):
    from collector.health.verdict import Verdict
    from collector.health.xid import classify
    rem = make(backend)
    xid79, xid48 = classify(79), classify(48)     # the health layer's reconciled XID table
    v79 = Verdict(chip("gpu-002", "1"), xid79.state, xid79.action, (xid79.reason,), "rule", NOW)
    v48 = Verdict(chip("gpu-002", "6"), xid48.state, xid48.action, (xid48.reason,), "rule", NOW + 1)
    assert [d.outcome for d in rem.apply([v79], now=NOW + 1)] == ["done"]
    assert [d.outcome for d in rem.apply([v48], now=NOW + 2)] == ["already"]
    reason = drained(slurm, "gpu-002")[1]
    assert reason.startswith("shopfloor: chip 6 (GPU-gpu-002-6): XID 48: double-bit ECC error; "
                             "chip 1 (GPU-gpu-002-1): XID 79: GPU has fallen off the bus")
    # releasing chip 1 keeps the node drained for chip 6, with chip 6's reason only
    d = rem.mark_healthy("c1", "gpu-002", "1", by="ops", now=NOW + 3)
    assert d.outcome == "done" and "node stays held for chip(s) 6" in d.reasons
    assert drained(slurm, "gpu-002") == (True, "shopfloor: chip 6 (GPU-gpu-002-6): XID 48: double-bit ECC error")
    rem.mark_healthy("c1", "gpu-002", "6", by="ops", now=NOW + 4)
    assert drained(slurm, "gpu-002") == (False, "")


def test_a_node_level_verdict_drains_the_node_as_a_whole(slurm, backend):
    from collector.health.verdict import Action, ChipRef, State, Verdict
    rem = make(backend)
    v = Verdict(ChipRef("c1", "gpu-004", "", rack="r2"), State.FAILING, Action.DRAIN,
                ("EFA port rdmap16s27 down for 10 minutes",), "rule", NOW)
    [d] = rem.apply([v], now=NOW + 1)
    assert (d.chip, d.outcome) == ("node", "done")
    assert drained(slurm, "gpu-004") == (True, "shopfloor: node: EFA port rdmap16s27 down for 10 minutes")
    assert rem.mark_healthy("c1", "gpu-004", "node", by="ops", now=NOW + 2).outcome == "done"
    assert drained(slurm, "gpu-004") == (False, "")


def test_old_evidence_does_not_redrain_a_chip_an_operator_marked_healthy(slurm, backend):
    from collector.remediate.api import confirm_failure
    rem = make(backend)
    rem.apply([failing("gpu-001")], now=NOW)
    rem.mark_healthy("c1", "gpu-001", "3", by="alice", now=NOW + 60)
    # the health layer still says failing (it holds a fatal XID's verdict for a day)
    [d] = rem.apply([failing("gpu-001", at=NOW + 120)], now=NOW + 120)
    assert d.outcome == "refused" and "marked healthy by alice" in " ".join(d.reasons)
    assert drained(slurm, "gpu-001") == (False, "")
    # an operator confirms a real failure: the override ends, the next verdict drains
    confirm_failure(rem.audit, "c1", "gpu-001", "3", "bob", "off_bus", "", NOW + 200)
    [d] = rem.apply([failing("gpu-001", at=NOW + 210)], now=NOW + 210)
    assert d.outcome == "done" and drained(slurm, "gpu-001")[0]
