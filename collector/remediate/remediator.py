"""Turns health verdicts into scheduler actions, behind the safety budget, with an audit trail.

    Remediator(backend, budget, audit, dry_run=True).apply(verdicts, now) -> [Decision]

is the one entry point: the collector's live health job calls it after each evaluation, and the
node-local paths (health-check, benchmarks) call it too. Rules, in order:

  1. fate-sharing verdicts never cordon (also the same job failing on `storm_nodes` nodes in one
     batch, a second line of defence behind the health layer's own fate-sharing check);
  2. verdicts on stale data are refused;
  3. a new node hold must fit the budget (cluster %, nodes per rack, new holds per hour); a
     second chip on a node Shopfloor already holds takes nothing more out of service;
  4. dry-run (the default) records what it would do and touches no scheduler;
  5. a held chip returns to service after its verdicts were healthy for `healthy_window_s` and
     the optional verification command succeeded; an operator can mark it healthy at once, and
     then old evidence does not cordon it again for `operator_override_s` (a confirmed failure
     ends that early).
Every decision, made or refused, is written to remediation_audit; a refusal repeated unchanged
is written again only after `repeat_audit_s`, so a chip refused every 30 s does not flood it.
"""

from __future__ import annotations

import subprocess
import threading
from dataclasses import replace
import time
from collections import Counter
from typing import Callable, Iterable, Sequence

from agent.catalog import catalog
from collector.health.verdict import Action, ChipRef, State, Verdict
from collector.remediate.audit import Audit, Cordon, Decision
from collector.remediate.base import REASON_PREFIX, Backend, BackendError, Result, clean_reason
from collector.remediate.budget import Budget, Inventory

MetricRows = list[tuple[str, dict[str, str], int, float | None]]

OUT_OF_SERVICE_STATES = (State.FAILING, State.DEGRADED)
NODE_CHIP = "node"   # the chip id under which node-level verdicts (chip "") are held and audited


class _SafeFormat(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


class Remediator:
    def __init__(self, backend: Backend, budget: Budget, audit: Audit, *, dry_run: bool = True,
                 healthy_window_s: float = 3600.0, verify_command: Sequence[str] | None = None,
                 verify_timeout_s: float = 600.0, storm_nodes: int = 3, repeat_audit_s: float = 600.0,
                 metrics_sink: Callable[[MetricRows], object] | None = None,
                 inventory_loader: Callable[[], Inventory] | None = None, inventory_refresh_s: float = 60.0,
                 operator_override_s: float = 24 * 3600.0):
        self.backend = backend
        self.budget = budget
        self.audit = audit
        self.dry_run = dry_run
        self.healthy_window_s = healthy_window_s
        self.verify_command = list(verify_command) if verify_command else None
        self.verify_timeout_s = verify_timeout_s
        self.storm_nodes = storm_nodes
        self.repeat_audit_s = repeat_audit_s
        self.metrics_sink = metrics_sink
        # After an operator marks a chip healthy, the same (old) evidence must not cordon it again
        # at the next evaluation: the health layer keeps a fatal XID's verdict for a day. New
        # cordons for that chip wait this long, or until an operator confirms a failure.
        self.operator_override_s = operator_override_s
        # Where the budget's chip counts come from (the collector's hw.gpu.info series), re-read
        # at most every inventory_refresh_s; without a loader the budget's inventory is fixed.
        self.inventory_loader = inventory_loader
        self.inventory_refresh_s = inventory_refresh_s
        self._inventory_at = float("-inf")
        self.lock = threading.RLock()
        self.counts: Counter[tuple[str, str]] = Counter()
        self._last_audit: dict[str, tuple[str, str, str, float]] = {}   # chip -> (action, outcome, kind, ts)
        self._was_tripped: set[str] = set()
        self._was_cordoned: set[tuple] = set()

    # ------------------------------------------------------------------ entry points
    def apply(self, verdicts: Iterable[Verdict], now: float | None = None) -> list[Decision]:
        now = time.time() if now is None else now
        with self.lock:
            self._refresh_inventory()
            latest: dict[str, Verdict] = {}
            for v in verdicts:
                if not v.chip.chip:   # a node-level verdict (e.g. EFA port down): the node is the unit
                    v = replace(v, chip=replace(v.chip, chip=NODE_CHIP))
                old = latest.get(v.chip.key)
                if old is None or v.observed_at >= old.observed_at:
                    latest[v.chip.key] = v
            storm_jobs = self._storm_jobs(latest.values())
            # One read of the (small) cordon table per evaluation, not one query per chip: the
            # health job hands over every chip of the site, almost all of them healthy and unheld.
            held_now = {c.key: c for c in self.audit.cordons()}
            out: list[Decision] = []
            for v in latest.values():
                d = self._decide(v, now, storm_jobs, held_now.get(v.chip.key))
                if d is not None:
                    out.append(d)
            self.budget.refresh_tripped(self.audit.cordons(dry_run=self.dry_run), self._new_last_hour(now))
            self._emit(now)
            return out

    def mark_healthy(self, cluster: str, node: str, chip: str, by: str, now: float | None = None) -> Decision:
        """An operator says the chip is fine: release it now (no window, no verification)."""
        now = time.time() if now is None else now
        if not by or not by.strip():
            raise ValueError("mark healthy needs the operator's name (--by NAME)")
        with self.lock:
            held = self.audit.get(cluster, node, chip)
            if held is None:
                d = self._record(now, ChipRef(cluster, node, chip), "mark_healthy", "noop", self.dry_run,
                                 [f"marked healthy by {by}; Shopfloor held nothing for this chip"], actor=by)
            else:
                d = self._release(held, now, [f"marked healthy by {by}"], actor=by, action="mark_healthy")
            self.audit.set_override(cluster, node, chip, actor=by, ts=now, until=now + self.operator_override_s)
            self._last_audit.pop(f"{cluster}/{node}/{chip}", None)
            self.budget.refresh_tripped(self.audit.cordons(dry_run=self.dry_run), self._new_last_hour(now))
            self._emit(now)
            return d

    def _refresh_inventory(self) -> None:
        if self.inventory_loader is not None and time.monotonic() - self._inventory_at >= self.inventory_refresh_s:
            self.budget.inventory = self.inventory_loader()
            self._inventory_at = time.monotonic()

    # ------------------------------------------------------------------ decisions
    def _storm_jobs(self, verdicts: Iterable[Verdict]) -> set[str]:
        nodes_by_job: dict[str, set[str]] = {}
        for v in verdicts:
            if v.job and self._wants_out(v):
                nodes_by_job.setdefault(v.job, set()).add(f"{v.chip.cluster}/{v.chip.node}")
        return {job for job, nodes in nodes_by_job.items() if len(nodes) >= self.storm_nodes}

    @staticmethod
    def _wants_out(v: Verdict) -> bool:
        return v.state in OUT_OF_SERVICE_STATES and v.action.takes_out_of_service

    def _decide(self, v: Verdict, now: float, storm_jobs: set[str], held: Cordon | None) -> Decision | None:
        chip = v.chip
        if held is not None and held.dry_run != self.dry_run:
            held = None   # a record from the other mode (dry-run before going live) does not count
        if v.source == "fate-sharing" or (v.action == Action.RESTART_APP and v.state in OUT_OF_SERVICE_STATES):
            return self._refuse(now, chip, [*v.reasons, "fate-sharing event: an application or fabric "
                                            "problem, not a bad chip; no cordon"], {}, kind="fate-sharing")
        if self._wants_out(v):
            if held is not None and held.healthy_since is not None:
                held.healthy_since = None
                self.audit.put(held)
            if held is not None and held.state == "cordoned":
                return None
            if v.job in storm_jobs:
                return self._refuse(now, chip, [*v.reasons, f"job {v.job} reports the same trouble on "
                                                f"{self.storm_nodes} or more nodes at once: treated as "
                                                "fate-sharing; no cordon"], {}, kind="storm")
            override = self.audit.override(chip.cluster, chip.node, chip.chip, now)
            if override is not None:
                by, at, until = override
                return self._refuse(now, chip, [*v.reasons, f"marked healthy by {by} "
                                                f"{(now - at) / 3600:.1f} h ago: no new cordon for this chip for "
                                                f"{(until - now) / 3600:.1f} h more (or until a failure is confirmed)"],
                                    {}, kind="override")
            age = now - v.observed_at
            if self.budget.is_stale(v, now):
                return self._refuse(now, chip, [*v.reasons, f"stale data: newest sample is {age:.0f}s old "
                                                f"(limit {self.budget.config.max_age_s:.0f}s); no cordon"], {},
                                    kind="stale")
            return self._cordon(v, held, now)
        if held is None:
            return None
        if v.state == State.HEALTHY and not self.budget.is_stale(v, now):
            return self._maybe_return(held, v, now)
        if held.healthy_since is not None:   # anything but fresh health breaks the healthy streak
            held.healthy_since = None
            self.audit.put(held)
        return None

    def _cordon(self, v: Verdict, held: Cordon | None, now: float) -> Decision | None:
        chip = v.chip
        cause = "; ".join(v.reasons) or f"{v.state.value} ({v.source})"
        chip_reason = ("node" if chip.chip == NODE_CHIP else f"chip {chip.chip}") + \
            (f" ({chip.uuid})" if chip.uuid else "") + f": {cause}"
        all_held = self.audit.cordons(dry_run=self.dry_run)
        same_node = [c for c in all_held if c.cluster == chip.cluster and c.node == chip.node
                     and c.chip != chip.chip and c.state == "cordoned"]
        node_reason = clean_reason(f"{REASON_PREFIX} " + "; ".join([chip_reason, *(c.reason for c in same_node)]))
        new_hold = not same_node
        state = {"new_hold": new_hold}
        if new_hold:
            check = self.budget.check_new_hold(chip.cluster, chip.node, chip.rack, all_held,
                                               self._new_last_hour(now))
            state.update(check.state)
            if not check.allowed:
                return self._refuse(now, chip, [*v.reasons, *check.reasons, "no cordon"], state,
                                    kind="budget:" + ",".join(check.tripped))
        record = Cordon(chip.cluster, chip.node, chip.chip, chip.uuid, chip.rack, self.backend.name,
                        "cordoned", self.dry_run, now, chip_reason)
        reasons = [*v.reasons, f"source: {v.source}" + (f", risk {v.risk:.2f}" if v.risk is not None else "")]
        if self.dry_run:
            # Reading the scheduler's state changes nothing and tells what going live would do.
            try:
                st = self.backend.status(chip.node)
            except (BackendError, ValueError) as exc:
                reasons.append(f"dry run: could not read {self.backend.name} state: {exc}")
            else:
                if st.drained and not st.by_us:
                    record.state = "held_by_other"
                    self.audit.put(record)
                    return self._refuse(now, chip, [*reasons, f"dry run: the node is already held by someone "
                                                    f"else ({st.reason}); it would be left as it is"], state,
                                        outcome="held_by_other", kind="held_by_other")
            self.audit.put(record)
            return self._record(now, chip, "cordon", "dry_run", True,
                                [*reasons, f"dry run: would set {self.backend.name} reason {node_reason!r}"], state)
        try:
            result = self.backend.cordon(chip, node_reason)
        except (BackendError, ValueError) as exc:
            return self._refuse(now, chip, [*reasons, f"{self.backend.name} failed: {exc}"], state,
                                outcome="failed", kind="failed")
        if result == Result.HELD_BY_OTHER:
            if held is None:
                record.state = "held_by_other"
                self.audit.put(record)
            return self._refuse(now, chip, [*reasons, "the node is already held by someone else; "
                                            "their hold and reason are left as they are"], state,
                                outcome="held_by_other", kind="held_by_other")
        self.audit.put(record)
        outcome = "done" if new_hold else "already"
        if not new_hold:
            reasons.append(f"node already held by Shopfloor; reason now {node_reason!r}")
        return self._record(now, chip, "cordon", outcome, False, reasons, state)

    def _maybe_return(self, held: Cordon, v: Verdict, now: float) -> Decision | None:
        if held.healthy_since is None:
            held.healthy_since = v.observed_at
            self.audit.put(held)
        if now - held.healthy_since < self.healthy_window_s:
            return None
        reasons = [f"healthy for {now - held.healthy_since:.0f}s (window {self.healthy_window_s:.0f}s)"]
        if self.verify_command:
            ok, detail = self._verify(held)
            if not ok:
                held.healthy_since = now   # try again after another full window
                self.audit.put(held)
                return self._record(now, ChipRef(held.cluster, held.node, held.chip), "uncordon", "refused",
                                    self.dry_run, [*reasons, f"verification failed: {detail}"])
            reasons.append(f"verification passed: {detail}")
        return self._release(held, now, reasons)

    def _verify(self, held: Cordon) -> tuple[bool, str]:
        fmt = _SafeFormat(cluster=held.cluster, node=held.node, chip=held.chip, uuid=held.uuid)
        cmd = [arg.format_map(fmt) for arg in self.verify_command or ()]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=self.verify_timeout_s)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"{cmd[0]}: {exc}"
        tail = (out.stdout + out.stderr).strip().splitlines()[-1:] or [""]
        return out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode} {tail[0][:200]}".strip()

    def _release(self, held: Cordon, now: float, reasons: list[str], *, actor: str = "shopfloor",
                 action: str = "uncordon") -> Decision:
        chip = ChipRef(held.cluster, held.node, held.chip, held.uuid, held.rack)
        if held.dry_run:
            self.audit.remove(held.cluster, held.node, held.chip)
            return self._record(now, chip, action, "dry_run", True,
                                [*reasons, "dry run: would resume the node"], actor=actor)
        if held.state != "cordoned":
            self.audit.remove(held.cluster, held.node, held.chip)
            return self._record(now, chip, action, "held_by_other", False,
                                [*reasons, "the node is held by someone else; left as it is"], actor=actor)
        others = [c for c in self.audit.cordons(dry_run=False) if c.cluster == held.cluster
                  and c.node == held.node and c.chip != held.chip and c.state == "cordoned"]
        try:
            # When other chips of the node are still held the node stays out, with their reason.
            still = clean_reason(f"{REASON_PREFIX} " + "; ".join(c.reason for c in others)) if others else ""
            result = self.backend.uncordon(chip, still)
            outcome = {Result.DONE: "done", Result.ALREADY: "done", Result.NOT_HELD: "noop",
                       Result.HELD_BY_OTHER: "held_by_other"}[result]
            if others:
                reasons.append(f"node stays held for chip(s) {', '.join(c.chip for c in others)}")
            if result == Result.HELD_BY_OTHER:
                reasons.append("someone else now holds the node; their hold is left as it is")
            elif result == Result.NOT_HELD:
                reasons.append("the node was already back in service")
        except (BackendError, ValueError) as exc:
            return self._record(now, chip, action, "failed", False,
                                [*reasons, f"{self.backend.name} failed: {exc}"], actor=actor)
        self.audit.remove(held.cluster, held.node, held.chip)
        return self._record(now, chip, action, outcome, False, reasons, actor=actor)

    # ------------------------------------------------------------------ audit and metrics
    def _refuse(self, now: float, chip: ChipRef, reasons: list[str], state: dict, *, kind: str,
                outcome: str = "refused") -> Decision | None:
        """Audit a refusal, unless one of the same kind was audited for this chip recently
        (the kind, not the text: the text carries ages and counts that change every time)."""
        last = self._last_audit.get(chip.key)
        if last is not None and last[:3] == ("cordon", outcome, kind) and now - last[3] < self.repeat_audit_s:
            return None
        d = self._record(now, chip, "cordon", outcome, self.dry_run, reasons, state)
        self._last_audit[chip.key] = ("cordon", outcome, kind, now)
        return d

    def _record(self, now: float, chip: ChipRef, action: str, outcome: str, dry_run: bool,
                reasons: list[str], state: dict | None = None, *, actor: str = "shopfloor") -> Decision:
        d = Decision(now, chip.cluster, chip.node, chip.chip, action, outcome, dry_run, self.backend.name,
                     list(reasons), dict(state or {}), actor)
        self.audit.record(d)
        self._last_audit[chip.key] = (action, outcome, "", now)
        self.counts[(action, outcome)] += 1
        return d

    def _new_last_hour(self, now: float) -> int:
        return self.audit.count_new_cordons(now - 3600.0, dry_run=self.dry_run)

    def metric_rows(self, now: float) -> MetricRows:
        """The remediation gauges and counters, as rows for the collector's Writer."""
        cat = catalog()
        ts = int(now * 1000)
        rows: MetricRows = []
        cordoned = {tuple(sorted({"cluster": c.cluster, "node": c.node, "rack": c.rack, "chip": c.chip,
                                  "uuid": c.uuid, "backend": c.backend}.items()))
                    for c in self.audit.cordons(dry_run=self.dry_run) if c.state == "cordoned"}
        for labels in sorted(cordoned | self._was_cordoned):
            # a released chip gets a staleness marker, so the gauge ends instead of lingering
            rows.append((cat.prom("shopfloor.remediation.cordoned"), dict(labels), ts,
                         1.0 if labels in cordoned else None))
        self._was_cordoned = cordoned
        tripped = set(self.budget.tripped)
        for scope in tripped | self._was_tripped:
            rows.append((cat.prom("shopfloor.remediation.budget.tripped"), {"scope": scope}, ts,
                         1.0 if scope in tripped else 0.0))
        self._was_tripped = tripped
        for (action, outcome), n in sorted(self.counts.items()):
            rows.append((cat.prom("shopfloor.remediation.decisions"),
                         {"action": action, "outcome": outcome}, ts, float(n)))
        return rows

    def _emit(self, now: float) -> None:
        if self.metrics_sink is not None:
            self.metrics_sink(self.metric_rows(now))
