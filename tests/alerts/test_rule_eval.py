"""The collector's rule evaluator on a real DuckDB store and the real PromQL engine.

Samples go in through the single ingest path (Writer.write); evaluation times are explicit, so
pending -> firing -> resolved, keep_firing_for and Alertmanager resends are checked step by step.
"""

from __future__ import annotations

import pytest

from agent.catalog import catalog
from collector.promql.engine import Engine
from collector.rules.evaluator import RuleManager, _go_e
from collector.rules.loader import RuleFileError, load_rule_files, parse_rule_file
from collector.rules.template import TemplateError, Template, go_float, humanize, humanize_percentage
from collector.store.core import Store
from collector.store.writer import Writer
from tests.support import ROOT

T0 = 1_700_000_000          # seconds; a round start for readable arithmetic
CHIP = {"cluster": "c1", "node": "n001", "rack": "r01", "chip": "3", "uuid": "GPU-5f1c9e2a",
        "vendor": "nvidia", "model": "NVIDIA H100 80GB HBM3"}


@pytest.fixture
def store():
    s = Store(":memory:")
    yield s
    s.close()


def write_gauge(writer, otel_name, labels, values, step_s=30, start=T0):
    name = catalog().prom(otel_name)
    res = writer.write([(name, labels, (start + i * step_s) * 1000, v) for i, v in enumerate(values)])
    assert res.accepted == len(values), res.errors


def manager_for(store, text, **kw):
    sent: list[list[dict]] = []
    groups = parse_rule_file(text, "test.yaml")
    m = RuleManager(groups, Engine(store), notify=sent.append, external_url="http://collector:9600", **kw)
    return m, sent


def test_shipped_rule_pending_firing_resolved_and_notified(store):
    """GpuRowRemapFailure from alerts/shopfloor.yaml (for: 1m) through the real engine."""
    writer = Writer(store)
    # failure flag 1 for 5 minutes, then 0
    write_gauge(writer, "hw.gpu.row_remap.failure", CHIP, [1] * 10 + [0] * 10)
    groups = [g for g in load_rule_files([str(ROOT / "alerts" / "shopfloor.yaml")])
              if g.name == "shopfloor-accelerators"]
    sent: list[list[dict]] = []
    m = RuleManager(groups, Engine(store), notify=sent.append, resend_delay_s=60,
                    external_labels={"site": "dc1"}, external_url="http://collector:9600")
    group = m.groups[0]
    rule = next(r for r in group.rules if r.name == "GpuRowRemapFailure")

    m.evaluate(group, T0)
    assert rule.state() == "pending" and sent == []
    m.evaluate(group, T0 + 30)
    assert rule.state() == "pending"
    m.evaluate(group, T0 + 60)                       # for: 1m reached
    assert rule.state() == "firing"
    assert len(sent) == 1 and len(sent[0]) == 1
    alert = sent[0][0]
    assert alert["labels"] == {**CHIP, "alertname": "GpuRowRemapFailure", "severity": "critical", "site": "dc1"}
    assert alert["annotations"]["summary"] == "Row remapping failed on n001 GPU 3"
    assert alert["annotations"]["runbook_url"] == "docs/runbooks/GpuRowRemapFailure.md"
    assert alert["startsAt"] == "2023-11-14T22:14:20.000Z"
    assert alert["endsAt"] == "2023-11-14T22:18:20.000Z"  # valid until now + 4 x resend_delay
    assert alert["generatorURL"].startswith("http://collector:9600/graph?g0.expr=hw_gpu_row_remap_failure")

    m.evaluate(group, T0 + 90)                       # within resend_delay: nothing new to send
    assert len(sent) == 1
    m.evaluate(group, T0 + 150)                      # resend_delay passed: re-sent
    assert len(sent) == 2 and sent[1][0]["startsAt"] == alert["startsAt"]

    api = m.active_alerts()
    assert [a["labels"]["alertname"] for a in api] == ["GpuRowRemapFailure"]
    assert api[0]["state"] == "firing" and api[0]["value"] == "1e+00"

    m.evaluate(group, T0 + 330)                      # flag is 0 now: resolved, sent with endsAt
    assert rule.state() == "inactive"
    resolved = sent[-1][0]
    assert resolved["endsAt"] == "2023-11-14T22:18:50.000Z"
    assert m.active_alerts() == []
    n = len(sent)
    m.evaluate(group, T0 + 360)                      # resolved once is enough
    assert len(sent) == n


def test_keep_firing_for_and_pending_that_never_fires(store):
    writer = Writer(store)
    write_gauge(writer, "hw.gpu.row_remap.pending", CHIP, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0], step_s=60)
    write_gauge(writer, "hw.gpu.row_remap.failure", CHIP, [1, 0, 0, 0, 0, 0, 0, 0, 0, 0], step_s=60)
    p, f = catalog().prom("hw.gpu.row_remap.pending"), catalog().prom("hw.gpu.row_remap.failure")
    m, sent = manager_for(store, f"""
groups:
  - name: g
    rules:
      - alert: Sticky
        expr: {p} == 1
        for: 0s
        keep_firing_for: 3m
        labels: {{severity: warning, where: "{{{{ $labels.node }}}}"}}
      - alert: Slow
        expr: {f} == 1
        for: 5m
""")
    g = m.groups[0]
    sticky, slow = g.rules
    m.evaluate(g, T0)
    assert sticky.state() == "firing"                # for: 0 fires on the first evaluation
    assert slow.state() == "pending"
    assert sent[0][0]["labels"]["where"] == "n001"   # label templates are expanded
    m.evaluate(g, T0 + 60)
    assert slow.active == {}                         # pending alerts vanish with their condition
    # pending flag drops to 0 at T0+180; keep_firing_for holds the alert for 3 more minutes
    for t in (180, 240, 300, 330):
        m.evaluate(g, T0 + t)
        assert sticky.state() == "firing", t
    assert "keepFiringSince" in m.active_alerts()[0]
    m.evaluate(g, T0 + 360)
    assert sticky.state() == "inactive"
    assert sent[-1][0]["endsAt"] == "2023-11-14T22:19:20.000Z"


def test_a_failing_rule_is_reported_and_the_others_still_run(store):
    writer = Writer(store)
    write_gauge(writer, "hw.gpu.row_remap.failure", CHIP, [1] * 4)
    write_gauge(writer, "hw.gpu.row_remap.failure", {**CHIP, "chip": "4", "uuid": "GPU-2"}, [1] * 4)
    f = catalog().prom("hw.gpu.row_remap.failure")
    failures = []
    m, sent = manager_for(store, f"""
groups:
  - name: h
    rules:
      - alert: Collides          # both chips get the same label set: Prometheus refuses that
        expr: {f} == 1
        labels: {{chip: same, uuid: same}}
      - alert: Fine
        expr: {f} == 1
""", on_failure=failures.append)
    g = m.groups[0]
    m.evaluate(g, T0 + 30)
    bad, fine = g.rules
    assert bad.health == "err" and "same labelset" in bad.last_error
    assert fine.health == "ok" and fine.state() == "firing" and len(sent[0]) == 2
    assert failures == ["h"]
    assert g.api()["rules"][0]["lastError"] == bad.last_error


def test_recording_rule_writes_through_the_writer(store):
    writer = Writer(store)
    write_gauge(writer, "hw.power", CHIP, [500.0, 510.0])
    write_gauge(writer, "hw.power", {**CHIP, "chip": "4", "uuid": "GPU-2"}, [300.0, 310.0])
    m, _ = manager_for(store, f"""
groups:
  - name: rec
    rules:
      - record: node:accelerator_power:sum
        expr: sum by (node) ({catalog().prom("hw.power")})
""", write=writer.write)
    m.evaluate(m.groups[0], T0 + 30)
    res = Engine(store).instant("node:accelerator_power:sum", T0 + 30)
    assert [(lb["node"], v) for lb, v in res.value] == [("n001", 820.0)]


@pytest.mark.parametrize("text, message", [
    ("groups: [{name: a, rules: [{alert: X, expr: 'rate(x[5m]'}]}]", "bad expression"),
    ("groups: [{name: a, rules: [{alert: X, expr: up, for: soon}]}]", "not a duration"),
    ("groups: [{name: a, rules: [{alert: X, record: y, expr: up}]}]", "exactly one"),
    ("groups: [{name: a, rules: [{alert: X, expr: up, annotations: {s: '{{ range . }}'}}]}]", "unsupported template"),
    ("groups: [{name: a}, {name: a}]", "duplicate group"),
    ("groups: [{name: a, limit: 10}]", "not supported"),
    ("groups: [{name: a, interval: 1h30x}]", "not a duration"),
    ("nothing: here", "groups"),
])
def test_bad_rule_files_are_refused_with_a_reason(text, message):
    with pytest.raises(RuleFileError, match=message):
        parse_rule_file(text, "bad.yaml")


def test_template_subset_matches_prometheus_formatting():
    # Values checked against promtool's rendering in alerts/tests (humanize, percentages) and Go's %v.
    assert [go_float(v) for v in (1.0, 0.5, 1e6, 123456.0, 1e-5, 1380.0)] == \
        ["1", "0.5", "1e+06", "123456", "1e-05", "1380"]
    assert [humanize(v) for v in (0.0, 1380.0, 0.1, 16.666666666666668, 2.5e9)] == \
        ["0", "1.38k", "100m", "16.67", "2.5G"]
    assert humanize_percentage(0.09523809523809523) == "9.524%"
    assert Template('{{ printf "%.1f" $value }}W on {{$labels.node}}').render({"node": "n1"}, 701.26) == "701.3W on n1"
    assert Template("{{ $labels.missing }}|{{ humanize $value }}").render({}, 2048) == "|2.048k"
    assert _go_e(0.05) == "5e-02"
    with pytest.raises(TemplateError):
        Template("{{ $value | title }}")


def test_collector_self_metrics_feed_the_pipeline_alerts():
    """The collector stores its own counters, so ShopfloorCollectorIngestFailing can fire in it."""
    from collector.app import make_context
    from collector.config import from_dict
    from collector.rules.service import build_manager, record_self_metrics

    ctx = make_context(from_dict({"db": ":memory:",
                                  "rules": {"rule_files": [str(ROOT / "alerts" / "shopfloor.yaml")]}}))
    manager = build_manager(ctx)
    group = next(g for g in manager.groups if g.name == "shopfloor-pipeline")
    rule = next(r for r in group.rules if r.name == "ShopfloorCollectorIngestFailing")
    requests = ctx.ingest_metrics.requests
    for i in range(30):                        # 15 minutes at 30 s: 20 of every 110 requests fail
        requests.labels("otlp", "200").inc(90)
        requests.labels("otlp", "500").inc(20)
        assert record_self_metrics(ctx, T0 + 30 * i).accepted >= 2
        manager.evaluate(group, T0 + 30 * i)
    assert rule.state() == "firing"
    alert = manager.active_alerts()[0]
    assert alert["labels"]["job"] == "shopfloor-collector" and alert["labels"]["protocol"] == "otlp"
    assert alert["annotations"]["summary"] == "Collector fails 18.18% of otlp ingest requests"
    ctx.store.close()


def test_rules_and_alerts_api_in_prometheus_format(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from collector.app import make_context
    from collector.config import ConfigError, from_dict
    from collector.rules.service import RulesConfig, make_router

    f = catalog().prom("hw.gpu.row_remap.failure")
    rules = tmp_path / "r.yaml"
    rules.write_text(f"""
groups:
  - name: alerts
    rules:
      - alert: RemapFailed
        expr: {f} == 1
        annotations: {{summary: "chip {{{{ $labels.chip }}}} failed"}}
  - name: records
    rules:
      - record: fleet:remap_failures:sum
        expr: sum({f})
""")
    ctx = make_context(from_dict({"db": ":memory:", "rules": {"rule_files": [str(rules)], "self_metrics": False}}))
    app = FastAPI()
    app.include_router(make_router(ctx))
    assert [j.id for j in ctx.scheduler.get_jobs()] == ["rules:0:alerts", "rules:1:records"]
    write_gauge(ctx.writer, "hw.gpu.row_remap.failure", CHIP, [1, 1])
    manager = ctx.extras["rules"]
    for g in manager.groups:
        manager.evaluate(g, T0 + 30)
    with TestClient(app) as client:
        doc = client.get("/api/v1/rules").json()
        assert doc["status"] == "success"
        groups = {g["name"]: g for g in doc["data"]["groups"]}
        assert set(groups) == {"alerts", "records"} and groups["alerts"]["interval"] == 30.0
        alert_rule = groups["alerts"]["rules"][0]
        assert alert_rule["type"] == "alerting" and alert_rule["state"] == "firing"
        assert alert_rule["alerts"][0]["annotations"] == {"summary": "chip 3 failed"}
        assert groups["records"]["rules"][0] == {**groups["records"]["rules"][0], "type": "recording", "health": "ok"}
        only_alerts = client.get("/api/v1/rules", params={"type": "alert"}).json()["data"]["groups"]
        assert [g["name"] for g in only_alerts] == ["alerts"]
        by_group = client.get("/api/v1/rules", params={"rule_group[]": "records"}).json()["data"]["groups"]
        assert [g["name"] for g in by_group] == ["records"]
        assert client.get("/api/v1/rules", params={"type": "bogus"}).status_code == 400
        alerts = client.get("/api/v1/alerts").json()["data"]["alerts"]
        assert [(a["labels"]["alertname"], a["state"], a["value"]) for a in alerts] == [("RemapFailed", "firing", "1e+00")]
    for bad in ({"interval": "0s"}, {"alertmanager_url": "alertmanager:9093"}, {"nonsense": 1},
                {"self_metrics": "maybe"}):
        with pytest.raises(ConfigError):
            RulesConfig.from_section(bad)


def test_active_alerts_survive_a_restart(store, tmp_path):
    """A restarted collector keeps `for` timers and firing alerts (no resolve-and-re-page)."""
    writer = Writer(store)
    write_gauge(writer, "hw.gpu.row_remap.pending", CHIP, [1] * 40, step_s=60)
    p = catalog().prom("hw.gpu.row_remap.pending")
    text = f"""
groups:
  - name: g
    rules:
      - alert: Pending
        expr: {p} == 1
        for: 10m
"""
    state = tmp_path / "rules-state.json"
    sent: list = []
    first = RuleManager(parse_rule_file(text, "r.yaml"), Engine(store), notify=sent.append, state_path=state)
    for t in range(0, 11 * 60, 60):
        first.evaluate(first.groups[0], T0 + t)
    assert first.groups[0].rules[0].state() == "firing" and len(sent) == 1
    starts_at = sent[0][0]["startsAt"]

    again: list = []
    second = RuleManager(parse_rule_file(text, "r.yaml"), Engine(store), notify=again.append, state_path=state)
    rule = second.groups[0].rules[0]
    assert second.restore_state(now=T0 + 10 * 60 + 20) == 1
    assert rule.state() == "firing"                    # restored, not pending again
    second.evaluate(second.groups[0], T0 + 10 * 60 + 30)
    assert again == [] and rule.state() == "firing"    # last send (at 10 min) was 30 s ago: no duplicate
    second.evaluate(second.groups[0], T0 + 13 * 60)
    assert again[0][0]["startsAt"] == starts_at        # the same alert, re-sent

    # an hour-old state file is not trusted
    stale = RuleManager(parse_rule_file(text, "r.yaml"), Engine(store), state_path=state)
    assert stale.restore_state(now=T0 + 13 * 60 + 3601) == 0
    state.write_text("{broken")
    assert RuleManager(parse_rule_file(text, "r.yaml"), Engine(store), state_path=state).restore_state() == 0
