"""Differential test: the real Prometheus (Debian 2.42) and the collector, same data, same answers.

Both get the same simulated fleet by remote write (Prometheus with
--web.enable-remote-write-receiver, the collector on its /api/v1/write); then dashboard- and
alert-style queries are asked of both, as instant queries at several times and as range queries,
and the answers must agree (same series, values within a relative 1e-6).

2.42 vs 3.x: 2.42's range and lookback windows are closed ([t-r, t]), 3.x's are left-open
((t-r, t]). The fleet's samples carry sub-second phases, so none sits exactly on a boundary and
the difference cannot show. Subquery steps are aligned to multiples of their resolution, so
evaluation times here are never whole minutes (else 2.42 would take one more subquery point at
the window's start than 3.x does). Every other semantic used here is the same in both versions.
"""

from __future__ import annotations

import math
import time

import httpx
import pytest

from tests.promql import fleet
from tests.support import PYTHON, ROOT, free_port, require_binary, running

STEP_S = 15
DURATION_S = 3600

QUERIES = [
    f"sum by (cluster) (avg_over_time({fleet.UTIL}[5m]))",
    f"avg by (cluster) ({fleet.UTIL})",
    f"topk(5, {fleet.TEMP})",
    f"bottomk(3, max_over_time({fleet.TEMP}[10m]))",
    f"sum by (node) (rate({fleet.ECC}[5m]))",
    f"increase({fleet.ECC}[15m]) > 0",
    f"sum by (rack) ({fleet.POWER})",
    f"max_over_time({fleet.POWER}[5m])",
    f"sum by (cluster) (rate({fleet.ENERGY}[5m]))",
    f"{fleet.POWER} / on(uuid) group_left() (rate({fleet.ENERGY}[5m]))",
    f"{fleet.UTIL} * on(node, chip) group_left(sensor) {fleet.TEMP}",
    f"count by (vendor, model) ({fleet.UTIL} > 0.8)",
    f"quantile by (cluster) (0.9, {fleet.TEMP})",
    f"stddev by (rack) ({fleet.POWER})",
    f"absent({fleet.UTIL}{{uuid=\"chip-00005\"}})",
    f"resets({fleet.ECC}[30m])",
    f"deriv({fleet.TEMP}[10m])",
    f"predict_linear({fleet.TEMP}[15m], 600) > 70",
    f"changes({fleet.ECC}[10m])",
    f"min_over_time({fleet.UTIL}[5m:1m])",
    f"sum by (cluster) (irate({fleet.ENERGY}[2m]))",
    f"avg_over_time({fleet.UTIL}[5m] offset 10m)",
    f"label_replace(sum by (node) ({fleet.POWER}), \"host\", \"$1\", \"node\", \"n(.*)\")",
    f"sort_desc(sum by (rack) ({fleet.POWER}))",
    f"{fleet.UTIL} unless on(uuid) {fleet.TEMP} > 75",
    f"count_values by (cluster) (\"model\", {fleet.UTIL} * 0 + 1)",
    f"quantile_over_time(0.95, {fleet.TEMP}[10m])",
    f"stddev_over_time({fleet.POWER}[10m])",
    f"last_over_time({fleet.UTIL}[2m])",
    f"count_over_time({fleet.UTIL}[5m])",
    f"delta({fleet.TEMP}[10m])",
    f"idelta({fleet.TEMP}[5m])",
    f"clamp({fleet.UTIL} * 1.2, 0, 1)",
    f"timestamp({fleet.UTIL}{{node=\"n0001\"}})",
    f"avg by (cluster) ({fleet.UTIL}) / on() group_left() avg({fleet.UTIL})",
    f"topk by (cluster) (3, {fleet.POWER})",
    f"{fleet.UTIL}{{chip=\"0\"}} @ end()",
    f"sum_over_time({fleet.UTIL}[3m]) / count_over_time({fleet.UTIL}[3m])",
    f"absent_over_time({fleet.UTIL}{{uuid=\"chip-00005\"}}[5m])",
    f"max by (rack) (max_over_time({fleet.TEMP}[30m:2m]))",
    f"rate({fleet.ENERGY}[5m] offset 5m) - rate({fleet.ENERGY}[5m])",
    f"{fleet.POWER} > bool 600",
    f"ln({fleet.POWER}) + sqrt({fleet.TEMP}) - abs(-{fleet.UTIL})",
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    prom = require_binary("prometheus")
    tmp = tmp_path_factory.mktemp("diff")
    end_ms = (int(time.time()) // 60) * 60 * 1000
    series = fleet.fleet(chips=32, duration_s=DURATION_S, step_s=STEP_S, end_ms=end_ms)
    (tmp / "prometheus.yml").write_text("global:\n  scrape_interval: 1h\n")
    pport, cport = free_port(), free_port()
    prom_cmd = [prom, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{pport}", "--web.enable-remote-write-receiver",
                "--storage.tsdb.retention.time=1d", "--log.level=warn"]
    (tmp / "collector.yaml").write_text("{}\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    col_cmd = [PYTHON, "-m", "shopfloor", "collector", "--config", str(tmp / "collector.yaml"),
               "--listen", f"127.0.0.1:{cport}", "--db", str(tmp / "c.duckdb"), "--log-level", "warning"]
    prom_url, col_url = f"http://127.0.0.1:{pport}", f"http://127.0.0.1:{cport}"
    with running(prom_cmd, ready_url=prom_url + "/-/ready", log=tmp / "prometheus.log", timeout=120), \
            running(col_cmd, ready_url=col_url + "/-/healthy", log=tmp / "collector.log", env=env, cwd=ROOT,
                    timeout=120):
        sent_p = fleet.push(prom_url + "/api/v1/write", series)
        sent_c = fleet.push(col_url + "/api/v1/write", series)
        assert sent_p == sent_c > 0
        yield prom_url, col_url, end_ms / 1000


def _vector_map(data: dict) -> dict:
    assert data["resultType"] == "vector", data["resultType"]
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in data["result"]}


def _matrix_map(data: dict) -> dict:
    assert data["resultType"] == "matrix", data["resultType"]
    return {tuple(sorted(r["metric"].items())): [(float(t), float(v)) for t, v in r["values"]]
            for r in data["result"]}


def _diff_vectors(want: dict, got: dict) -> list[str]:
    problems = []
    if set(want) != set(got):
        problems.append(f"series differ: only Prometheus {list(set(want) - set(got))[:2]}, "
                        f"only collector {list(set(got) - set(want))[:2]}")
    for k in set(want) & set(got):
        if not fleet.close(want[k], got[k]):
            problems.append(f"{dict(k)}: Prometheus {want[k]} != collector {got[k]}")
    return problems


@pytest.mark.parametrize("query", QUERIES)
def test_same_answers(servers, query):
    prom_url, col_url, end_s = servers
    problems = []
    with httpx.Client() as client:
        for t in (end_s - 2400.5, end_s - 1217, end_s - 7, end_s + 100):
            want = fleet.query_instant(prom_url, query, t, client)
            got = fleet.query_instant(col_url, query, t, client)
            problems += [f"instant @{t}: {p}" for p in _diff_vectors(_vector_map(want), _vector_map(got))]
        start, end = end_s - DURATION_S + 313, end_s + 133
        want = _matrix_map(fleet.query_range(prom_url, query, start, end, 60, client))
        got = _matrix_map(fleet.query_range(col_url, query, start, end, 60, client))
    if set(want) != set(got):
        problems.append(f"range: series differ: only Prometheus {list(set(want) - set(got))[:2]}, "
                        f"only collector {list(set(got) - set(want))[:2]}")
    for k in set(want) & set(got):
        w, g = dict(want[k]), dict(got[k])
        if set(w) != set(g):
            problems.append(f"range {dict(k)}: steps differ ({len(w)} vs {len(g)})")
            continue
        bad = [(t, w[t], g[t]) for t in w if not fleet.close(w[t], g[t])]
        if bad:
            problems.append(f"range {dict(k)}: {len(bad)} points differ, e.g. {bad[0]}")
    assert not problems, f"{query}:\n" + "\n".join(problems[:10])


def test_data_is_not_trivial(servers):
    """Guard: the comparison must be over real answers, not two empty results."""
    prom_url, col_url, end_s = servers
    got = _vector_map(fleet.query_instant(col_url, f"count({fleet.UTIL})", end_s - 60))
    assert list(got.values()) == [31.0]    # one of 32 chips stopped reporting earlier
    rates = _vector_map(fleet.query_instant(col_url, f"sum(rate({fleet.ECC}[10m])) > 0", end_s - 60))
    assert len(rates) == 1 and not math.isnan(next(iter(rates.values())))
