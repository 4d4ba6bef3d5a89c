"""What the health layer says about a chip, and what remediation acts on.

Detection (deterministic rules, the learned risk model, fate-sharing) produces Verdicts;
remediation (collector/remediate) turns them into scheduler actions behind safety limits.
Every verdict carries its reasons in words an on-call engineer understands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class State(str, Enum):
    HEALTHY = "healthy"      # nothing wrong seen
    WATCH = "watch"          # worth watching (unknown XID, rising trend below threshold)
    DEGRADED = "degraded"    # works, but the risk model or a rule says it will likely fail
    FAILING = "failing"      # a known-fatal signal: take it out of service
    UNKNOWN = "unknown"      # no fresh data


class Action(str, Enum):
    NONE = "none"
    WATCH = "watch"                  # alert/record only
    RESTART_APP = "restart_app"      # the application's problem; never cordon for it
    DIAGNOSE = "diagnose"            # run diagnostics before deciding
    DRAIN = "drain"                  # take the node out of scheduling (drain/cordon)
    RESET_GPU = "reset_gpu"          # drain, then reset the GPU
    REBOOT_NODE = "reboot_node"      # drain, then reboot the host

    @property
    def takes_out_of_service(self) -> bool:
        return self in (Action.DRAIN, Action.RESET_GPU, Action.REBOOT_NODE)


@dataclass(frozen=True)
class ChipRef:
    cluster: str
    node: str
    chip: str                 # index on the node, as the `chip` label
    uuid: str = ""
    rack: str = ""
    vendor: str = ""
    model: str = ""

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.node}/{self.chip}"


@dataclass(frozen=True)
class Verdict:
    chip: ChipRef
    state: State
    action: Action
    reasons: tuple[str, ...]          # human words, e.g. "XID 79: GPU has fallen off the bus"
    source: str                       # "rule", "model" or "fate-sharing"
    observed_at: float                # epoch seconds of the newest data the verdict is based on
    risk: float | None = None         # model probability, when the model produced it
    job: str | None = None            # the job running on the node, when known
    evidence: dict[str, float] = field(default_factory=dict)  # feature values behind it
