"""Deterministic rules for known-fatal signals, evaluated over the feature grid (features.py).

Each rule is a polars condition over one grid row (a chip at the end of an hour), a verdict state
and action, and a reason template in words. Rules run vectorised over every row at once: the
backtest evaluates the whole trace in one call, the live service the newest hour. XIDs are
judged through the reconciled table (xid.py) from exact XID events; events that fate-sharing
(fate.py) attributed to an application or fabric storm are removed before they get here.

Node-level signals (EFA ports) produce node verdicts: chip "" in the ChipRef.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from .features import CHIP_KEY, HOUR_MS, NODE_KEY
from .verdict import Action, State
from .xid import XID_TABLE, classify

# Severity orders: the row's verdict is its most severe rule's state and most drastic action.
STATE_RANK = {State.HEALTHY: 0, State.UNKNOWN: 1, State.WATCH: 2, State.DEGRADED: 3, State.FAILING: 4}
ACTION_RANK = {Action.NONE: 0, Action.WATCH: 1, Action.RESTART_APP: 2, Action.DIAGNOSE: 3,
               Action.DRAIN: 4, Action.RESET_GPU: 5, Action.REBOOT_NODE: 6}
STATE_OF_RANK = {v: k for k, v in STATE_RANK.items()}
ACTION_OF_RANK = {v: k for k, v in ACTION_RANK.items()}

SILENT_MIN = 10            # a chip silent this long while its node reports: fallen off the bus
RETIRED_PAGES_LIMIT = 60   # NVIDIA: a GPU with 60+ retired pages is due for replacement
HOT_HOURS = 3              # at/above the slowdown temperature in 3 of the last 6 hours
THROTTLE_FRACTION = 0.5    # thermally throttled half of the last 6 hours
FLAP_HOURS = 3             # an EFA port that went down and up in 3 of the last 6 hours
NEURON_HW_ERRORS = 3       # Trainium hardware execution errors in an hour (one now and then is noise)
EFA_UNRESPONSIVE = 4       # unresponsive/impaired-remote events on a node in an hour (healthy: ~1/day)
FATAL_XID_HOLD_H = 24      # a fatal XID keeps its verdict this long (remediation holds the cordon)
# Trend rules: error counters far above their own baseline, at counts a healthy chip does not
# reach (healthy: ~0.3 correctable ECC, ~0.5 PCIe replays, ~4 NVLink CRC errors a day).
ECC_SURGE_24H, ECC_SURGE_RATIO = 8, 5
ECC_SUSTAINED_7D = 21      # 3 a day for a week: 10x the healthy rate (a slow ramp hides in its own baseline)
REMAP_ECC_24H = 3          # a pending remap and correctable errors still coming
PCIE_SURGE_24H, PCIE_SURGE_RATIO = 10, 10
NVLINK_SURGE_24H, NVLINK_SURGE_RATIO = 20, 5
NEURON_HW_24H = 3
# Thermal drift (failure-model.md: temperature drifts up over 3-30 days before a thermal failure; a
# busy chip at its normal heat rarely reaches the slowdown temperature even then, so the "hot"
# rule alone misses most): the hottest hour of the last day this far above the hottest of the week
# before, with the chip this close to its slowdown temperature (margin from NVML's own threshold,
# so the rule holds across GPU models).
THERMAL_DRIFT_C = 3
THERMAL_DRIFT_MARGIN_C = 10
# The same drift seen against the chip's node: its mean temperature over the last 24 h minus its
# node's median (same job, same air: equal load), this far above the same gap over the week
# before. It needs neither the slowdown temperature nor a busy week: on seeds 303/404/505 no chip
# without a thermal failure rose more than 2.8 C; the two failing ones passed 4 C 5-7 days ahead.
THERMAL_GAP_RISE_C = 4
# EFA retransmits surging on a node (healthy: ~2/s per busy port; a failing NIC or cable rises
# 10-1000x within minutes to hours of failing): the last hour far above the node's 7-day hourly mean.
# A node idle for its whole baseline week has no mean to compare with (its first busy hour would
# look like a surge): the rule needs a baseline of real traffic.
EFA_RETRANS_RATIO = 40
EFA_RETRANS_MIN_BASE = 10_000   # retransmits per hour, 7-day mean


@dataclass(frozen=True)
class Rule:
    name: str
    when: pl.Expr
    state: State
    action: Action
    reason: pl.Expr          # words, may use the row's values


def _f(template: str, *cols: str | pl.Expr) -> pl.Expr:
    return pl.format(template, *[pl.col(c).round(1) if isinstance(c, str) else c for c in cols])


def _n(col: str) -> pl.Expr:
    return pl.col(col).fill_null(0)


nvidia = pl.col("vendor") != "aws"
reporting = pl.col("silent_min").fill_null(0) < SILENT_MIN

CHIP_RULES: tuple[Rule, ...] = (
    # fatal signals hold their verdict for a day (FATAL_XID_HOLD_H), like fatal XIDs: remediation
    # keeps the cordon until a reset/repair and a healthy window, never because the error is old
    Rule("ecc_uncorrectable", (_n("ecc_uncorr_24h") > 0) & nvidia, State.FAILING, Action.RESET_GPU,
         _f("uncorrectable ECC errors: {} in the last 24 h", "ecc_uncorr_24h")),
    Rule("hbm_uncorrectable", (_n("ecc_uncorr_24h") > 0) & ~nvidia, State.FAILING, Action.DRAIN,
         _f("uncorrectable HBM ECC errors: {} in the last 24 h", "ecc_uncorr_24h")),
    Rule("sram_uncorrectable", _n("sram_uncorr_24h") > 0, State.FAILING, Action.DRAIN,
         _f("uncorrectable SRAM ECC errors: {} in the last 24 h", "sram_uncorr_24h")),
    Rule("row_remap_failure", _n("remap_failure") >= 1, State.FAILING, Action.DRAIN,
         pl.lit("row remapping failed: the GPU's memory needs service")),
    # NVIDIA asks for a reset at the next opportunity: worth knowing, not worth a cordon on its
    # own (the risk model weighs it with the ECC trend).
    Rule("row_remap_pending", _n("remap_pending") >= 1, State.WATCH, Action.WATCH,
         pl.lit("row remap pending: reset the GPU at the next opportunity")),
    Rule("retired_pages_limit", _n("retired_total") >= RETIRED_PAGES_LIMIT, State.FAILING, Action.DRAIN,
         _f("{} retired memory pages (replace at " + str(RETIRED_PAGES_LIMIT) + ")", "retired_total")),
    Rule("retired_page_pending", _n("retired_pending") >= 1, State.WATCH, Action.WATCH,
         pl.lit("page retirement pending until the next driver reload")),
    Rule("off_bus", (pl.col("silent_min") >= SILENT_MIN) & (pl.col("node_silent_min") < SILENT_MIN)
         & (pl.col("silent_min") < 7 * 24 * 60), State.FAILING, Action.REBOOT_NODE,
         _f("chip stopped reporting {} min ago while its node still reports (fallen off the bus)",
            pl.col("silent_min").round(0).cast(pl.Int64))),
    Rule("nvlink_down", (pl.col("nvlink_up_min") == 0) & reporting, State.DEGRADED, Action.DRAIN,
         pl.lit("an NVLink is down")),
    Rule("trainium_hw_errors", _n("neuron_hw_peak_24h") >= NEURON_HW_ERRORS, State.FAILING, Action.DRAIN,
         _f("Trainium hardware execution errors: up to {} in an hour within the last 24 h", "neuron_hw_peak_24h")),
    # trends that precede failures (failure-model.md): a chip whose error rate surges is drained
    # before it takes a job down
    Rule("ecc_corrected_surge", (_n("ecc_corr_24h") >= ECC_SURGE_24H)
         & ((_n("ecc_corr_ratio") >= ECC_SURGE_RATIO) | (_n("ecc_corr_7d") >= ECC_SUSTAINED_7D)),
         State.DEGRADED, Action.DRAIN,
         _f("correctable ECC rate {}/h, {}x its 7-day baseline ({} in 7 days)", (pl.col("ecc_corr_24h") / 24).round(2),
            pl.col("ecc_corr_ratio").round(0), pl.col("ecc_corr_7d").cast(pl.Int64))),
    Rule("remap_pending_with_ecc", (_n("remap_pending") >= 1) & (_n("ecc_corr_24h") >= REMAP_ECC_24H),
         State.DEGRADED, Action.DRAIN,
         _f("a row remap is pending and correctable ECC errors keep coming ({} in 24 h): the memory is degrading",
            pl.col("ecc_corr_24h").cast(pl.Int64))),
    Rule("pcie_replay_surge", (_n("pcie_24h") >= PCIE_SURGE_24H) & (_n("pcie_ratio") >= PCIE_SURGE_RATIO),
         State.DEGRADED, Action.DRAIN,
         _f("PCIe replays {} in 24 h, {}x the baseline (a failing link: falls off the bus next)",
            pl.col("pcie_24h").cast(pl.Int64), pl.col("pcie_ratio").round(0))),
    Rule("nvlink_error_surge", (_n("nvlink_24h") >= NVLINK_SURGE_24H) & (_n("nvlink_ratio") >= NVLINK_SURGE_RATIO),
         State.DEGRADED, Action.DRAIN,
         _f("NVLink errors {} in 24 h, {}x the baseline", pl.col("nvlink_24h").cast(pl.Int64), pl.col("nvlink_ratio").round(0))),
    Rule("trainium_hw_error_trend", _n("neuron_hw_24h") >= NEURON_HW_24H, State.DEGRADED, Action.DRAIN,
         _f("Trainium hardware execution errors: {} in 24 h", pl.col("neuron_hw_24h").cast(pl.Int64))),
    Rule("thermal_sustained", (_n("hot_6h") >= HOT_HOURS) | (_n("throttle_6h") >= THROTTLE_FRACTION),
         State.DEGRADED, Action.DRAIN,
         _f("sustained thermal trouble: at the slowdown temperature {} of the last 6 h, throttled {}% of the time",
            pl.col("hot_6h").fill_null(0).cast(pl.Int64), (_n("throttle_6h") * 100).round(0).cast(pl.Int64))),
    Rule("thermal_drift", (_n("temp_max_drift") >= THERMAL_DRIFT_C)
         & (pl.col("thermal_margin_24h").fill_null(1e9) <= THERMAL_DRIFT_MARGIN_C) & nvidia & reporting,
         State.DEGRADED, Action.DRAIN,
         _f("temperature drifting up: hottest {} C in 24 h, {} C above the week before, {} C below slowdown",
            pl.col("temp_max_24h").round(0).cast(pl.Int64), pl.col("temp_max_drift").round(0).cast(pl.Int64),
            pl.col("thermal_margin_24h").round(0).cast(pl.Int64))),
    Rule("thermal_gap_rise", (_n("temp_gap_rise") >= THERMAL_GAP_RISE_C) & nvidia & reporting,
         State.DEGRADED, Action.DRAIN,
         _f("running {} C hotter than its node's median over 24 h, {} C more than the week before (a cooling fault)",
            pl.col("temp_gap_24h").round(1), pl.col("temp_gap_rise").round(1))),
    Rule("recovery_reset", _n("recovery_action").is_in([1.0, 4.0]), State.FAILING, Action.RESET_GPU,
         pl.lit("the driver's recovery action asks for a GPU reset")),
    Rule("recovery_reboot", _n("recovery_action") == 2, State.FAILING, Action.REBOOT_NODE,
         pl.lit("the driver's recovery action asks for a node reboot")),
    Rule("recovery_drain_p2p", _n("recovery_action") == 3, State.DEGRADED, Action.DRAIN,
         pl.lit("the driver's recovery action asks to drain peer-to-peer traffic")),
)

NODE_RULES: tuple[Rule, ...] = (
    Rule("efa_unresponsive", _n("efa_unresp_1h") >= EFA_UNRESPONSIVE, State.DEGRADED, Action.DRAIN,
         _f("{} unresponsive-remote EFA events in the last hour (a failing NIC or cable)",
            pl.col("efa_unresp_1h").cast(pl.Int64))),
    Rule("efa_retransmit_surge", (_n("efa_retrans_ratio") >= EFA_RETRANS_RATIO) & (_n("efa_retrans_base") >= EFA_RETRANS_MIN_BASE),
         State.DEGRADED, Action.DRAIN,
         _f("EFA retransmits at {}x the node's 7-day mean rate ({} this hour): a failing NIC or cable",
            pl.col("efa_retrans_ratio").round(0).cast(pl.Int64), pl.col("efa_retrans_1h").cast(pl.Int64))),
    Rule("efa_port_down", (pl.col("net_up_max") == 0), State.DEGRADED, Action.DRAIN,
         pl.lit("an EFA port was down for the whole last hour")),
    Rule("efa_port_flapping", _n("efa_flap_hours_6h") >= FLAP_HOURS, State.DEGRADED, Action.DRAIN,
         _f("an EFA port went down and up in {} of the last 6 hours",
            pl.col("efa_flap_hours_6h").cast(pl.Int64))),
)


def _apply(grid: pl.DataFrame, rules: tuple[Rule, ...], keys: list[str]) -> pl.DataFrame:
    """keys + hour + rule_state_rank, rule_action_rank, rule_reasons (list[str]), rule_names."""
    hits = []
    for r in rules:
        hits.append(grid.filter(r.when.fill_null(False)).select(
            *keys, "hour", rank=pl.lit(STATE_RANK[r.state]), arank=pl.lit(ACTION_RANK[r.action]),
            reason=r.reason, rule=pl.lit(r.name)))
    if not hits:
        return _empty(keys)
    allh = pl.concat(hits)
    return allh.group_by(*keys, "hour").agg(
        rule_state_rank=pl.col("rank").max(), rule_action_rank=pl.col("arank").max(),
        rule_reasons=pl.col("reason").sort_by("rank", descending=True), rule_names=pl.col("rule"))


def _empty(keys: list[str]) -> pl.DataFrame:
    return pl.DataFrame(schema={**{k: pl.String for k in keys}, "hour": pl.Int64, "rule_state_rank": pl.Int32,
                                "rule_action_rank": pl.Int32, "rule_reasons": pl.List(pl.String),
                                "rule_names": pl.List(pl.String)})


def chip_rules(grid: pl.DataFrame) -> pl.DataFrame:
    return _apply(grid, CHIP_RULES, CHIP_KEY)


def node_rules(grid: pl.DataFrame) -> pl.DataFrame:
    """Node-level rules over one row per node and hour (from any chip row: node signals are shared)."""
    nodes = grid.group_by(NODE_KEY + ["hour"]).agg(
        pl.col("rack").first(), pl.col("net_up_max").first(), pl.col("efa_flap_hours_6h").first(),
        pl.col("efa_unresp_1h").first(), pl.col("efa_retrans_1h").first(), pl.col("efa_retrans_base").first(),
        pl.col("efa_retrans_ratio").first())
    return _apply(nodes, NODE_RULES, NODE_KEY)


def xid_rules(events: pl.DataFrame, hours: pl.DataFrame | None = None,
              recovery: pl.DataFrame | None = None) -> pl.DataFrame:
    """Verdicts from XID events, per chip and evaluation hour.

    An event at ts counts for the evaluations at the ends of the hours it precedes, for as long as
    its rule needs: a fatal one FATAL_XID_HOLD_H hours, an escalating one its escalation window,
    any other one hour. Counts per code within that window decide escalations (xid.classify).
    `recovery` (CHIP_KEY, hour, recovery_action) refines XID 154."""
    if events.is_empty():
        return _empty(CHIP_KEY)

    def hold(code: int) -> int:
        rule = XID_TABLE.get(code)
        if rule is None:
            return 1
        if rule.fatal_alone:
            return FATAL_XID_HOLD_H
        return int(max(1, rule.escalate_window_h or 1))

    codes = events["xid"].unique().to_list()
    holds = pl.DataFrame({"xid": codes, "hold": [hold(int(c)) for c in codes]},
                         schema={"xid": pl.Int64, "hold": pl.Int64})
    ev = events.join(holds, on="xid").with_columns(h0=pl.col("ts") // HOUR_MS)
    ev = ev.with_columns(hour=pl.int_ranges("h0", pl.col("h0") + pl.col("hold"))).explode("hour")
    per = ev.group_by(CHIP_KEY + ["hour", "xid"]).agg(n=pl.col("count").sum(), hold=pl.col("hold").first())
    if recovery is not None and not recovery.is_empty():
        per = per.join(recovery, on=CHIP_KEY + ["hour"], how="left")
    else:
        per = per.with_columns(recovery_action=pl.lit(None, pl.Float64))
    # classify each distinct (code, count, window, recovery action): few combinations
    combos = per.select("xid", "n", "hold", "recovery_action").unique()
    out = []
    for code, n, holdh, ra in combos.iter_rows():
        v = classify(int(code), int(n), float(holdh), None if ra is None else int(ra))
        out.append((code, n, holdh, ra, STATE_RANK[v.state], ACTION_RANK[v.action], v.reason))
    table = pl.DataFrame(out, schema={"xid": pl.Int64, "n": pl.Int64, "hold": pl.Int64, "recovery_action": pl.Float64,
                                      "rank": pl.Int32, "arank": pl.Int32, "reason": pl.String}, orient="row")
    per = per.join(table, on=["xid", "n", "hold", "recovery_action"], how="left", nulls_equal=True)
    return per.group_by(CHIP_KEY + ["hour"]).agg(
        rule_state_rank=pl.col("rank").max(), rule_action_rank=pl.col("arank").max(),
        rule_reasons=pl.col("reason").sort_by("rank", descending=True),
        rule_names=pl.format("xid_{}", pl.col("xid")))


def combine(*frames: pl.DataFrame, keys: list[str] = CHIP_KEY) -> pl.DataFrame:
    """Merge rule outputs for the same rows: most severe state/action, all reasons."""
    frames = tuple(f for f in frames if not f.is_empty())
    if not frames:
        return _empty(keys)
    allf = pl.concat([f.select(*keys, "hour", "rule_state_rank", "rule_action_rank", "rule_reasons", "rule_names")
                      .with_columns(pl.col("rule_state_rank", "rule_action_rank").cast(pl.Int32)) for f in frames])
    return allf.group_by(*keys, "hour").agg(
        pl.col("rule_state_rank").max(), pl.col("rule_action_rank").max(),
        pl.col("rule_reasons").list.explode(keep_nulls=False, empty_as_null=False),
        pl.col("rule_names").list.explode(keep_nulls=False, empty_as_null=False))
