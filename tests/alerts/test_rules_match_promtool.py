"""The collector's evaluator gives the alerts Prometheus gives, on every promtool unit test.

alerts/tests/shopfloor_test.yaml is checked by `promtool test rules` (Prometheus' own evaluator,
tests/alerts/test_alert_rules.py). Here the same input series go into a DuckDB store through the
Writer, the collector's RuleManager evaluates the same rule every evaluation_interval like
promtool does, and at each eval_time its firing alerts must have exactly the expected labels and
annotations. A difference means the collector's PromQL engine, `for` handling or templating
disagrees with Prometheus.
"""

from __future__ import annotations

import re

import pytest
import yaml

from collector.promql.engine import Engine
from collector.rules.evaluator import RuleManager
from collector.rules.loader import GroupSpec, load_rule_files
from collector.store.core import Store
from collector.store.writer import Writer
from tests.support import ROOT

BASE_S = 1_700_000_000       # promtool's t=0, shifted to a realistic epoch
TEST_FILE = ROOT / "alerts" / "tests" / "shopfloor_test.yaml"
DOC = yaml.safe_load(TEST_FILE.read_text())
RULES = {r.name: (g, r) for g in load_rule_files([str(ROOT / "alerts" / "shopfloor.yaml")]) for r in g.rules}


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d)", text))


def expand(values: str) -> list[float | None]:
    """promtool's series notation: 'a+bxn', 'a-bxn', 'axn', '_', '_xn' (None = no sample)."""
    out: list[float | None] = []
    for item in values.split():
        if m := re.fullmatch(r"_x(\d+)", item):
            out += [None] * int(m.group(1))
        elif item == "_":
            out.append(None)
        elif m := re.fullmatch(r"(-?[\d.]+)([+-])([\d.]+)x(\d+)", item):
            a, sign, b, n = float(m.group(1)), m.group(2), float(m.group(3)), int(m.group(4))
            step = b if sign == "+" else -b
            out += [a + i * step for i in range(n + 1)]
        elif m := re.fullmatch(r"(-?[\d.]+)x(\d+)", item):
            out += [float(m.group(1))] * (int(m.group(2)) + 1)
        else:
            out.append(float(item))
    return out


def parse_series(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition("{")
    labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
    return name, labels


CASES = [(t, a["alertname"]) for t in DOC["tests"] for a in t["alert_rule_test"][:1]]


@pytest.mark.parametrize("test,alertname", CASES, ids=[c[1] for c in CASES])
def test_collector_agrees_with_promtool(test, alertname):
    interval = duration_s(test.get("interval", "1m"))
    store = Store(":memory:")
    rows = []
    for s in test["input_series"]:
        name, labels = parse_series(s["series"])
        for i, v in enumerate(expand(s["values"])):
            if v is not None:
                rows.append((name, labels, int((BASE_S + i * interval) * 1000), v))
    assert Writer(store).write(rows).accepted == len(rows)

    group, rule = RULES[alertname]
    manager = RuleManager([GroupSpec(group.name, group.file, group.interval_s, [rule])], Engine(store))
    g = manager.groups[0]
    step = duration_s(DOC.get("evaluation_interval", "1m"))
    checks = sorted(test["alert_rule_test"], key=lambda c: duration_s(c["eval_time"]))
    t = 0.0
    for check in checks:
        until = duration_s(check["eval_time"])
        while t <= until:
            manager.evaluate(g, BASE_S + t)
            t += step
        got = sorted(((a["labels"], a["annotations"]) for a in manager.active_alerts() if a["state"] == "firing"),
                     key=repr)
        want = sorted((({**e.get("exp_labels", {}), "alertname": alertname}, e.get("exp_annotations", {}))
                       for e in check["exp_alerts"]), key=repr)
        assert got == want, f"{alertname} at {check['eval_time']}"
    store.close()
