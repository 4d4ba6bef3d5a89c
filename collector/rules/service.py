"""The collector's rule evaluation service: config, scheduling and the Prometheus rules API.

Config section `rules` of the collector's YAML:

    rules:
      rule_files: [alerts/*.yaml]        # Prometheus rule files (globs; relative to the working dir)
      interval: 30s                      # for groups that do not set their own
      alertmanager_url: http://127.0.0.1:9093   # one URL or a list; absent = evaluate only
      alertmanager_timeout: 10s
      resend_delay: 1m                   # Prometheus' --rules.alert.resend-delay
      external_url: http://collector.example:9600   # generatorURL prefix (default: the listen address)
      external_labels: {site: dc1}       # added to alerts sent to Alertmanager
      self_metrics: true                 # store the collector's own catalog metrics every interval
                                         # (default: on when rule_files are configured)
      state_file: /var/lib/shopfloor/rules-state.json   # active alerts across restarts
                                         # (default: next to the DuckDB file; none for :memory:)

Self-metrics: the pipeline alerts (ingest failing, shedding, rule failures, notification
failures) query the collector's own counters, which live on its /metrics registry, not in the
store. With self_metrics on, every `interval` the samples of catalog metrics on ctx.registry are
written through the single ingest path (Writer.write) with job="shopfloor-collector" and
instance=<listen address>, so the collector's rules, dashboards and SQL see them like any series.

make_router(ctx) loads the files (a bad file stops the collector's start with the file named),
schedules one apscheduler job per group on ctx.scheduler, and serves GET /api/v1/rules and
GET /api/v1/alerts in Prometheus' JSON format, which Grafana's alerting view reads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping

from fastapi import APIRouter, Query
from prometheus_client import Counter

from agent.catalog import catalog
from collector.config import ConfigError, parse_duration
from collector.rules.alertmanager import AlertmanagerClient
from collector.rules.evaluator import RuleManager
from collector.rules.loader import load_rule_files

log = logging.getLogger("shopfloor.rules")

_KEYS = {"rule_files", "interval", "alertmanager_url", "alertmanager_timeout", "resend_delay",
         "external_url", "external_labels", "self_metrics", "state_file"}


@dataclass
class RulesConfig:
    rule_files: list[str] = field(default_factory=list)
    interval_s: float = 30.0
    alertmanager_urls: list[str] = field(default_factory=list)
    alertmanager_timeout_s: float = 10.0
    resend_delay_s: float = 60.0
    external_url: str = ""
    external_labels: dict[str, str] = field(default_factory=dict)
    self_metrics: bool = False
    state_file: str | None = None

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None) -> "RulesConfig":
        section = dict(section or {})
        unknown = set(section) - _KEYS
        if unknown:
            raise ConfigError(f"rules: unknown keys {sorted(unknown)} (known: {sorted(_KEYS)})")
        cfg = cls()
        files = section.get("rule_files") or []
        cfg.rule_files = [files] if isinstance(files, str) else [str(f) for f in files]
        if "interval" in section:
            cfg.interval_s = parse_duration(section["interval"], "rules.interval")
        if "alertmanager_timeout" in section:
            cfg.alertmanager_timeout_s = parse_duration(section["alertmanager_timeout"], "rules.alertmanager_timeout")
        if "resend_delay" in section:
            cfg.resend_delay_s = parse_duration(section["resend_delay"], "rules.resend_delay")
        for name in ("interval_s", "alertmanager_timeout_s", "resend_delay_s"):
            if getattr(cfg, name) <= 0:
                raise ConfigError(f"rules.{name.removesuffix('_s')}: must be positive")
        urls = section.get("alertmanager_url") or []
        cfg.alertmanager_urls = [urls] if isinstance(urls, str) else [str(u) for u in urls]
        for u in cfg.alertmanager_urls:
            if not u.startswith(("http://", "https://")):
                raise ConfigError(f"rules.alertmanager_url: {u!r} is not an http(s) URL")
        cfg.external_url = str(section.get("external_url") or "")
        labels = section.get("external_labels") or {}
        if not isinstance(labels, Mapping):
            raise ConfigError("rules.external_labels: must be a mapping")
        cfg.external_labels = {str(k): str(v) for k, v in labels.items()}
        flag = section.get("self_metrics", bool(cfg.rule_files))   # for the rules: on when there are some
        if not isinstance(flag, bool):
            raise ConfigError("rules.self_metrics: must be true or false")
        cfg.self_metrics = flag
        cfg.state_file = str(section["state_file"]) if section.get("state_file") else None
        return cfg


def _counter_base(otel_name: str) -> str:
    name = catalog().prom(otel_name)     # prometheus_client appends _total itself
    return name.removesuffix("_total")


def build_manager(ctx) -> RuleManager:
    """The RuleManager for a collector context (also used by tests without HTTP)."""
    from collector.promql.engine import Engine, Limits

    cfg = RulesConfig.from_section(ctx.config.rules)
    groups = load_rule_files(cfg.rule_files)
    cat = catalog()
    failures = Counter(_counter_base("shopfloor.collector.rule.evaluation.failures"),
                       cat["shopfloor.collector.rule.evaluation.failures"].help, ["group"],
                       registry=ctx.registry)
    failed_notifications = Counter(_counter_base("shopfloor.collector.alertmanager.notifications.failed"),
                                   cat["shopfloor.collector.alertmanager.notifications.failed"].help,
                                   registry=ctx.registry)
    client = (AlertmanagerClient(cfg.alertmanager_urls, timeout_s=cfg.alertmanager_timeout_s)
              if cfg.alertmanager_urls else None)
    return RuleManager(
        groups, Engine(ctx.store, {k: v for k, v in (ctx.config.query or {}).items()
                                   if k in Limits.__dataclass_fields__}),
        default_interval_s=cfg.interval_s, resend_delay_s=cfg.resend_delay_s,
        external_labels=cfg.external_labels,
        external_url=cfg.external_url or f"http://{ctx.config.listen}",
        notify=client.send if client else None, write=ctx.writer.write,
        on_failure=lambda group: failures.labels(group).inc(),
        on_notify_failure=lambda n: failed_notifications.inc(n),
        state_path=cfg.state_file or _default_state_file(ctx.config.db))


def _default_state_file(db: str) -> str | None:
    if not db or db == ":memory:":
        return None
    return str(Path(db).with_name(Path(db).name + ".rules-state.json"))


def record_self_metrics(ctx, now_s: float | None = None):
    """Write the collector's own catalog metrics (ctx.registry) into the store once."""
    cat = catalog()
    labels = {"job": "shopfloor-collector", "instance": ctx.config.listen}
    ts_ms = int((time.time() if now_s is None else now_s) * 1000)
    rows = []
    for family in ctx.registry.collect():
        for sample in family.samples:
            if cat.by_prom_name(sample.name) is not None:
                rows.append((sample.name, {**sample.labels, **labels}, ts_ms, float(sample.value)))
    return ctx.writer.write(rows)


def make_router(ctx) -> APIRouter:
    cfg = RulesConfig.from_section(ctx.config.rules)
    manager = build_manager(ctx)
    if manager.state_path is not None:
        manager.restore_state()
    ctx.extras["rules"] = manager
    start = datetime.now(timezone.utc) + timedelta(seconds=1)
    if cfg.self_metrics:
        ctx.scheduler.add_job(record_self_metrics, "interval", seconds=cfg.interval_s, args=[ctx],
                              id="rules:self-metrics", name="collector self-metrics",
                              max_instances=1, coalesce=True, next_run_time=start)
    for i, group in enumerate(manager.groups):
        ctx.scheduler.add_job(manager.evaluate, "interval", seconds=group.interval_s, args=[group],
                              id=f"rules:{i}:{group.name}", name=f"rule group {group.name}",
                              max_instances=1, coalesce=True, next_run_time=start)
    log.info("rules: %d group(s), %d rule(s)", len(manager.groups),
             sum(len(g.rules) for g in manager.groups))

    router = APIRouter()

    @router.get("/api/v1/rules")
    def rules(type: str | None = None,
              rule_name: list[str] = Query(default=[], alias="rule_name[]"),
              rule_group: list[str] = Query(default=[], alias="rule_group[]"),
              file: list[str] = Query(default=[], alias="file[]")):
        if type not in (None, "", "alert", "record"):
            return _error(f"unsupported type {type!r}: use alert or record")
        wanted = {"alert": "alerting", "record": "recording"}.get(type or "")
        groups = []
        for g in manager.groups:
            if (rule_group and g.name not in rule_group) or (file and g.spec.file not in file):
                continue
            doc = g.api()
            doc["rules"] = [r for r in doc["rules"]
                            if (not wanted or r["type"] == wanted) and (not rule_name or r["name"] in rule_name)]
            if doc["rules"] or not (wanted or rule_name):
                groups.append(doc)
        return {"status": "success", "data": {"groups": groups}}

    @router.get("/api/v1/alerts")
    def alerts():
        return {"status": "success", "data": {"alerts": manager.active_alerts()}}

    return router


def _error(message: str):
    from fastapi.responses import JSONResponse
    return JSONResponse({"status": "error", "errorType": "bad_data", "error": message}, status_code=400)
