"""/metrics exposition: exact text for a small fixture, and the HTTP endpoint's rules."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from agent.catalog import catalog
from agent.config import parse
from agent.export.prometheus import LatestCollection, MetricsServer, render
from agent.runner import Agent
from agent.sources.base import point

RESOURCE = {"cluster": "c1", "node": "gpu-001", "rack": "r7"}


def _chip(i: int) -> dict:
    return dict(chip=i, uuid=f"GPU-{i}", vendor="nvidia", model="B200")


def small_fixture():
    # chip 10 before chip 2 on purpose: the output sorts naturally (2 before 10)
    return [
        point("hw.power", 612.5, **_chip(10)),
        point("hw.power", 98.25, **_chip(2)),
        point("hw.energy", 123456789.0, **_chip(2)),
        point("shopfloor.agent.scrape.success", 1, source="nvml"),
        point("hw.power", 99.0, **_chip(2)),   # same series again: the later value wins
    ]


def test_exposition_is_exact():
    power, energy, success = (catalog()[n] for n in ("hw.power", "hw.energy", "shopfloor.agent.scrape.success"))
    res = 'cluster="c1",node="gpu-001",rack="r7"'

    def chip(i):
        return f'chip="{i}",cluster="c1",model="B200",node="gpu-001",rack="r7",uuid="GPU-{i}",vendor="nvidia"'

    expected_by_metric = {
        "hw.power": [f"# HELP {power.prom_name} {power.help}", f"# TYPE {power.prom_name} gauge",
                     f"{power.prom_name}{{{chip(2)}}} 99.0", f"{power.prom_name}{{{chip(10)}}} 612.5"],
        "hw.energy": [f"# HELP {energy.prom_name} {energy.help}", f"# TYPE {energy.prom_name} counter",
                      f"{energy.prom_name}{{{chip(2)}}} 1.23456789e+08"],
        "shopfloor.agent.scrape.success": [
            f"# HELP {success.prom_name} {success.help}", f"# TYPE {success.prom_name} gauge",
            f'{success.prom_name}{{{res},source="nvml"}} 1.0'],
    }
    # families come in catalog order
    order = [m.name for m in catalog() if m.name in expected_by_metric]
    expected = "\n".join(line for name in order for line in expected_by_metric[name]) + "\n"
    assert energy.prom_name.endswith("_total")
    assert render(small_fixture(), RESOURCE) == expected


def test_exposition_escapes_label_values():
    text = render([point("hw.power", 1, chip=0, uuid='a"b\\c\nd', vendor="nvidia", model="x")], RESOURCE)
    assert 'uuid="a\\"b\\\\c\\nd"' in text


@pytest.fixture
def server():
    latest = LatestCollection(RESOURCE)
    latest.update(small_fixture())
    srv = MetricsServer("127.0.0.1:0", latest, token="scrape-me")
    srv.start()
    yield srv
    srv.stop()


def _get(url, token=None, method="GET"):
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


def test_metrics_endpoint_serves_latest_with_auth(server):
    base = f"http://127.0.0.1:{server.port}"
    status, headers, body = _get(base + "/metrics", "scrape-me")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert body == render(small_fixture(), RESOURCE)
    assert _get(base + "/metrics")[0] == 401
    assert _get(base + "/metrics", "wrong")[0] == 401
    assert _get(base + "/metrics", "scrape-me", method="POST")[0] == 405
    assert _get(base + "/nothing", "scrape-me")[0] == 404


def test_agent_metrics_follow_collections(tmp_path):
    class Flaky:
        name = "power"
        calls = 0

        def supported(self):
            return True, ""

        def collect(self):
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise OSError("sensor vanished")
            return [point("hw.power", Flaky.calls, **_chip(0))]

    cfg = parse({"labels": RESOURCE, "listen": "127.0.0.1:0", "collector_endpoint": "",
                 "spool_dir": str(tmp_path / "s"), "state_dir": str(tmp_path / "st")}, env={})
    agent = Agent(cfg, sources=[Flaky()])
    agent.start()
    try:
        url = f"http://127.0.0.1:{agent.server.port}/metrics"
        ok = catalog().prom("shopfloor.agent.scrape.success")
        power = catalog().prom("hw.power")
        agent.collect_once()
        body = _get(url)[2]
        assert f'{ok}{{cluster="c1",node="gpu-001",rack="r7",source="power"}} 1.0' in body
        assert f"{power}{{" in body
        agent.collect_once()                      # the source fails: recorded, not fatal
        body = _get(url)[2]
        assert f'{ok}{{cluster="c1",node="gpu-001",rack="r7",source="power"}} 0.0' in body
        assert f"{power}{{" not in body
        agent.collect_once()
        assert f'{power}{{chip="0"' in _get(url)[2]
    finally:
        agent.stop()


def test_real_prometheus_scrapes_the_agent(tmp_path):
    """Prometheus (the real server) scrapes /metrics with the bearer token and stores exactly the
    series and values the agent exposes."""
    import json
    import subprocess
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from tests.support import FIXTURES, free_port, require_binary, running

    prometheus = require_binary("prometheus")
    cfg = parse({"labels": RESOURCE, "listen": f"127.0.0.1:{free_port()}", "metrics_token": "prom-token",
                 "collector_endpoint": "", "sysfs_root": str(FIXTURES / "sysfs"),
                 "ipmitool_command": [str(FIXTURES / "ipmitool" / "fake-ipmitool")],
                 "spool_dir": str(tmp_path / "s"), "state_dir": str(tmp_path / "st"),
                 "sources": {n: {"enabled": False} for n in ("nvml", "dcgm", "neuron", "xid")}}, env={})
    agent = Agent(cfg)
    agent.start()
    agent.collect_once()
    exposed = {}
    for fam in text_string_to_metric_families(render(agent.latest.points, RESOURCE)):
        for s in fam.samples:
            exposed[(s.name, tuple(sorted(s.labels.items())))] = s.value
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "agent", "authorization": {"credentials": "prom-token"},
                            "static_configs": [{"targets": [cfg.listen]}]}]}))
    cmd = [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}"]
    try:
        with running(cmd, ready_url=f"http://127.0.0.1:{port}/-/ready", log=tmp_path / "prometheus.log"):
            deadline = time.monotonic() + 30
            stored = {}
            while time.monotonic() < deadline and len(stored) < len(exposed):
                time.sleep(0.5)
                url = f"http://127.0.0.1:{port}/api/v1/query?query=" + urllib.request.quote('{job="agent",__name__!~"up|scrape_.*"}')
                result = json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
                stored = {}
                for r in result:
                    labels = {k: v for k, v in r["metric"].items() if k not in ("job", "instance", "__name__")}
                    stored[(r["metric"]["__name__"], tuple(sorted(labels.items())))] = float(r["value"][1])
            up = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query=up", timeout=5))
    finally:
        agent.stop()
    assert up["data"]["result"][0]["value"][1] == "1"       # scraped with the token
    assert len(exposed) > 100 and stored == exposed
