"""Every PromQL expression the project ships (Grafana panels, alert rules) runs on this engine.

The dashboards (dashboards/json/*.json) and alert rules (alerts/*.yaml) are written for
Prometheus; here each expression is evaluated as a 1-hour range query over a simulated fleet
(tests/promql/fleet.py) so an unsupported function, a parse problem or an execution error in any
of them fails this test. Grafana's variables are replaced by what Grafana would send.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from collector.promql.engine import Engine
from collector.store.core import Store
from collector.store.writer import Writer
from tests.promql import fleet
from tests.support import ROOT

END_MS = 1_800_000_000_000


def _walk_exprs(obj, out: list[str]) -> None:
    if isinstance(obj, dict):
        if isinstance(obj.get("expr"), str) and obj["expr"].strip():
            out.append(obj["expr"])
        for v in obj.values():
            _walk_exprs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _walk_exprs(v, out)


def shipped_expressions() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for path in sorted((ROOT / "dashboards").glob("**/*.json")):
        exprs: list[str] = []
        _walk_exprs(json.loads(path.read_text()), exprs)
        found += [(path.relative_to(ROOT).as_posix(), e) for e in exprs]
    for path in sorted((ROOT / "alerts").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for group in doc.get("groups", []):
            for rule in group.get("rules", []):
                found.append((path.relative_to(ROOT).as_posix(), rule["expr"]))
    return found


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's built-in and template variables as Grafana does before sending."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    expr = re.sub(r"\$\{__(rate_interval|interval|range)\}", "5m", expr)
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", ".*", expr)    # template variables: "All"


EXPRS = shipped_expressions()


@pytest.fixture(scope="module")
def engine():
    store = Store(":memory:")
    rows = []
    for labels, ts, vs in fleet.fleet(chips=16, duration_s=3600, step_s=30, end_ms=END_MS):
        lb = dict(labels)
        name = lb.pop("__name__")
        rows += [(name, lb, int(t), float(v)) for t, v in zip(ts.tolist(), vs.tolist())]
    assert Writer(store).write(rows).accepted == len(rows)
    yield Engine(store)
    store.close()


@pytest.mark.skipif(not EXPRS, reason="no dashboards/alerts in this checkout yet")
@pytest.mark.parametrize("where,expr", EXPRS, ids=[f"{w}:{i}" for i, (w, _) in enumerate(EXPRS)])
def test_shipped_expression_runs(engine, where, expr):
    query = grafana_to_promql(expr)
    end = END_MS / 1000
    res = engine.range(query, end - 3600, end, 60)
    assert res.type == "matrix"
    inst = engine.instant(query, end)
    assert inst.type in ("vector", "scalar")
