"""Every XID in the reconciled table gets its verdict and action checked against an expectation
list written independently from the table (from ../shared/reference/xid.md)."""

import pytest

from collector.health.verdict import Action, State
from collector.health.xid import XID_TABLE, classify

S, A = State, Action

# code -> (state, action, fatal) for ONE occurrence
EXPECTED_SINGLE = {
    8: (S.WATCH, A.RESTART_APP, False),
    13: (S.WATCH, A.RESTART_APP, False),      # the application's problem: never cordon
    31: (S.WATCH, A.RESTART_APP, False),
    32: (S.WATCH, A.RESTART_APP, False),
    43: (S.HEALTHY, A.NONE, False),
    45: (S.HEALTHY, A.NONE, False),           # never fatal (NVSentinel's 77-node mistake)
    48: (S.FAILING, A.RESET_GPU, True),
    61: (S.WATCH, A.WATCH, False),
    62: (S.FAILING, A.RESET_GPU, True),
    63: (S.WATCH, A.WATCH, False),
    64: (S.FAILING, A.RESET_GPU, True),
    68: (S.WATCH, A.RESTART_APP, False),
    69: (S.WATCH, A.RESTART_APP, False),
    74: (S.FAILING, A.RESET_GPU, True),
    79: (S.FAILING, A.REBOOT_NODE, True),     # fallen off the bus: reboot the host
    92: (S.WATCH, A.WATCH, False),
    94: (S.WATCH, A.RESTART_APP, False),
    95: (S.FAILING, A.RESET_GPU, True),
    109: (S.WATCH, A.RESTART_APP, False),
    119: (S.FAILING, A.RESET_GPU, True),
    120: (S.FAILING, A.RESET_GPU, True),
    140: (S.FAILING, A.RESET_GPU, True),
    144: (S.DEGRADED, A.DIAGNOSE, False),
    145: (S.DEGRADED, A.DIAGNOSE, False),
    146: (S.DEGRADED, A.DIAGNOSE, False),
    147: (S.DEGRADED, A.DIAGNOSE, False),
    148: (S.DEGRADED, A.DIAGNOSE, False),
    149: (S.DEGRADED, A.DIAGNOSE, False),
    150: (S.DEGRADED, A.DIAGNOSE, False),
    154: (S.FAILING, A.RESET_GPU, True),
}

# (code, count, window_h) -> (state, action) after escalation
EXPECTED_ESCALATION = [
    (13, 2, 24, S.DEGRADED, A.DIAGNOSE),      # 2+ in 24 h: run diagnostics, still no cordon
    (31, 2, 24, S.DEGRADED, A.DIAGNOSE),
    (31, 2, 48, S.WATCH, A.RESTART_APP),      # over a longer window it says less: no escalation
    (94, 4, 168, S.WATCH, A.RESTART_APP),     # escalate only after many
    (94, 5, 168, S.DEGRADED, A.RESET_GPU),
    (109, 2, 24, S.DEGRADED, A.RESET_GPU),
    (146, 3, 1, S.FAILING, A.RESET_GPU),
    (45, 50, 1, S.HEALTHY, A.NONE),           # however many: never fatal
    (43, 10, 1, S.HEALTHY, A.NONE),
]

# 154 / NVML field 230 recovery action -> verdict
EXPECTED_RECOVERY = {0: (S.HEALTHY, A.NONE), 1: (S.FAILING, A.RESET_GPU), 2: (S.FAILING, A.REBOOT_NODE),
                     3: (S.DEGRADED, A.DRAIN), 4: (S.FAILING, A.RESET_GPU)}


def test_table_and_expectations_cover_the_same_codes():
    assert set(XID_TABLE) == set(EXPECTED_SINGLE)
    # every code of the reference document is in the table
    for code in (13, 31, 43, 45, 48, 63, 64, 74, 79, 92, 94, 95, 109, 119, 120, 140, 154, *range(144, 151)):
        assert code in XID_TABLE


@pytest.mark.parametrize("code", sorted(EXPECTED_SINGLE))
def test_single_occurrence(code):
    state, action, fatal = EXPECTED_SINGLE[code]
    v = classify(code)
    assert (v.state, v.action, v.fatal) == (state, action, fatal)
    assert f"XID {code}" in v.reason
    assert fatal == action.takes_out_of_service


@pytest.mark.parametrize("code,count,window,state,action", EXPECTED_ESCALATION)
def test_escalation(code, count, window, state, action):
    v = classify(code, count, window)
    assert (v.state, v.action) == (state, action)


@pytest.mark.parametrize("ra", sorted(EXPECTED_RECOVERY))
def test_154_follows_the_recovery_action(ra):
    v = classify(154, recovery_action=ra)
    assert (v.state, v.action) == EXPECTED_RECOVERY[ra]


@pytest.mark.parametrize("code", [1, 99, 155, 999])
def test_unknown_code_is_watched_not_fatal(code):
    v = classify(code, count_in_window=20)
    assert (v.state, v.action, v.fatal) == (S.WATCH, A.WATCH, False)
    assert "unknown" in v.reason


def test_application_codes_never_take_a_chip_out_of_service():
    for code in (8, 13, 31, 32, 43, 45, 68, 69):
        for count in (1, 2, 10):
            assert not classify(code, count, 24).action.takes_out_of_service
