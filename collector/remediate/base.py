"""The one small protocol every remediation backend (Slurm, Kubernetes, webhook) implements.

A backend takes a node out of scheduling because of one chip (cordon), puts it back (uncordon)
and reports the node's current state (status). Backends never decide *whether* to act: the
Remediator does that behind the safety budget. Backends only guarantee the one rule that the
scheduler's own state can tell: a hold somebody else placed (an operator's drain or cordon) is
never lifted and never rewritten.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import NamedTuple, Protocol, runtime_checkable

from collector.health.verdict import ChipRef

# Every hold Shopfloor places says so in its first word; anything else is somebody else's.
REASON_PREFIX = "shopfloor:"

# Node names as schedulers and DNS allow them (RFC 1123 labels, dots, Slurm's underscores).
# Nothing else ever reaches a command line or an API path.
NODE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
CHIP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class BackendError(RuntimeError):
    """The scheduler refused or could not be reached; the decision is audited as failed."""


class Result(str, Enum):
    DONE = "done"                    # we changed the scheduler's state
    ALREADY = "already"              # it was already in the state we wanted, by us
    HELD_BY_OTHER = "held_by_other"  # somebody else holds the node: left exactly as it was
    NOT_HELD = "not_held"            # uncordon of a node nobody holds: nothing to do


class NodeStatus(NamedTuple):
    drained: bool     # out of scheduling (Slurm DRAIN, Kubernetes unschedulable)
    reason: str       # the scheduler's reason text ("" when none)
    by_us: bool       # the hold is Shopfloor's (its reason starts with "shopfloor:")


def validate_node(node: str) -> str:
    if not isinstance(node, str) or not NODE_NAME.match(node):
        raise ValueError(f"invalid node name {node!r}")
    return node


def validate_chip(chip: str) -> str:
    if not isinstance(chip, str) or not CHIP_NAME.match(chip):
        raise ValueError(f"invalid chip id {chip!r}")
    return chip


def clean_reason(reason: str, limit: int = 400) -> str:
    """One printable line starting with "shopfloor:", short enough for every scheduler."""
    text = " ".join("".join(c if c.isprintable() else " " for c in reason).split())
    if not text.startswith(REASON_PREFIX):
        text = f"{REASON_PREFIX} {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@runtime_checkable
class Backend(Protocol):
    name: str

    def cordon(self, chip: ChipRef, reason: str) -> Result:
        """Take chip.node out of scheduling for this chip, unless somebody else holds it."""
        ...

    def uncordon(self, chip: ChipRef, still_held_reason: str = "") -> Result:
        """Lift Shopfloor's hold for this chip; never a hold somebody else placed.

        still_held_reason: when other chips of the node are still held, the node-level reason
        for them: the chip's own marks go, the node stays out of scheduling."""
        ...

    def status(self, node: str) -> NodeStatus:
        ...
