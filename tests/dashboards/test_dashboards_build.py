"""The dashboards: generated from code, fresh, consistent, and built only from catalog names."""

from __future__ import annotations

import importlib.util
import json
import re

import promql_parser
import yaml

from agent.catalog import catalog
from tests.support import ROOT

DASH = ROOT / "dashboards"


def _build_module():
    spec = importlib.util.spec_from_file_location("dashboards_build", DASH / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((DASH / "json").glob("*.json"))}


def test_committed_json_equals_a_fresh_build():
    built = _build_module().build()
    committed = {p.name: p.read_text() for p in (DASH / "json").glob("*.json")}
    assert set(built) == set(committed)
    for name, text in built.items():
        assert committed[name] == text, f"dashboards/json/{name} is stale: run .venv/bin/python dashboards/build.py"


def test_build_py_spells_no_metric_name():
    text = (DASH / "build.py").read_text()
    names = {m.prom_name for m in catalog()}
    assert not names & set(re.findall(r"[a-z_][a-z0-9_]*", text))


def test_every_metric_the_agent_and_health_layer_emit_is_on_a_dashboard():
    text = " ".join(p.read_text() for p in (DASH / "json").glob("*.json"))
    # collector self-metrics live on the collector's own /metrics, not in the store
    wanted = [m.prom_name for m in catalog() if "collector" not in m.sources]
    missing = [n for n in wanted if not re.search(rf"\b{n}\b", text)]
    assert missing == []


def test_dashboards_have_the_required_shape():
    dashes = _dashboards()
    assert set(d["uid"] for d in dashes.values()) == {
        "shopfloor-fleet", "shopfloor-node", "shopfloor-chip", "shopfloor-power", "shopfloor-efa",
        "shopfloor-trainium", "shopfloor-capacity", "shopfloor-health"}
    for name, d in dashes.items():
        var_names = [v["name"] for v in d["templating"]["list"]]
        assert var_names[0] == "datasource" and "cluster" in var_names, name
        for v in d["templating"]["list"][1:]:
            assert v["query"]["query"].startswith("label_values("), (name, v["name"])
        panels = [p for p in d["panels"] if p["type"] != "row"]
        assert d["panels"][0]["type"] == "row" and len(panels) >= 6, name
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), name
        for p in panels:
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["fieldConfig"]["defaults"]["unit"], (name, p["title"])
            assert p["targets"] and all(t["expr"] for t in p["targets"]), (name, p["title"])
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (name, p["title"])
    # the fleet overview opens with one row of stat panels: the most important numbers
    fleet = dashes["fleet-overview.json"]["panels"]
    top = [p for p in fleet if p["gridPos"]["y"] == 1]
    assert len(top) == 6 and all(p["type"] == "stat" for p in top)
    # chip variables are filtered by the variables before them
    chip_var = next(v for v in dashes["chip-detail.json"]["templating"]["list"] if v["name"] == "chip")
    assert 'node=~"$node"' in chip_var["query"]["query"]


def test_every_query_parses():
    n = 0
    for name, d in _dashboards().items():
        for p in d["panels"]:
            for t in p.get("targets", []):
                expr = re.sub(r"\$__(rate_interval|interval|range)", "5m", t["expr"])
                expr = re.sub(r"\$(cluster|vendor|node|chip)", ".*", expr)
                promql_parser.parse(expr)
                n += 1
    assert n >= 100


def test_provisioning_points_grafana_at_the_collector_and_the_json():
    ds = yaml.safe_load((DASH / "provisioning/datasources/shopfloor.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["uid"] == "shopfloor" and ds["access"] == "proxy"
    assert ds["jsonData"]["httpHeaderName1"] == "Authorization"
    prov = yaml.safe_load((DASH / "provisioning/dashboards/shopfloor.yaml").read_text())["providers"][0]
    assert prov["type"] == "file" and prov["options"]["path"].endswith("/shopfloor")
    for d in _dashboards().values():
        ds_var = d["templating"]["list"][0]
        assert ds_var["current"]["value"] == ds["uid"]
