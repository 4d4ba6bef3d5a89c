"""The health evaluation pipeline, shared by the live service (api.py) and the backtest.

    rollup + XID events + job membership
      -> fate-sharing (storm events removed, one record per storm)
      -> features (dense chip x hour grid)
      -> deterministic rules (chip, node, XID) and the risk model
      -> one verdict per chip and hour (and per node for node-level signals)

A rule at DEGRADED or FAILING decides (source "rule"); otherwise a risk at or above the model's
cordon threshold makes the chip DEGRADED with action DRAIN (source "model"); a WATCH rule or a
risk above the watch threshold makes it WATCH; the rest is HEALTHY.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from . import fate, rules
from .features import CHIP_KEY, HOUR_MS, NODE_KEY, Rollup, features
from .model import RiskModel
from .rules import ACTION_OF_RANK, ACTION_RANK, STATE_OF_RANK, STATE_RANK
from .verdict import Action, ChipRef, State, Verdict

OUT = STATE_RANK[State.DEGRADED]


@dataclass
class Evaluation:
    grid: pl.DataFrame          # features (only the evaluated hours)
    chips: pl.DataFrame         # CHIP_KEY rack vendor model hour t_ms state action source risk reasons
    nodes: pl.DataFrame         # NODE_KEY rack hour t_ms state action reasons (node-level rules only)
    storms: list[fate.Storm]


def without_storms(events: pl.DataFrame, jobs: pl.DataFrame | None) -> tuple[list[fate.Storm], pl.DataFrame]:
    """(storms, the events that are not part of one)."""
    storms, marked = fate.find_storms(events, jobs)
    clean = marked.filter(~pl.col("in_storm")).drop("in_storm") if not marked.is_empty() else events
    return storms, clean


def evaluate(r: Rollup, events: pl.DataFrame, jobs: pl.DataFrame | None, model: RiskModel | None,
             *, end_hour: int | None = None, hours_from: int | None = None, now_ms: int | None = None) -> Evaluation:
    """Verdicts for every chip at the end of every hour >= hours_from (all hours when None)."""
    storms, clean = without_storms(events, jobs)
    grid = features(r, clean, end_hour=end_hour, now_ms=now_ms)
    if grid.is_empty():
        empty = pl.DataFrame()
        return Evaluation(grid, empty, empty, storms)
    if hours_from is not None:
        grid = grid.filter(pl.col("hour") >= hours_from)
    recovery = grid.select(*CHIP_KEY, "hour", "recovery_action").filter(pl.col("recovery_action").is_not_null())
    xr = rules.xid_rules(clean, recovery=recovery)
    if hours_from is not None and not xr.is_empty():
        xr = xr.filter(pl.col("hour") >= hours_from)
    chip_rule = rules.combine(rules.chip_rules(grid), xr)
    node_rule = rules.node_rules(grid)
    risk = model.score(grid) if model is not None else None
    g = grid.select(*CHIP_KEY, "rack", "vendor", "model", "hour", "t_ms", "silent_min", "node_silent_min")
    g = g.with_columns(risk=pl.Series("risk", risk, dtype=pl.Float64) if risk is not None else pl.lit(None, pl.Float64))
    g = g.join(chip_rule, on=CHIP_KEY + ["hour"], how="left")
    thr = model.threshold if model is not None else 2.0
    wthr = model.watch_threshold if model is not None else 2.0
    rank = pl.col("rule_state_rank").fill_null(0)
    arank = pl.col("rule_action_rank").fill_null(0)
    # the model is not asked about a chip that is not reporting (its features are stale)
    model_ok = pl.col("silent_min").fill_null(0) < rules.SILENT_MIN
    by_rule = rank >= OUT
    by_model = ~by_rule & model_ok & (pl.col("risk").fill_null(0) >= thr)
    watch = ~by_rule & ~by_model & ((rank >= STATE_RANK[State.WATCH]) | (model_ok & (pl.col("risk").fill_null(0) >= wthr)))
    # the whole node silent: no fresh data, so no new judgement (a cordon already asked for stays)
    stale = (pl.col("node_silent_min").fill_null(0) >= rules.SILENT_MIN) & ~(by_rule & (arank >= ACTION_RANK[Action.DRAIN]))
    by_rule, by_model, watch = by_rule & ~stale, by_model & ~stale, watch & ~stale
    g = g.with_columns(
        state=pl.when(stale).then(pl.lit(STATE_RANK[State.UNKNOWN]))
        .when(by_rule).then(rank).when(by_model).then(pl.lit(OUT))
        .when(watch).then(pl.lit(STATE_RANK[State.WATCH])).otherwise(pl.lit(STATE_RANK[State.HEALTHY])),
        action=pl.when(by_rule).then(arank).when(by_model).then(pl.lit(ACTION_RANK[Action.DRAIN]))
        .when(watch).then(pl.max_horizontal(arank, pl.lit(ACTION_RANK[Action.WATCH])))
        .otherwise(pl.lit(ACTION_RANK[Action.NONE])),
        source=pl.when(by_model).then(pl.lit("model")).otherwise(pl.lit("rule")),
    )
    nodes = node_rule.rename({"rule_state_rank": "state", "rule_action_rank": "action"})
    if not nodes.is_empty():
        nodes = nodes.with_columns(t_ms=(pl.col("hour") + 1) * HOUR_MS)
    return Evaluation(grid, g, nodes, storms)


def out_of_service(df: pl.DataFrame) -> pl.Expr:
    return pl.col("action").is_in([ACTION_RANK[a] for a in Action if a.takes_out_of_service])


def verdicts(ev: Evaluation, model: RiskModel | None, hour: int | None = None,
             include_healthy: bool = True) -> list[Verdict]:
    """Verdict objects for one hour (the newest by default), with reasons in words."""
    out: list[Verdict] = []
    chips = ev.chips
    if chips.is_empty():
        return []
    hour = int(chips["hour"].max()) if hour is None else hour
    now = chips.filter(pl.col("hour") == hour)
    grid_rows = {tuple(r[k] for k in CHIP_KEY): r for r in ev.grid.filter(pl.col("hour") == hour).iter_rows(named=True)}
    for row in now.iter_rows(named=True):
        state = STATE_OF_RANK[int(row["state"])]
        if state == State.HEALTHY and not include_healthy:
            continue
        key = tuple(row[k] for k in CHIP_KEY)
        feats = grid_rows.get(key, {})
        reasons = list(row.get("rule_reasons") or [])
        if state == State.UNKNOWN:
            reasons = [f"no data from node {row['node']} for {feats.get('node_silent_min', 0):.0f} min"]
        if row["source"] == "model" and model is not None:
            reasons = [f"risk {row['risk']:.2f} of failing within {model.meta.get('horizon_h', 168) // 24} days: "
                       + "; ".join(model.explain(feats))] + reasons
        elif state == State.WATCH and row.get("risk") is not None and model is not None and row["risk"] >= model.watch_threshold:
            reasons.append(f"risk {row['risk']:.2f} (watch): " + "; ".join(model.explain(feats)))
        evidence = {k: float(feats[k]) for k in ("ecc_corr_ratio", "pcie_ratio", "temp_max_drift", "silent_min")
                    if feats.get(k) is not None}
        out.append(Verdict(
            chip=ChipRef(cluster=row["cluster"], node=row["node"], chip=row["chip"], uuid=row["uuid"] or "",
                         rack=row["rack"] or "", vendor=row["vendor"] or "", model=row["model"] or ""),
            state=state, action=ACTION_OF_RANK[int(row["action"])], reasons=tuple(reasons) or ("no problem seen",),
            source=row["source"], observed_at=float(feats.get("last_ts") or row["t_ms"]) / 1000.0,
            risk=None if row["risk"] is None else float(row["risk"]), evidence=evidence))
    if not ev.nodes.is_empty():
        for row in ev.nodes.filter(pl.col("hour") == hour).iter_rows(named=True):
            out.append(Verdict(
                chip=ChipRef(cluster=row["cluster"], node=row["node"], chip="", rack=row.get("rack") or ""),
                state=STATE_OF_RANK[int(row["state"])], action=ACTION_OF_RANK[int(row["action"])],
                reasons=tuple(row["rule_reasons"]), source="rule", observed_at=row["t_ms"] / 1000.0))
    out.extend(s.verdict() for s in ev.storms if hour * HOUR_MS <= s.end_ms < (hour + 1) * HOUR_MS)
    return out


__all__ = ["Evaluation", "evaluate", "verdicts", "out_of_service", "NODE_KEY"]
