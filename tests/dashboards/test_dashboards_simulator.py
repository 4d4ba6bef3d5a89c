"""The dashboards against the project's own fleet simulator (`shopfloor simulate`, agent/simulate).

fleet_data.py guarantees every metric exists; this test checks the panels against the label
conventions of the simulator, which models the real sources (sensor names, EFA counter files,
clock-event reasons, Trainium percentiles ...). The simulator pushes OTLP to a real collector
process. Every panel query must run without error; a panel must return data when every metric
it names has series and it does not filter with a comparison (a `== 1` panel is legitimately
empty on a healthy fleet). The simulator emits hardware metrics, not the agent's or the health
layer's own, so panels on those are only run, not required to have data.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import httpx
import pytest

from agent.catalog import catalog
from tests.collector.conftest import start_collector
from tests.dashboards.test_dashboards_query import DASHBOARDS, query_range, substitute
from tests.support import PYTHON, ROOT

TOKEN = "simulated-fleet"
PROM_NAMES = {m.prom_name for m in catalog()}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    with start_collector(tmp, {}, token=TOKEN) as c:
        end = int(time.time()) // 60 * 60
        res = subprocess.run([PYTHON, "-m", "shopfloor", "simulate", "--nodes", "2", "--chips", "4",
                              "--trainium-share", "0.5", "--seed", "11", "--duration", "2h", "--step", "60s",
                              "--start", str(end - 7200), "--fast", "--endpoint", c.url + "/v1/metrics",
                              "--token", TOKEN],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert res.returncode == 0, res.stderr
        client = httpx.Client(base_url=c.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        names = set(client.get("/api/v1/label/__name__/values").json()["data"])
        vendors = set(client.get("/api/v1/label/vendor/values").json()["data"])
        assert vendors == {"nvidia", "aws"}, vendors
        yield client, float(end), names
        client.close()


def _has_comparison(expr: str) -> bool:
    return re.search(r"==|!=|>=|<=|>|<", re.sub(r"\{[^}]*\}", "", expr)) is not None


def test_panels_on_simulated_fleet(simulated):
    client, end_s, present = simulated
    checked, empty = 0, []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        names = [v["name"] for v in dash["templating"]["list"] if v["type"] == "query"]
        for p in dash["panels"]:
            if p["type"] == "row":
                continue
            step = 3600 if p.get("interval") == "1h" else 60
            for t in p["targets"]:
                expr = substitute(t["expr"], {n: ".*" for n in names}, step, 7200)
                result = query_range(client, expr, end_s, 7200, step)      # errors fail here
                metrics = set(re.findall(r"[a-z_][a-z0-9_]*", t["expr"])) & PROM_NAMES
                if metrics <= present and not _has_comparison(t["expr"]):
                    checked += 1
                    if not result:
                        empty.append(f"{dash['title']} / {p['title']}: {t['expr']}")
    assert empty == [], "panels without data on the simulated fleet:\n" + "\n".join(empty)
    assert checked >= 60, checked
