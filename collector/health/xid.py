"""The reconciled XID table: what Shopfloor does with each NVIDIA XID code.

Sources disagree (see ../shared/reference/xid.md: NVIDIA's catalog, DCGM health, the k8s device
plugin, gpud, NVSentinel, Azure HPC health checks). The choices here, and why:

- Codes that are usually the application's fault (13, 31, 43, 68, 69, ...) never cordon alone: the
  application is told to restart. A repeat on the same chip (13/31: 2+ in 24 h, as NVSentinel does)
  points at the hardware, so we ask for diagnostics; still no cordon.
- 45 is a consequence of another error (preemptive cleanup). It is never fatal: treating it as fatal
  once cordoned 77 nodes after one job crash.
- Memory errors that the driver could not contain (48, 95, 140) and remap failures (64) need a GPU
  reset; 79 (fallen off the bus) needs the host rebooted; GSP failures (119, 120) a GPU reset.
- 94 (contained ECC) only restarts the application; many of them (5 in 7 days) suggest the HBM is
  going, so the chip is degraded and reset when drained (gpud escalates only after many).
- 154 carries the driver's own recovery action (the same values as NVML field 230); we follow it.
- An unknown code is reported and watched, never fatal: every new driver adds codes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .verdict import Action, State


@dataclass(frozen=True)
class XidRule:
    code: int
    meaning: str
    state: State                 # verdict for a single occurrence
    action: Action
    fatal_alone: bool            # one occurrence takes the chip out of service
    # escalation: `escalate_count` occurrences within `escalate_window_h` hours -> escalated verdict
    escalate_count: int | None = None
    escalate_window_h: float | None = None
    escalate_state: State | None = None
    escalate_action: Action | None = None


_S, _A = State, Action

XID_TABLE: dict[int, XidRule] = {r.code: r for r in [
    XidRule(8, "GPU stopped processing (timeout), usually the application", _S.WATCH, _A.RESTART_APP, False,
            3, 24, _S.DEGRADED, _A.DIAGNOSE),
    XidRule(13, "graphics engine exception, usually the application", _S.WATCH, _A.RESTART_APP, False,
            2, 24, _S.DEGRADED, _A.DIAGNOSE),
    XidRule(31, "GPU memory page fault, usually the application", _S.WATCH, _A.RESTART_APP, False,
            2, 24, _S.DEGRADED, _A.DIAGNOSE),
    XidRule(32, "invalid or corrupted push buffer stream", _S.WATCH, _A.RESTART_APP, False,
            3, 24, _S.DEGRADED, _A.DIAGNOSE),
    XidRule(43, "GPU stopped processing (application fault)", _S.HEALTHY, _A.NONE, False),
    XidRule(45, "preemptive cleanup after another error (never fatal on its own)", _S.HEALTHY, _A.NONE, False),
    XidRule(48, "double-bit ECC error", _S.FAILING, _A.RESET_GPU, True),
    XidRule(61, "internal micro-controller breakpoint/warning", _S.WATCH, _A.WATCH, False,
            3, 24, _S.DEGRADED, _A.DIAGNOSE),
    XidRule(62, "internal micro-controller halt", _S.FAILING, _A.RESET_GPU, True),
    XidRule(63, "ECC page retirement or row remap recorded", _S.WATCH, _A.WATCH, False),
    XidRule(64, "ECC page retirement or row remap failure", _S.FAILING, _A.RESET_GPU, True),
    XidRule(68, "video decoder (NVDEC) exception, usually the application", _S.WATCH, _A.RESTART_APP, False),
    XidRule(69, "graphics engine class error, usually the application", _S.WATCH, _A.RESTART_APP, False),
    XidRule(74, "NVLink error", _S.FAILING, _A.RESET_GPU, True),
    XidRule(79, "GPU has fallen off the bus", _S.FAILING, _A.REBOOT_NODE, True),
    XidRule(92, "high single-bit ECC error rate", _S.WATCH, _A.WATCH, False),
    XidRule(94, "contained uncorrectable ECC error", _S.WATCH, _A.RESTART_APP, False,
            5, 24 * 7, _S.DEGRADED, _A.RESET_GPU),
    XidRule(95, "uncontained uncorrectable ECC error", _S.FAILING, _A.RESET_GPU, True),
    XidRule(109, "context switch timeout", _S.WATCH, _A.RESTART_APP, False,
            2, 24, _S.DEGRADED, _A.RESET_GPU),
    XidRule(119, "GSP (GPU system processor) RPC timeout", _S.FAILING, _A.RESET_GPU, True),
    XidRule(120, "GSP (GPU system processor) error", _S.FAILING, _A.RESET_GPU, True),
    XidRule(140, "unrecovered ECC error", _S.FAILING, _A.RESET_GPU, True),
    # NVLink5 (Blackwell): the registers must be decoded to tell a link problem from a peer's;
    # diagnose first, and reset when they keep coming.
    *[XidRule(c, "NVLink5 error", _S.DEGRADED, _A.DIAGNOSE, False, 3, 1, _S.FAILING, _A.RESET_GPU)
      for c in range(144, 151)],
    # 154's action comes from the recovery action it reports (see RECOVERY_ACTIONS); when that is
    # not known, a reset is the driver's most common request.
    XidRule(154, "GPU recovery action changed", _S.FAILING, _A.RESET_GPU, True),
]}

UNKNOWN = "unknown XID (reported and watched, not fatal)"

# NVML field 230 / XID 154 recovery action -> (state, action, words)
RECOVERY_ACTIONS: dict[int, tuple[State, Action, str]] = {
    0: (State.HEALTHY, Action.NONE, "no recovery action needed"),
    1: (State.FAILING, Action.RESET_GPU, "driver requires a GPU reset"),
    2: (State.FAILING, Action.REBOOT_NODE, "driver requires a node reboot"),
    3: (State.DEGRADED, Action.DRAIN, "driver asks to drain peer-to-peer traffic"),
    4: (State.FAILING, Action.RESET_GPU, "driver asks to drain and reset the GPU"),
}


@dataclass(frozen=True)
class XidVerdict:
    state: State
    action: Action
    fatal: bool
    reason: str


def classify(code: int, count_in_window: int = 1, window_h: float = 24.0,
             recovery_action: int | None = None) -> XidVerdict:
    """Verdict for `count_in_window` occurrences of XID `code` on one chip within `window_h` hours.

    The escalation applies when the observed window is no longer than the rule's window (a count
    over a longer window says less)."""
    rule = XID_TABLE.get(int(code))
    if rule is None:
        return XidVerdict(State.WATCH, Action.WATCH, False, f"XID {code}: {UNKNOWN}")
    if rule.code == 154 and recovery_action is not None and recovery_action in RECOVERY_ACTIONS:
        state, action, words = RECOVERY_ACTIONS[recovery_action]
        return XidVerdict(state, action, action.takes_out_of_service, f"XID 154: {rule.meaning}: {words}")
    times = f" ({count_in_window} in {window_h:g} h)" if count_in_window > 1 else ""
    if (rule.escalate_count is not None and count_in_window >= rule.escalate_count
            and window_h <= (rule.escalate_window_h or 0)):
        state, action = rule.escalate_state, rule.escalate_action
        assert state is not None and action is not None
        return XidVerdict(state, action, action.takes_out_of_service,
                          f"XID {code}: {rule.meaning}{times}, repeated: {action.value.replace('_', ' ')}")
    return XidVerdict(rule.state, rule.action, rule.fatal_alone, f"XID {code}: {rule.meaning}{times}")
