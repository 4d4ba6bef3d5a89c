"""`shopfloor health-check`: the node-local health check, for Slurm's HealthCheckProgram.

Runs on a GPU node with the agent's own sources pointed at the node's roots:

  * XidSource (agent/sources/xid.py) reads the kernel log since boot; each XID code is judged
    by the reconciled table in collector/health/xid.py (the same decision the collector's
    rules make): only codes that are fatal on their own (79 fallen off the bus, 48 double-bit
    ECC, 64 remap failure, 95, 119/120, 140, ...) drain. Application XIDs (13, 31, 43, 45 ...)
    and unknown codes never do.
  * NvmlSource (agent/sources/nvml.py), when NVML is present: a failed row remap, or a driver
    recovery action (field 230) that asks for a reset or a reboot, drains.
  * With --collector URL, the collector's deterministic rule verdicts for this node
    (GET /api/v1/health/chips?node=..) that take a chip out of service drain too; model
    predictions and fate-sharing stay with the collector's budgeted Remediator.

When something is fatal the node is drained with `scontrol update NodeName=<node> State=DRAIN
Reason="shopfloor: chip N (uuid): XID 79: ..."` through the Slurm backend, so an operator's drain
is never touched. Each fatal signal is acted on once per boot: with --state-dir the check keeps
which XID counts it already drained for, so after an operator resumes the node the same old
kernel-log lines do not drain it again (a new XID does).

`--follow` keeps running and drains as soon as a fatal XID line appears (the XID source's
event path), instead of at the next HealthCheckInterval.

Exit status: 0 nothing fatal (or nothing new); 1 fatal signal found and the node drained (or
already held); 2 usage error; 3 the check or the drain could not be done.

This path does not go through the collector's budget: it only acts on signals that make the
GPU unusable anyway, on its own node. Everything predictive stays with the collector.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from agent.sources.base import Point
from collector.health.verdict import Action, ChipRef, State
from collector.health.xid import RECOVERY_ACTIONS, classify

STATE_FILE = "health-check.json"


@dataclass(frozen=True)
class Finding:
    chip: ChipRef
    state: State
    action: Action
    reason: str
    key: str          # what identifies the signal, e.g. "xid:0000:9d:00:79"
    count: int        # its counter value now (an XID count grows with each new event)

    @property
    def fatal(self) -> bool:
        return self.state in (State.FAILING, State.DEGRADED) and self.action.takes_out_of_service


def xid_findings(points: Iterable[Point], cluster: str, node: str) -> list[Finding]:
    """Findings from hw.gpu.xid.errors points, judged by collector.health.xid's table."""
    out = []
    for p in points:
        if p.name != "hw.gpu.xid.errors":
            continue
        a = p.attributes
        code = int(a.get("xid", "0"))
        verdict = classify(code)
        chip = ChipRef(cluster, node, a.get("chip", "") or "unknown", uuid=a.get("uuid", ""),
                       vendor=a.get("vendor", ""), model=a.get("model", ""))
        out.append(Finding(chip, verdict.state, verdict.action, verdict.reason,
                           f"xid:{chip.chip}:{chip.uuid}:{code}", int(p.value)))
    return out


def nvml_findings(points: Iterable[Point], cluster: str, node: str) -> list[Finding]:
    """Findings from NVML: failed row remap, and the driver's own recovery action."""
    out = []
    for p in points:
        a = p.attributes
        chip = ChipRef(cluster, node, a.get("chip", ""), uuid=a.get("uuid", ""),
                       vendor=a.get("vendor", ""), model=a.get("model", ""))
        if p.name == "hw.gpu.row_remap.failure" and p.value >= 1:
            out.append(Finding(chip, State.FAILING, Action.RESET_GPU,
                               "row remap failed: the GPU memory needs service",
                               f"row_remap_failure:{chip.chip}:{chip.uuid}", 1))
        elif p.name == "hw.gpu.recovery_action" and int(p.value) in RECOVERY_ACTIONS and p.value >= 1:
            state, action, words = RECOVERY_ACTIONS[int(p.value)]
            out.append(Finding(chip, state, action, f"NVML recovery action {int(p.value)}: {words}",
                               f"recovery_action:{chip.chip}:{chip.uuid}:{int(p.value)}", 1))
    return out


def collector_findings(url: str, cluster: str, node: str, *, token: str | None = None,
                       timeout: float = 10.0) -> list[Finding]:
    """The collector's current verdicts for this node (GET /api/v1/health/chips?node=..).

    Only deterministic rule verdicts that take the chip out of service count: the learned risk
    model's predictions and fate-sharing stay with the collector's Remediator, behind its
    fleet-wide budget, which a single node cannot see."""
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode({"node": node, **({"cluster": cluster} if cluster else {})})
    req = urllib.request.Request(f"{url.rstrip('/')}/api/v1/health/chips?{query}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:   # raises on HTTP errors
        doc = json.loads(resp.read(8 << 20))
    out = []
    for v in (doc.get("data") or {}).get("verdicts", []):
        state, action = State(v["state"]), Action(v["action"])
        if v.get("source") != "rule" or v.get("node") != node:
            continue
        chip = ChipRef(v.get("cluster", cluster), node, v.get("chip") or "node", uuid=v.get("uuid", ""),
                       rack=v.get("rack", ""), vendor=v.get("vendor", ""), model=v.get("model", ""))
        reason = "; ".join(v.get("reasons") or []) or state.value
        out.append(Finding(chip, state, action, f"{reason} (collector)", f"collector:{chip.chip}:{chip.uuid}:{reason}", 1))
    return out


class ActedState:
    """Which fatal signals were already drained for, this boot (a small JSON file)."""

    def __init__(self, state_dir: str | Path | None, boot_id: str):
        self.path = Path(state_dir) / STATE_FILE if state_dir else None
        self.boot_id = boot_id
        self.acted: dict[str, int] = {}
        if self.path and self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
                if doc.get("boot_id") == boot_id:
                    self.acted = {str(k): int(v) for k, v in doc.get("acted", {}).items()}
            except (OSError, ValueError):
                self.acted = {}   # a damaged file: act again rather than never

    def is_new(self, f: Finding) -> bool:
        return f.count > self.acted.get(f.key, 0)

    def mark(self, findings: Iterable[Finding]) -> None:
        for f in findings:
            self.acted[f.key] = max(f.count, self.acted.get(f.key, 0))
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": 1, "boot_id": self.boot_id, "acted": self.acted}))
            os.replace(tmp, self.path)


def drain_reason(fatal: list[Finding]) -> str:
    """One line: per chip its uuid and causes, the chip needing the most drastic action first."""
    severity = {Action.REBOOT_NODE: 0, Action.RESET_GPU: 1, Action.DRAIN: 2}
    by_chip: dict[str, list[Finding]] = {}
    for f in sorted(fatal, key=lambda f: (severity.get(f.action, 3), f.chip.chip, f.key)):
        by_chip.setdefault(f.chip.chip, []).append(f)
    parts = []
    for chip, items in by_chip.items():
        uuid = items[0].chip.uuid
        parts.append(f"chip {chip}" + (f" ({uuid})" if uuid else "") + ": " + ", ".join(f.reason for f in items))
    return "shopfloor: health-check: " + "; ".join(parts)


class NodeCheck:
    """One node's check: gather findings, drain for the new fatal ones, remember them."""

    def __init__(self, backend, node: str, cluster: str = "", *, xid_source=None, nvml_source=None,
                 collector_url: str | None = None, collector_token: str | None = None,
                 state_dir: str | Path | None = None, procfs_root: str | Path = "/proc", dry_run: bool = False,
                 log=print):
        self.backend = backend
        self.node = node
        self.cluster = cluster
        self.xid_source = xid_source
        self.nvml_source = nvml_source
        self.collector_url = collector_url
        self.collector_token = collector_token
        self.dry_run = dry_run
        self.log = log
        try:
            boot_id = (Path(procfs_root) / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
        except OSError:
            boot_id = ""
        self.acted = ActedState(state_dir, boot_id)
        self.lock = threading.Lock()

    def findings(self) -> list[Finding]:
        out: list[Finding] = []
        if self.xid_source is not None:
            out += xid_findings(self.xid_source.collect(), self.cluster, self.node)
        if self.nvml_source is not None:
            ok, why = self.nvml_source.supported()
            if ok:
                out += nvml_findings(self.nvml_source.collect(), self.cluster, self.node)
            else:
                self.log(f"nvml: skipped ({why})")
        if self.collector_url:
            try:
                out += collector_findings(self.collector_url, self.cluster, self.node, token=self.collector_token)
            except (OSError, ValueError, KeyError) as exc:
                # the local checks still count when the collector is unreachable
                self.log(f"collector: skipped ({exc})")
        return out

    def act(self, findings: list[Finding]) -> int:
        """Drain for new fatal findings; the exit status (0, 1 or 3)."""
        with self.lock:
            fatal = [f for f in findings if f.fatal]
            new = [f for f in fatal if self.acted.is_new(f)]
            for f in findings:
                if not f.fatal and f.state != State.HEALTHY:
                    self.log(f"watch: chip {f.chip.chip}: {f.reason}")
            if not new:
                if fatal:
                    self.log(f"{len(fatal)} fatal signal(s) already acted on this boot; nothing new")
                return 0
            reason = drain_reason(new)
            if self.dry_run:
                self.log(f"dry run: would drain {self.node}: {reason}")
                return 1
            from collector.remediate.base import BackendError
            try:
                result = self.backend.cordon(new[0].chip, reason)
            except (BackendError, ValueError) as exc:
                self.log(f"drain of {self.node} failed: {exc}")
                return 3
            self.log(f"{result.value}: {self.node}: {reason}")
            self.acted.mark(new)
            return 1

    def run_once(self) -> int:
        try:
            findings = self.findings()
        except Exception as exc:  # noqa: BLE001 - unreadable log, NVML failure: say so, exit 3
            self.log(f"health check could not run: {exc}")
            return 3
        return self.act(findings)

    def on_xid_points(self, points: list[Point]) -> int:
        """The XID source's event sink: judge just these counters at once."""
        return self.act(xid_findings(points, self.cluster, self.node))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shopfloor health-check",
                                description="node health check (Slurm HealthCheckProgram): drains on fatal GPU signals")
    p.add_argument("--node", default=os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0],
                   help="Slurm node name (default $SLURMD_NODENAME or the short hostname)")
    p.add_argument("--cluster", default="", help="cluster name (for the reason text)")
    p.add_argument("--kmsg", default="/dev/kmsg", help="kernel log (default /dev/kmsg)")
    p.add_argument("--procfs", default="/proc", help="procfs root (GPU bus ids, boot id)")
    p.add_argument("--state-dir", default=None,
                   help="remember what was acted on this boot (e.g. /var/lib/shopfloor)")
    p.add_argument("--no-nvml", action="store_true", help="skip the NVML checks")
    p.add_argument("--collector", metavar="URL",
                   help="also take the collector's rule verdicts for this node (token: $SHOPFLOOR_COLLECTOR_TOKEN)")
    p.add_argument("--scontrol", default="scontrol", help="scontrol program (a path; no arguments)")
    p.add_argument("--dry-run", action="store_true", help="report what would be drained; drain nothing")
    p.add_argument("--follow", action="store_true", help="keep running; drain as soon as a fatal XID appears")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from agent.sources.xid import XidSource
    from collector.remediate.base import validate_node
    from collector.remediate.slurm import SlurmBackend

    try:
        validate_node(args.node)
    except ValueError as exc:
        print(f"shopfloor health-check: {exc}", file=sys.stderr)
        return 2
    nvml_source: Any = None
    if not args.no_nvml:
        try:
            from agent.sources.nvml import NvmlSource
            nvml_source = NvmlSource(xid_events=False)
        except Exception as exc:  # noqa: BLE001 - no NVML library on this node
            print(f"nvml: skipped ({exc})")
    xid = XidSource(args.kmsg, args.procfs)   # no dedupe state: the whole log since boot
    check = NodeCheck(SlurmBackend([args.scontrol]), args.node, args.cluster, xid_source=xid,
                      nvml_source=nvml_source, collector_url=args.collector,
                      collector_token=os.environ.get("SHOPFLOOR_COLLECTOR_TOKEN"),
                      state_dir=args.state_dir, procfs_root=args.procfs,
                      dry_run=args.dry_run, log=lambda m: print(m, flush=True))
    status = check.run_once()
    if not args.follow:
        return status
    xid.start_events(check.on_xid_points)
    print(f"following {args.kmsg} for node {args.node}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        xid.stop_events()
