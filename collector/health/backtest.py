"""Replay a recorded run (a simulator trace directory) through the live evaluation code and score it
against the trace's ground truth.

The live service evaluates every 5 minutes (health.interval) on what it knows then: the complete
hours plus the current, partial one. The backtest evaluates the end of every hour of the trace in
one vectorised pass (evaluate.evaluate over the whole rollup: every feature row only looks
backwards, so this equals stepping hour by hour), then replays the 5-minute steps of the hours
where they can matter (`subhourly`) the way the live job does, so a cordon starts when the live
service would have asked for it, not at the next hour end (NIC precursors last minutes).

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
from . import rules
from .evaluate import Evaluation, evaluate, out_of_service, without_storms
from .features import CHIP_KEY, HOUR_MS, NODE_KEY, FrameSource, Rollup, TraceSource, concat_rollups, load_trace, read_hours
from .model import HORIZON_H, episodes

RETURN_H = 24          # a chip returns to service after 24 clear hours (remediation's healthy window)
DETECT_H = 24          # an episode starting within 24 h after a failure detected it
STORM_GUARD_H = 1
STEP_MS = 300_000      # the live job's default interval (health.interval)
HISTORY_H = 8 * 24     # the hours the live job keeps (health.history_days)


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
    source: TraceSource | None = None     # for the sub-hourly replay


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
                     table("storms.parquet"), meta, TraceSource(trace_dir))


def _new_out(frame: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """keys + hour where an out-of-service run begins (not out of service the hour before)."""
    oos = frame.filter(out_of_service(frame)).select(*keys, "hour")
    return oos.join(oos.with_columns(pl.col("hour") + 1), on=keys + ["hour"], how="anti")


def _start_ms(eps: pl.DataFrame, sub: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """e_ms: when each episode started: its step within the first hour, else that hour's end."""
    return eps.join(sub.select(*keys, start_hour=pl.col("hour"), t_ms=pl.col("t_ms")), on=keys + ["start_hour"],
                    how="left").with_columns(e_ms=pl.coalesce("t_ms", (pl.col("start_hour") + 1) * HOUR_MS)).drop("t_ms")


def _no_sub_chips() -> pl.DataFrame:
    return pl.DataFrame(schema={**{k: pl.String for k in CHIP_KEY}, "hour": pl.Int64, "t_ms": pl.Int64, "source": pl.String})


def _no_sub_nodes() -> pl.DataFrame:
    return pl.DataFrame(schema={"cluster": pl.String, "node": pl.String, "hour": pl.Int64, "t_ms": pl.Int64})


STEPS = HOUR_MS // STEP_MS     # the last step of an hour is its end


def subhourly(td: TraceData, ev: Evaluation, model: risk_model.RiskModel | None,
              replay: bool = True) -> tuple[pl.DataFrame, pl.DataFrame]:
    """When, within an hour, the live job (every STEP_MS, on the complete hours it keeps plus the
    partial hour so far) would first have taken a chip / a node out of service.

    Each replay evaluates one node through read_hours + evaluate, as the live job does, only
    where a 5-minute step can differ from the hour end:
    - hours that begin an out-of-service run: the earliest step that already shows it, found by
      bisection (a fatal or counting signal, once seen, stays seen until the hour end; where a
      rate dips and rises again within the hour the step found is a later one: a shorter lead);
    - hours whose end takes nothing out but a partial hour might: an EFA retransmit burst (the
      partial-hour rate is scaled up at most 6x, so only the steps where the whole hour's count
      could reach the rule's ratio are tried) or a port at 0 for a while (every step).
    Returns (CHIP_KEY + hour + t_ms + source, NODE_KEY + hour + t_ms) of the cordons that start
    before the hour end."""
    if not replay or td.source is None or ev.chips.is_empty():
        return _no_sub_chips(), _no_sub_nodes()
    chips, nodes, grid = ev.chips, ev.nodes, ev.grid
    chip_new = _new_out(chips, CHIP_KEY)
    node_new = _new_out(nodes, NODE_KEY) if not nodes.is_empty() else _no_sub_nodes().select(*NODE_KEY, "hour")
    runs = pl.concat([chip_new.select(*NODE_KEY, "hour"), node_new]).unique().with_columns(last_step=pl.lit(STEPS - 1), run=True)
    burst = grid.filter((pl.col("efa_retrans_base").fill_null(0) >= rules.EFA_RETRANS_MIN_BASE)
                        & (pl.col("efa_retrans_ratio").fill_null(0) >= rules.EFA_RETRANS_RATIO / 6)).select(
        *NODE_KEY, "hour", last_step=(pl.col("efa_retrans_ratio") * STEPS / rules.EFA_RETRANS_RATIO).floor()
        .cast(pl.Int32).clip(2, STEPS - 1), run=pl.lit(False))
    down = grid.filter(pl.col("net_up_min") == 0).select(*NODE_KEY, "hour", last_step=pl.lit(STEPS - 1), run=pl.lit(False))
    cand = (pl.concat([runs, burst, down], how="vertical_relaxed").group_by(*NODE_KEY, "hour")
            .agg(pl.col("last_step").max(), pl.col("run").any()).sort(*NODE_KEY, "hour"))
    if cand.is_empty():
        return _no_sub_chips(), _no_sub_nodes()
    _, clean = without_storms(td.events, td.jobs)
    wanted = cand.select(*NODE_KEY).unique()

    def by_node(df: pl.DataFrame) -> dict:
        if df.is_empty():
            return {}
        return df.join(wanted, on=NODE_KEY, how="semi").partition_by(NODE_KEY, as_dict=True)

    r_chips, r_nodes, evs = by_node(td.rollup.chips), by_node(td.rollup.nodes), by_node(clean)
    new_chips = {}
    for row in chip_new.iter_rows(named=True):
        new_chips.setdefault((row["cluster"], row["node"], row["hour"]), set()).add(tuple(row[k] for k in CHIP_KEY))
    oos_chips = set(chips.filter(out_of_service(chips)).select(*CHIP_KEY, "hour").iter_rows())
    node_starts = set(node_new.iter_rows())
    chip_found: list[dict] = []
    node_found: list[dict] = []
    for cluster, node, hour, last_step, run in cand.iter_rows():
        key = (cluster, node)
        h0 = hour * HOUR_MS
        hist = Rollup(r_chips[key].filter(pl.col("hour").is_between(hour - HISTORY_H, hour - 1)) if key in r_chips else pl.DataFrame(),
                      r_nodes[key].filter(pl.col("hour").is_between(hour - HISTORY_H, hour - 1)) if key in r_nodes else pl.DataFrame(),
                      pl.DataFrame())
        if hist.chips.is_empty():
            continue
        src = FrameSource(td.source.node_samples(cluster, node, h0 - HOUR_MS, h0 + HOUR_MS))
        node_events = evs.get(key, clean.clear())

        def step(k: int) -> tuple[dict, bool]:
            """({chip: source} newly out of service, node out of service) at step k of the hour."""
            now = h0 + k * STEP_MS
            part, _ = read_hours(src, h0 - HOUR_MS, now + 1, chunk_hours=2, data_start_ms=td.start_ms)
            if part.chips.is_empty():
                return {}, False
            part.chips = part.chips.filter(pl.col("hour") == hour)
            part.nodes = part.nodes.filter(pl.col("hour") == hour)
            e = evaluate(concat_rollups([hist, part]), node_events.filter(pl.col("ts") <= now), None, model,
                         end_hour=hour, hours_from=hour, now_ms=now)
            out = {}
            if not e.chips.is_empty():
                for *c, source in e.chips.filter(out_of_service(e.chips) & (pl.col("hour") == hour)).select(*CHIP_KEY, "source").iter_rows():
                    if (*c, hour - 1) not in oos_chips:       # out at the previous hour end: nothing starts now
                        out[tuple(c)] = source
            node_out = not e.nodes.is_empty() and not e.nodes.filter(out_of_service(e.nodes) & (pl.col("hour") == hour)).is_empty()
            return out, node_out

        expect = new_chips.get((cluster, node, hour), set())
        expect_node = (cluster, node, hour) in node_starts
        found_k, found = None, ({}, False)
        if run:
            # the earliest step that shows what the hour end shows (the end itself is step STEPS)
            lo, hi = 1, STEPS
            while lo < hi:
                mid = (lo + hi) // 2
                res = step(mid)
                if (expect & res[0].keys()) or (expect_node and res[1]):
                    hi, found_k, found = mid, mid, res
                else:
                    lo = mid + 1
        else:
            for k in range(1, last_step + 1):
                res = step(k)
                if res[0] or res[1]:
                    found_k, found = k, res
                    break
        if found_k is None:
            continue
        t_ms = h0 + found_k * STEP_MS
        chip_found += [dict(zip(CHIP_KEY, c), hour=hour, t_ms=t_ms, source=src_) for c, src_ in found[0].items()]
        if found[1]:
            node_found.append({"cluster": cluster, "node": node, "hour": hour, "t_ms": t_ms})
    cf = pl.DataFrame(chip_found, schema=_no_sub_chips().schema) if chip_found else _no_sub_chips()
    nf = pl.DataFrame(node_found, schema=_no_sub_nodes().schema) if node_found else _no_sub_nodes()
    return cf, nf


def score(td: TraceData, model: risk_model.RiskModel | None, hours_from: int | None = None,
          subhour: bool = True) -> dict:
    """The report; `subhour=False` scores the hour ends only (what the backtest did before)."""
    ev = evaluate(td.rollup, td.events, td.jobs, model, end_hour=(td.end_ms - 1) // HOUR_MS, hours_from=hours_from)  # type: ignore[arg-type]
    chips = ev.chips
    start_h = int(chips["hour"].min())
    sub_chips, sub_nodes = subhourly(td, ev, model) if subhour else subhourly(td, ev, model, replay=False)
    # a step within the hour that takes a chip out adds its hour, and the episode starts at that step
    flagged = pl.concat([chips.filter(out_of_service(chips)).select(*CHIP_KEY, "hour", "source"),
                         sub_chips.select(*CHIP_KEY, "hour", "source")]).unique(CHIP_KEY + ["hour"], keep="first")
    chip_eps = episodes(flagged.select(*CHIP_KEY, "hour"), RETURN_H)
    # which source started each episode
    chip_eps = chip_eps.join(flagged.rename({"hour": "start_hour"}), on=CHIP_KEY + ["start_hour"], how="left")
    chip_eps = _start_ms(chip_eps, sub_chips, CHIP_KEY)
    nodes = ev.nodes
    node_flags = pl.concat([nodes.filter(out_of_service(nodes)).select(*NODE_KEY, "hour") if not nodes.is_empty()
                            else sub_nodes.select(*NODE_KEY, "hour").clear(), sub_nodes.select(*NODE_KEY, "hour")])
    node_eps = _start_ms(episodes(node_flags, RETURN_H), sub_nodes, NODE_KEY)
    fails = td.failures.filter(pl.col("ts") >= start_h * HOUR_MS)
    if hours_from is not None:
        fails = fails.filter(pl.col("ts") >= hours_from * HOUR_MS)
    h_ms = HORIZON_H * HOUR_MS

    # ---- failures caught before they happened
    def first_before(f: pl.DataFrame, eps: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
        f = f.with_row_index("_f")
        if eps.is_empty():
            return f.with_columns(lead_h=pl.lit(None, pl.Float64), detect_h=pl.lit(None, pl.Float64))
        j = f.join(eps.select(*keys, "e_ms"), on=keys, how="left")
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
        e = eps.with_row_index("_e")
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
        starts = pl.concat([ce.select("node", "e_ms", "ok"), ne.select("node", "e_ms", "ok")])
        j = starts.join(s, on="node")
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
        "evaluated": "every 5 min" if subhour else "hour ends",
        "started_within_hour": sub_chips.height + sub_nodes.height,
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
        f"model: {rep['model']}, evaluated at {rep['evaluated']} ({rep['started_within_hour']} cordons start within an hour)",
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
