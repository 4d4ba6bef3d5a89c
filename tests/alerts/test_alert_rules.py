"""The alert rule files: fresh from their templates, accepted by promtool, unit-tested per alert.

promtool (Debian's `prometheus` package) is Prometheus' own checker; its `test rules` runs our
rules on synthetic series with Prometheus' real evaluator, so the expected labels and annotations
in alerts/tests/*.yaml are checked against the reference implementation.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess

import pytest
import yaml

from agent.catalog import catalog
from collector.rules.template import Template
from tests.support import ROOT, require_binary

ALERTS = ROOT / "alerts"
RULE_FILES = sorted(ALERTS.glob("*.yaml"))
TEST_FILES = sorted((ALERTS / "tests").glob("*.yaml"))


def _render_module():
    spec = importlib.util.spec_from_file_location("alerts_render", ALERTS / "render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rules():
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    yield path, group, rule


def test_rendered_files_are_fresh():
    render = _render_module()
    outputs = render.outputs()
    assert set(outputs) == set(RULE_FILES) | set(TEST_FILES), "rendered set differs from committed files"
    assert render.stale() == [], "run .venv/bin/python alerts/render.py and commit the result"


def test_unknown_metric_in_a_template_is_refused():
    render = _render_module()
    with pytest.raises(KeyError, match="hw.gpu.nonsense"):
        render.render_text("expr: {{hw.gpu.nonsense}} > 0\n", source="x.yaml.in")
    # Prometheus' own templates pass through untouched; catalog names are replaced.
    out = render.render_text('a: "{{ $labels.node }} {{hw.power}}"\n', source="x.yaml.in")
    assert '"{{ $labels.node }} ' + catalog().prom("hw.power") + '"' in out


def test_templates_spell_no_metric_name():
    prom_names = {m.prom_name for m in catalog()}
    for src in (ALERTS / "src").rglob("*.yaml.in"):
        text = re.sub(r"\{\{[a-z0-9_.]+\}\}", "", src.read_text())
        words = set(re.findall(r"[a-z_][a-z0-9_]*", text))
        assert not (words & prom_names), f"{src}: spell {words & prom_names} as {{{{otel.name}}}}"


def test_promtool_check_rules():
    promtool = require_binary("promtool")
    res = subprocess.run([promtool, "check", "rules", *map(str, RULE_FILES)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_promtool_unit_tests_pass():
    promtool = require_binary("promtool")
    res = subprocess.run([promtool, "test", "rules", *[p.name for p in TEST_FILES]],
                         cwd=ALERTS / "tests", capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_catch_a_wrong_expectation(tmp_path):
    """The promtool harness can fail: flip one expected annotation and it must."""
    promtool = require_binary("promtool")
    doc = yaml.safe_load((ALERTS / "tests" / "shopfloor_test.yaml").read_text())
    doc["rule_files"] = [str(p) for p in RULE_FILES]
    case = next(t for t in doc["tests"] for a in t["alert_rule_test"] if a["exp_alerts"])
    firing = next(a for a in case["alert_rule_test"] if a["exp_alerts"])
    firing["exp_alerts"][0]["exp_annotations"]["summary"] += " (wrong)"
    doc["tests"] = [case]
    bad = tmp_path / "bad_test.yaml"
    bad.write_text(yaml.safe_dump(doc))
    res = subprocess.run([promtool, "test", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "FAILED" in res.stdout + res.stderr


def test_every_alert_is_tested_firing_and_quiet():
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in TEST_FILES:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for _, _, rule in _rules()}
    assert names - firing == set(), "alerts without a firing unit test"
    assert names - quiet == set(), "alerts without a not-firing unit test"


def test_every_alert_has_for_severity_annotations_and_a_runbook():
    seen = set()
    for path, group, rule in _rules():
        name = rule["alert"]
        assert name not in seen, f"duplicate alert {name}"
        seen.add(name)
        assert "for" in rule, f"{name}: no for:"
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        ann = rule["annotations"]
        assert ann.get("summary") and ann.get("description"), name
        assert ann["runbook_url"] == f"docs/runbooks/{name}.md", name
        book = ROOT / ann["runbook_url"]
        assert book.is_file(), f"{name}: runbook {book} missing"
        text = book.read_text()
        assert text.startswith(f"# {name}\n") and "## What to check" in text and "## What to do" in text


def test_collector_evaluator_understands_every_annotation():
    """The collector's template subset covers every annotation and label our rules use."""
    for _, _, rule in _rules():
        for text in [*rule["annotations"].values(), *rule.get("labels", {}).values()]:
            Template(text).render({"node": "n1", "chip": "0"}, 1.5)
    assert len(list(_rules())) >= 20
