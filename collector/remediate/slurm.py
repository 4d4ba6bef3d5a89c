"""Slurm backend: drain and resume nodes with `scontrol`.

Always an argument list (never a shell string), node names checked against a strict pattern,
and every reason starts with "shopfloor:" and names the chip and the cause. A drain whose reason
does not start with "shopfloor:" is somebody else's (an operator's, or Slurm's own health
check): it is never resumed and its reason is never rewritten.

The scontrol command is a list so sites (and tests) can point it at their own wrapper or add
options, e.g. ["scontrol", "--cluster", "gpu-a"] or ["sudo", "-n", "scontrol"].
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Mapping, Sequence

from collector.health.verdict import ChipRef
from collector.remediate.base import (REASON_PREFIX, BackendError, NodeStatus, Result, clean_reason,
                                      validate_node)

# `scontrol show node -o` prints one line of Key=Value pairs; values may contain spaces (OS,
# Comment), so a value runs until the next " Key=" token. Reason is free text (it may itself
# contain "Key=") and Slurm ends it with " [user@time]", so it is cut out first.
_FIELD = re.compile(r"(?:^|\s)([A-Z][A-Za-z0-9_./]*)=")
_REASON = re.compile(r"(?:^|\s)Reason=(.*?)(?:\s*\[[^\]\s]*@[^\]\s]*\])(?=\s|$)")


def parse_show_node(text: str) -> dict[str, str]:
    """Fields of the first node in `scontrol show node -o` output (Reason without its stamp)."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    reason = _REASON.search(line)
    if reason:
        line = line[:reason.start()] + line[reason.end():]
    matches = list(_FIELD.finditer(line))
    fields: dict[str, str] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        fields.setdefault(m.group(1), line[m.end():end].strip())
    if reason:
        fields["Reason"] = reason.group(1).strip()
    return fields


def is_drained(state: str) -> bool:
    """State is e.g. IDLE+DRAIN, MIXED+DRAIN, DOWN+DRAIN+NOT_RESPONDING, DRAINED, DRAINING."""
    flags = re.split(r"[+*~#!%$@^-]", state.upper())
    return any(f.startswith("DRAIN") for f in flags)


class SlurmBackend:
    name = "slurm"

    def __init__(self, scontrol: Sequence[str] = ("scontrol",), *, env: Mapping[str, str] | None = None,
                 timeout: float = 15.0):
        if not scontrol:
            raise ValueError("scontrol command must not be empty")
        self.scontrol = list(scontrol)
        self.env = dict(env) if env is not None else None
        self.timeout = timeout

    def _run(self, args: list[str]) -> str:
        env = {**os.environ, **self.env} if self.env is not None else None
        try:
            out = subprocess.run([*self.scontrol, *args], capture_output=True, text=True,
                                 timeout=self.timeout, env=env, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"{self.scontrol[0]} {args[0]}: {exc}") from exc
        if out.returncode != 0:
            msg = (out.stderr or out.stdout).strip().splitlines()
            raise BackendError(f"scontrol {' '.join(args[:2])} failed ({out.returncode}): "
                               f"{msg[-1] if msg else 'no output'}")
        return out.stdout

    def status(self, node: str) -> NodeStatus:
        fields = parse_show_node(self._run(["show", "node", "-o", validate_node(node)]))
        if fields.get("NodeName") != node:
            raise BackendError(f"scontrol show node {node}: unexpected answer {fields.get('NodeName')!r}")
        reason = fields.get("Reason", "")
        if reason == "(null)":
            reason = ""
        drained = is_drained(fields.get("State", ""))
        return NodeStatus(drained, reason, drained and reason.startswith(REASON_PREFIX))

    def cordon(self, chip: ChipRef, reason: str) -> Result:
        node = validate_node(chip.node)
        reason = clean_reason(reason)
        before = self.status(node)
        if before.drained and not before.by_us:
            return Result.HELD_BY_OTHER
        if before.drained and before.reason == reason:
            return Result.ALREADY
        # On a node we already drained this only updates the reason (e.g. a second chip).
        self._run(["update", f"NodeName={node}", "State=DRAIN", f"Reason={reason}"])
        return Result.DONE if not before.drained else Result.ALREADY

    def uncordon(self, chip: ChipRef, still_held_reason: str = "") -> Result:
        node = validate_node(chip.node)
        before = self.status(node)
        if not before.drained:
            return Result.NOT_HELD
        if not before.by_us:
            return Result.HELD_BY_OTHER
        if still_held_reason:
            # Slurm drains whole nodes: the node stays drained for its other chips.
            self._run(["update", f"NodeName={node}", "State=DRAIN", f"Reason={clean_reason(still_held_reason)}"])
            return Result.ALREADY
        self._run(["update", f"NodeName={node}", "State=RESUME"])
        return Result.DONE
