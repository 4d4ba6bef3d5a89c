"""Live health evaluation in the collector, and its HTTP API.

    GET /api/v1/health/chips[?state=failing&cluster=..&node=..]   current verdicts with reasons

A job on the collector's scheduler (every `health.interval`, default 5 min) reads recent data
from the store through the same feature layer and evaluation code as the backtest
(features.read_hours + evaluate.evaluate), writes `shopfloor_health_risk_ratio` and
`shopfloor_health_state` through the collector's Writer, and hands the verdicts to remediation
(collector.remediate) when a `remediation` section is configured: one call, `apply(verdicts)`.

Complete hours are rolled up once and kept (8 days: the 7-day baseline plus a day); each run
reads only the hours it has not seen plus the current, partial one.

Config (the collector YAML's `health:` section; every key optional):
    health:
      enabled: true
      interval: 300            # seconds between evaluations
      model: /path/risk.joblib # default: the packaged collector/health/models/risk-v1.joblib
      jobs: squeue             # squeue | label:<name> | none   (job membership for fate-sharing)
      squeue: squeue           # commands, for `jobs: squeue`
      scontrol: scontrol
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import polars as pl
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from agent.catalog import catalog

from . import fate
from . import model as risk_model
from .evaluate import evaluate, verdicts
from .features import HOUR_MS, Rollup, StoreSource, _empty_carry, concat_rollups, read_hours
from .verdict import State, Verdict

log = logging.getLogger("shopfloor.health")

KNOWN = {"enabled", "interval", "model", "jobs", "squeue", "scontrol", "history_days"}


class HealthConfigError(ValueError):
    pass


def parse_config(section: dict | None) -> dict[str, Any]:
    section = dict(section or {})
    unknown = set(section) - KNOWN
    if unknown:
        raise HealthConfigError(f"health: unknown keys {sorted(unknown)} (known: {sorted(KNOWN)})")
    interval = float(section.get("interval", 300))
    if not 1 <= interval <= 86400:
        raise HealthConfigError("health.interval: seconds between 1 and 86400")
    jobs = str(section.get("jobs", "none"))
    if jobs not in ("squeue", "none") and not jobs.startswith("label:"):
        raise HealthConfigError("health.jobs: squeue, label:<name> or none")
    return {"enabled": bool(section.get("enabled", True)), "interval": interval,
            "model": section.get("model"), "jobs": jobs, "squeue": str(section.get("squeue", "squeue")),
            "scontrol": str(section.get("scontrol", "scontrol")),
            "history_days": float(section.get("history_days", 8))}


class LiveHealth:
    """Evaluates the store's recent data; keeps the latest verdicts."""

    def __init__(self, store, writer=None, cfg: dict | None = None, remediate=None):
        self.store = store
        self.writer = writer
        self.cfg = parse_config(cfg)
        self.remediate = remediate          # callable(list[Verdict]) or None
        try:
            self.model: risk_model.RiskModel | None = risk_model.load(self.cfg["model"])
        except FileNotFoundError as exc:
            log.warning("health: %s; rules only", exc)
            self.model = None
        self.source = StoreSource(store)
        self.lock = threading.Lock()
        self.latest: list[Verdict] = []
        self.evaluated_at: float | None = None
        self._hours: Rollup | None = None       # complete hours rolled up so far
        self._events = pl.DataFrame()
        self._end_ms: int | None = None          # end of the last complete hour read
        self._data_start: int | None = None

    # ------------------------------------------------------------------ data
    def _jobs(self) -> pl.DataFrame | None:
        mode = self.cfg["jobs"]
        try:
            if mode == "squeue":
                return fate.jobs_from_squeue(self.cfg["squeue"], self.cfg["scontrol"])
            if mode.startswith("label:"):
                label = mode.split(":", 1)[1]
                return self.store.cursor().sql(
                    "SELECT DISTINCT labels[?] AS job, labels['node'] AS node, 0::BIGINT AS start, "
                    "(1::BIGINT << 62) AS \"end\" FROM series WHERE labels[?] IS NOT NULL AND labels['node'] IS NOT NULL",
                    params=[label, label]).pl()
        except Exception as exc:  # noqa: BLE001 - fate-sharing then groups by rack only; say so
            log.warning("health: job membership unavailable (%s); fate-sharing groups by rack only", exc)
        return None

    def _refresh(self, now_ms: int) -> tuple[Rollup, pl.DataFrame, int]:
        hour_start = now_ms - now_ms % HOUR_MS
        keep_from = hour_start - int(self.cfg["history_days"] * 24) * HOUR_MS
        if self._end_ms is None or self._end_ms < keep_from:
            rng = self.source.time_range()
            first = keep_from if rng is None else max(keep_from, rng[0] - rng[0] % HOUR_MS)
            self._data_start = first
            self._hours, self._events, self._end_ms = None, pl.DataFrame(), first
        assert self._end_ms is not None and self._data_start is not None
        carry = self._hours.carry if self._hours is not None else None
        xcarry = self._hours.xcarry if self._hours is not None else None
        if self._end_ms < hour_start:           # new complete hours
            r, ev = read_hours(self.source, self._end_ms, hour_start, carry=carry, xcarry=xcarry,
                               data_start_ms=self._data_start)
            parts = [p for p in (self._hours, r) if p is not None and not p.chips.is_empty()]
            merged = concat_rollups(parts) if parts else r
            merged.carry, merged.xcarry = r.carry, r.xcarry
            merged.chips = merged.chips.filter(pl.col("hour") >= keep_from // HOUR_MS) if not merged.chips.is_empty() else merged.chips
            merged.nodes = merged.nodes.filter(pl.col("hour") >= keep_from // HOUR_MS) if not merged.nodes.is_empty() else merged.nodes
            self._hours = merged
            evs = [e for e in (self._events, ev) if not e.is_empty()]
            self._events = pl.concat(evs).filter(pl.col("ts") >= keep_from) if evs else ev
            self._end_ms = hour_start
        # the current, partial hour: read, not kept
        cur, cur_ev = read_hours(self.source, hour_start, now_ms + 1,
                                 carry=self._hours.carry if self._hours else None,
                                 xcarry=self._hours.xcarry if self._hours else None, data_start_ms=self._data_start)
        parts = [p for p in (self._hours, cur) if p is not None and not p.chips.is_empty()]
        r = concat_rollups(parts) if parts else Rollup(pl.DataFrame(), pl.DataFrame(), _empty_carry())
        evs = [e for e in (self._events, cur_ev) if not e.is_empty()]
        return r, (pl.concat(evs) if evs else cur_ev), hour_start // HOUR_MS

    # ------------------------------------------------------------------ evaluation
    def run_once(self, now_ms: int | None = None) -> list[Verdict]:
        now_ms = int(time.time() * 1000) if now_ms is None else int(now_ms)
        r, events, hour = self._refresh(now_ms)
        if r.chips.is_empty():
            out: list[Verdict] = []
        else:
            ev = evaluate(r, events, self._jobs(), self.model, end_hour=hour, hours_from=hour, now_ms=now_ms)
            out = verdicts(ev, self.model, hour=hour)
        with self.lock:
            self.latest, self.evaluated_at = out, now_ms / 1000.0
        if self.writer is not None and out:
            self.writer.write(metric_rows(out, now_ms))
        if self.remediate is not None and out:
            self.remediate(out)
        return out

    def safe_run(self) -> None:
        try:
            self.run_once()
        except Exception:  # noqa: BLE001 - a failed evaluation must not kill the scheduler job
            log.exception("health evaluation failed")


def metric_rows(vs: list[Verdict], now_ms: int) -> list[tuple[str, dict, int, float | None]]:
    """shopfloor_health_risk_ratio and shopfloor_health_state rows for chip verdicts."""
    cat = catalog()
    risk_name, state_name = cat.prom("shopfloor.health.risk"), cat.prom("shopfloor.health.state")
    rows: list[tuple[str, dict, int, float | None]] = []
    for v in vs:
        if v.source == "fate-sharing" or not v.chip.chip:
            continue
        c = v.chip
        labels = {"cluster": c.cluster, "node": c.node, "rack": c.rack, "chip": c.chip, "uuid": c.uuid,
                  "vendor": c.vendor, "model": c.model}
        labels = {k: val for k, val in labels.items() if val}
        if v.risk is not None:
            rows.append((risk_name, labels, now_ms, float(v.risk)))
        for s in State:
            rows.append((state_name, {**labels, "state": s.value}, now_ms, 1.0 if s == v.state else 0.0))
    return rows


def verdict_json(v: Verdict) -> dict[str, Any]:
    return {"cluster": v.chip.cluster, "node": v.chip.node, "chip": v.chip.chip, "uuid": v.chip.uuid,
            "rack": v.chip.rack, "vendor": v.chip.vendor, "model": v.chip.model,
            "state": v.state.value, "action": v.action.value, "source": v.source, "risk": v.risk,
            "reasons": list(v.reasons), "observed_at": v.observed_at, "job": v.job, "evidence": v.evidence}


def make_router(ctx) -> APIRouter:
    cfg = parse_config(getattr(ctx.config, "health", None))
    remediate = None
    if getattr(ctx.config, "remediation", None):
        def remediate(vs: list[Verdict]) -> None:    # the one coupling to remediation
            from collector.remediate.service import remediator_for

            remediator_for(ctx).apply(vs)
    live = LiveHealth(ctx.store, ctx.writer, getattr(ctx.config, "health", None), remediate)
    ctx.extras["health"] = live
    if cfg["enabled"]:
        ctx.scheduler.add_job(live.safe_run, "interval", seconds=cfg["interval"], id="health-evaluate",
                              max_instances=1, coalesce=True)
    router = APIRouter()

    @router.get("/api/v1/health/chips")
    def chips(request: Request, state: str | None = None, cluster: str | None = None, node: str | None = None):
        if state is not None and state not in {s.value for s in State}:
            return JSONResponse({"status": "error", "errorType": "bad_data",
                                 "error": f"state must be one of {[s.value for s in State]}"}, status_code=400)
        with live.lock:
            vs, at = list(live.latest), live.evaluated_at
        sel = [v for v in vs if (state is None or v.state.value == state)
               and (cluster is None or v.chip.cluster == cluster) and (node is None or v.chip.node == node)]
        return {"status": "success", "data": {"evaluated_at": at, "verdicts": [verdict_json(v) for v in sel]}}

    return router
