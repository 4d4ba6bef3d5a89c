"""Every panel query of every dashboard runs against a real collector holding a simulated fleet.

The collector is started as a process (`shopfloor collector`), the fleet (fleet_data.py) enters
through OTLP/HTTP with the agent's own encoder, and each query goes through the Prometheus API
that Grafana uses (/api/v1/query_range, /api/v1/series for label_values). A query fails the test
when it errors or returns no series. Variables are substituted twice, the way Grafana would:
  - the dashboards' default, "All" (allValue ".*"), where every panel must return data;
  - concrete values read from the data through each variable's own label_values query, once
    for an NVIDIA chip and once for a Trainium chip; no query may error, and every panel must
    return data for at least one of the two (an NVLink panel has nothing for a Trainium chip).
"""

from __future__ import annotations

import json
import re
import time

import httpx
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
import promql_parser
import pytest

from agent.catalog import catalog
from tests.collector.conftest import start_collector
from tests.dashboards import fleet_data
from tests.support import ROOT

DASHBOARDS = sorted((ROOT / "dashboards" / "json").glob("*.json"))
STEP_S = 60                         # the simulated fleet's collection interval
HISTORY_STEPS = 180                 # three hours of history
TOKEN = "dashboards-query-test"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    now_ms = int(time.time() // STEP_S * STEP_S * 1000)
    start_ms = now_ms - (HISTORY_STEPS - 1) * STEP_S * 1000
    with start_collector(tmp, {"ingest": {"max_body_bytes": 32 << 20, "max_decompressed_bytes": 64 << 20}},
                         token=TOKEN) as c:
        client = httpx.Client(base_url=c.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        for body in fleet_data.otlp_batches(start_ms, HISTORY_STEPS, STEP_S):
            r = client.post("/v1/metrics", content=body, headers={"Content-Type": "application/x-protobuf"})
            assert r.status_code == 200, r.text
            answer = ExportMetricsServiceResponse.FromString(r.content)
            assert answer.partial_success.rejected_data_points == 0, answer.partial_success.error_message
        yield client, now_ms / 1000
        client.close()


def query_range(client, expr: str, end_s: float, range_s: int, step_s: int) -> list:
    r = client.post("/api/v1/query_range", data={"query": expr, "start": end_s - range_s, "end": end_s,
                                                 "step": step_s})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}\n-> {r.status_code} {body}"
    return body["data"]["result"]


def label_values(client, query: str, end_s: float) -> list[str]:
    """Grafana's label_values(selector, label), answered from /api/v1/series."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
    assert m, query
    selector, label = m.groups()
    r = client.get("/api/v1/series", params={"match[]": selector, "start": end_s - 3 * 3600, "end": end_s})
    assert r.status_code == 200, r.text
    return sorted({s[label] for s in r.json()["data"] if label in s})


def substitute(expr: str, values: dict[str, str], step_s: int, range_s: int) -> str:
    # Grafana: $__rate_interval = max(4 x scrape interval, step + scrape interval)
    rate_interval = max(4 * STEP_S, step_s + STEP_S)
    expr = expr.replace("$__rate_interval", f"{rate_interval}s").replace("$__interval", f"{step_s}s")
    expr = expr.replace("$__range", f"{range_s}s")
    for name, value in values.items():
        expr = expr.replace(f"${name}", value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    promql_parser.parse(expr)
    return expr


def panels(dash: dict):
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        step = {"1h": 3600}.get(p.get("interval"), STEP_S)
        for t in p["targets"]:
            yield p["title"], t["expr"], step


def run_all(client, dash: dict, values: dict[str, str], end_s: float) -> dict[tuple[str, str], int]:
    """(panel, expr) -> number of series returned."""
    out = {}
    for title, expr, step in panels(dash):
        range_s = 3 * 3600 if step >= 3600 else 2 * 3600
        q = substitute(expr, values, step, range_s)
        out[(title, expr)] = len(query_range(client, q, end_s, range_s, step))
    return out


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_panel_returns_data_with_all_selected(fleet, path):
    client, end_s = fleet
    dash = json.loads(path.read_text())
    names = [v["name"] for v in dash["templating"]["list"] if v["type"] == "query"]
    results = run_all(client, dash, {n: ".*" for n in names}, end_s)
    empty = [f"{title}: {expr}" for (title, expr), n in results.items() if n == 0]
    assert empty == [], "panels without data:\n" + "\n".join(empty)


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_panel_with_concrete_variable_values(fleet, path):
    client, end_s = fleet
    dash = json.loads(path.read_text())
    qvars = [v for v in dash["templating"]["list"] if v["type"] == "query"]
    seen_data: dict[tuple[str, str], int] = {}
    for vendor in ("nvidia", "aws"):
        values: dict[str, str] = {}
        for v in qvars:
            query = v["query"]["query"]
            for name, val in values.items():
                query = query.replace(f"${name}", val)
            if v["name"] == "cluster":          # start from a cluster of this vendor
                query = _with_vendor(query, vendor)
            options = label_values(client, query, end_s)
            assert options, f"variable {v['name']}: {query} has no values"
            values[v["name"]] = options[0]
        if "vendor" in values and values["vendor"] != vendor:
            values["vendor"] = vendor
        if dash["uid"] == "shopfloor-trainium" and vendor == "nvidia":
            continue                              # the Trainium dashboard pins vendor="aws"
        for key, n in run_all(client, dash, values, end_s).items():
            seen_data[key] = seen_data.get(key, 0) + n
    empty = [f"{title}: {expr}" for (title, expr), n in seen_data.items() if n == 0]
    assert empty == [], "panels without data for any concrete chip:\n" + "\n".join(empty)


def _with_vendor(query: str, vendor: str) -> str:
    """The cluster variable's query restricted to clusters that have this vendor's chips."""
    m = re.fullmatch(r"label_values\((\w+)(?:\{(.*)\})?,\s*(\w+)\)", query.strip())
    assert m, query
    metric, inner, label = m.groups()
    if 'vendor="' in (inner or ""):
        return query
    inner = ", ".join(x for x in (inner, f'vendor="{vendor}"') if x)
    return f"label_values({metric}{{{inner}}}, {label})"


def test_a_broken_query_is_caught(fleet):
    """The harness fails on errors and on empty answers (so the tests above can fail)."""
    client, end_s = fleet
    with pytest.raises(AssertionError):
        query_range(client, "sum(rate(", end_s, 600, 60)
    assert query_range(client, catalog().prom("hw.power") + '{chip="no-such-chip"}', end_s, 600, 60) == []
