"""Replay a recorded run (a simulator trace directory) through the live evaluation code and score it
against the trace's ground truth.

The live service evaluates every hour on what it knew at the end of that hour; the backtest does
the same for every hour of the trace in one vectorised pass (evaluate.evaluate over the whole
rollup: every feature row only looks backwards, so this equals stepping hour by hour).

Scoring (all from the cordon *episodes*: a chip, or a node for node-level rules, enters
out-of-service and stays there until it has been clear for RETURN_H hours):
- caught before: a failure is caught when an episode for its chip (its node for `nic`) started
  before it, within HORIZON_H hours or after its precursor began (ground truth); lead time =
  failure time - the earliest such episode start;
- precision: episodes followed by a failure of their chip/node within the horizon, started while
  the precursor of a coming failure of the chip ran (the chip is degrading), or started up to
  DETECT_H after a failure (detecting a failure that just happened is right) / all episodes;
- false cordons per 10,000 chip-days: the other episodes over the chips' observed days;
- cordons during storms: episodes starting on a storm's nodes within STORM_GUARD_H of it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import polars as pl

from . import model as risk_model
from .evaluate import evaluate, out_of_service
from .features import CHIP_KEY, HOUR_MS, load_trace
from .model import HORIZON_H, episodes

RETURN_H = 24          # a chip returns to service after 24 clear hours (remediation's healthy window)
DETECT_H = 24          # an episode starting within 24 h after a failure detected it
STORM_GUARD_H = 1


@dataclass
class TraceData:
    dir: str
    rollup: object
    events: pl.DataFrame
    start_ms: int
    end_ms: int
    failures: pl.DataFrame
    jobs: pl.DataFrame
    storms: pl.DataFrame
    meta: dict


def read_trace(trace_dir: str) -> TraceData:
    if not os.path.isdir(trace_dir):
        raise FileNotFoundError(f"{trace_dir}: not a directory")
    with open(os.path.join(trace_dir, "meta.json")) as f:
        meta = json.load(f)
    if meta.get("version") != 1:
        raise ValueError(f"{trace_dir}: trace format version {meta.get('version')} is not supported (1 is)")
    r, ev, lo, hi = load_trace(trace_dir)

    def table(name: str) -> pl.DataFrame:
        return pl.read_parquet(os.path.join(trace_dir, name))

    return TraceData(trace_dir, r, ev, lo, hi, table("failures.parquet"), table("jobs.parquet"),
                     table("storms.parquet"), meta)


def score(td: TraceData, model: risk_model.RiskModel | None, hours_from: int | None = None) -> dict:
    ev = evaluate(td.rollup, td.events, td.jobs, model, end_hour=(td.end_ms - 1) // HOUR_MS, hours_from=hours_from)  # type: ignore[arg-type]
    chips = ev.chips
    start_h = int(chips["hour"].min())
    flagged = chips.filter(out_of_service(chips)).select(*CHIP_KEY, "hour", "source")
    chip_eps = episodes(flagged.select(*CHIP_KEY, "hour"), RETURN_H)
    # which source started each episode
    chip_eps = chip_eps.join(flagged.rename({"hour": "start_hour"}), on=CHIP_KEY + ["start_hour"], how="left")
    nodes = ev.nodes
    node_eps = (episodes(nodes.filter(out_of_service(nodes)).select("cluster", "node", "hour"), RETURN_H)
                if not nodes.is_empty() else pl.DataFrame(schema={"cluster": pl.String, "node": pl.String, "start_hour": pl.Int64}))
    fails = td.failures.filter(pl.col("ts") >= start_h * HOUR_MS)
    if hours_from is not None:
        fails = fails.filter(pl.col("ts") >= hours_from * HOUR_MS)
    h_ms = HORIZON_H * HOUR_MS

    # ---- failures caught before they happened
    def first_before(f: pl.DataFrame, eps: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
        f = f.with_row_index("_f")
        if eps.is_empty():
            return f.with_columns(lead_h=pl.lit(None, pl.Float64), detect_h=pl.lit(None, pl.Float64))
        j = f.join(eps.with_columns(e_ms=(pl.col("start_hour") + 1) * HOUR_MS).select(*keys, "e_ms"), on=keys, how="left")
        j = j.with_columns(d=pl.col("ts") - pl.col("e_ms"))
        # caught: an episode began before the failure, within the horizon or while its precursor ran
        early = (pl.col("d") > 0) & ((pl.col("d") <= h_ms) | (pl.col("e_ms") >= pl.col("precursor_start")).fill_null(False))
        agg = j.group_by("_f").agg(
            lead_ms=pl.col("d").filter(early).max(),
            detect_ms=(-pl.col("d")).filter((pl.col("d") <= 0) & (-pl.col("d") <= DETECT_H * HOUR_MS)).min())
        return f.join(agg, on="_f", how="left").with_columns(
            lead_h=pl.col("lead_ms") / HOUR_MS, detect_h=pl.col("detect_ms") / HOUR_MS)

    chip_f = first_before(fails.filter(pl.col("chip") != ""), chip_eps, CHIP_KEY)
    node_f = first_before(fails.filter(pl.col("chip") == ""), node_eps, ["cluster", "node"])
    allf = pl.concat([chip_f.drop("_f"), node_f.drop("_f")], how="diagonal_relaxed")
    caught = allf.filter(pl.col("lead_h").is_not_null())
    pre = allf.filter(pl.col("precursor_start").is_not_null())
    pre_caught = pre.filter(pl.col("lead_h").is_not_null())
    leads = pre_caught["lead_h"].to_numpy()

    # ---- precision and false cordons
    def true_eps(eps: pl.DataFrame, f: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
        if eps.is_empty():
            return eps.with_columns(ok=pl.lit(False))
        e = eps.with_row_index("_e").with_columns(e_ms=(pl.col("start_hour") + 1) * HOUR_MS)
        j = e.join(f.select(*keys, f_ts=pl.col("ts"), f_pre=pl.col("precursor_start")), on=keys, how="left").with_columns(
            ok=(((pl.col("f_ts") >= pl.col("e_ms") - DETECT_H * HOUR_MS) & (pl.col("f_ts") <= pl.col("e_ms") + h_ms))
                # a chip cordoned while the precursor of its coming failure runs is degrading, not healthy
                | ((pl.col("e_ms") >= pl.col("f_pre")) & (pl.col("e_ms") < pl.col("f_ts")))).fill_null(False))
        return e.join(j.group_by("_e").agg(pl.col("ok").any()), on="_e")

    all_fail = td.failures
    ce = true_eps(chip_eps, all_fail.filter(pl.col("chip") != ""), CHIP_KEY)
    ne = true_eps(node_eps, all_fail.filter(pl.col("chip") == ""), ["cluster", "node"])
    n_eps = ce.height + ne.height
    n_true = int(ce["ok"].sum() if ce.height else 0) + int(ne["ok"].sum() if ne.height else 0)
    chip_days = chips.filter(pl.col("silent_min").fill_null(0) < 10).height / 24.0
    n_false = n_eps - n_true

    # ---- cordons during storms
    storms = td.storms
    storm_cordons = storm_false = 0
    if storms.height and n_eps:
        s = storms.explode("nodes").rename({"nodes": "node"}).select("ts", "node")
        starts = pl.concat([ce.select("node", "start_hour", "ok"), ne.select("node", "start_hour", "ok")])
        j = starts.join(s, on="node").with_columns(e_ms=(pl.col("start_hour") + 1) * HOUR_MS)
        during = j.filter((pl.col("e_ms") >= pl.col("ts")) & (pl.col("e_ms") <= pl.col("ts") + (STORM_GUARD_H + 1) * HOUR_MS))
        storm_cordons, storm_false = during.height, during.filter(~pl.col("ok")).height

    def pct(a, q):
        return float(np.percentile(a, q)) if len(a) else None

    by_mode = (allf.group_by("mode").agg(failures=pl.len(), with_precursor=pl.col("precursor_start").is_not_null().sum(),
                                         caught_before=pl.col("lead_h").is_not_null().sum(),
                                         detected_after=(pl.col("lead_h").is_null() & pl.col("detect_h").is_not_null()).sum())
               .sort("mode").to_dicts())
    return {
        "trace": td.dir, "seed": td.meta.get("seed"), "chips": int(chips.select(CHIP_KEY).unique().height),
        "days": (td.end_ms - td.start_ms) / 86_400_000, "chip_days": chip_days,
        "model": (model.meta.get("version"), model.meta.get("seed"), model.threshold) if model else None,
        "failures": allf.height, "caught_before": caught.height,
        "recall": caught.height / allf.height if allf.height else None,
        "precursor_failures": pre.height, "precursor_caught": pre_caught.height,
        "precursor_recall": pre_caught.height / pre.height if pre.height else None,
        "lead_h_median": pct(leads, 50), "lead_h_p10": pct(leads, 10), "lead_h_p90": pct(leads, 90),
        "detected_after": int(allf.filter(pl.col("lead_h").is_null() & pl.col("detect_h").is_not_null()).height),
        "cordons": n_eps, "true_cordons": n_true, "false_cordons": n_false,
        "precision": n_true / n_eps if n_eps else None,
        "false_cordons_per_10k_chip_days": n_false / chip_days * 1e4 if chip_days else None,
        "storms": storms.height, "fate_sharing_alerts": len(ev.storms), "cordons_during_storms": storm_cordons,
        "false_cordons_during_storms": storm_false,
        "cordons_by_source": ({str(k): int(v) for k, v in ce.group_by("source").len().iter_rows()} if ce.height else {}),
        "false_by_source": ({str(k): int(v) for k, v in ce.filter(~pl.col("ok")).group_by("source").len().iter_rows()}
                            if ce.height else {}),
        "by_mode": by_mode,
    }


def render(rep: dict) -> str:
    def f(v, spec=".1f"):
        return "n/a" if v is None else format(v, spec)

    lines = [
        f"backtest of {rep['trace']} (seed {rep['seed']}): {rep['chips']} chips, {f(rep['days'])} days, "
        f"{f(rep['chip_days'], '.0f')} chip-days observed",
        f"model: {rep['model']}",
        f"failures: {rep['failures']}, caught before they happened: {rep['caught_before']} "
        f"(recall {f(rep['recall'] and rep['recall'] * 100)}%)",
        f"precursor-bearing failures: {rep['precursor_failures']}, caught before: {rep['precursor_caught']} "
        f"(recall {f(rep['precursor_recall'] and rep['precursor_recall'] * 100)}%)",
        f"lead time (precursor-bearing, caught): median {f(rep['lead_h_median'])} h, p10 {f(rep['lead_h_p10'])} h, "
        f"p90 {f(rep['lead_h_p90'])} h",
        f"detected right after failing (not before): {rep['detected_after']}",
        f"cordons: {rep['cordons']} (true {rep['true_cordons']}, false {rep['false_cordons']}), "
        f"precision {f(rep['precision'] and rep['precision'] * 100)}%",
        f"false cordons per 10,000 chip-days: {f(rep['false_cordons_per_10k_chip_days'], '.2f')}",
        f"fate-sharing storms: {rep['storms']} in the trace, {rep['fate_sharing_alerts']} alerts raised, "
        f"cordons during storms: {rep['cordons_during_storms']} (of them not explained by a real failure: "
        f"{rep['false_cordons_during_storms']})",
        f"chip cordons by source: {rep['cordons_by_source']}, false ones: {rep['false_by_source']}",
        "by failure mode:",
    ]
    for m in rep["by_mode"]:
        lines.append(f"  {m['mode']:18} failures {m['failures']:4}  with precursor {m['with_precursor']:4}  "
                     f"caught before {m['caught_before']:4}  detected after {m['detected_after']:4}")
    return "\n".join(lines)


def run(trace_dir: str, model_path: str | None = None, as_json: bool = False, out=sys.stdout) -> dict:
    td = read_trace(trace_dir)
    model = risk_model.load(model_path)
    rep = score(td, model)
    out.write((json.dumps(rep, indent=2) if as_json else render(rep)) + "\n")
    return rep
