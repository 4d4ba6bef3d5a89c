"""End to end: a fault enters the real collector through OTLP, the collector's rule evaluation
fires an alert, the real Alertmanager (Debian's prometheus-alertmanager) delivers it to a webhook
receiver, and when the fault clears the resolved notification arrives as well.

The rule is the shipped GpuRowRemapFailure from alerts/shopfloor.yaml with its `for:` shortened
to 2s so the test takes seconds, not minutes; expression, labels and annotations are unchanged.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml

from agent.export.otlp import encode_request
from agent.sources.base import point
from tests.collector.conftest import start_collector
from tests.support import ROOT, free_port, running, require_binary

RESOURCE = {"cluster": "c1", "node": "gpu-017", "rack": "r04"}
CHIP = dict(chip="5", uuid="GPU-5d1e7a40", vendor="nvidia", model="NVIDIA H100 80GB HBM3")
TOKEN = "s3cret-collector-token"


class Webhook:
    """A receiver for Alertmanager's webhook_config: keeps every notification it gets."""

    def __init__(self):
        self.notifications: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.notifications.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, status: str, alertname: str, timeout: float = 40.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in list(self.notifications):
                for a in n.get("alerts", []):
                    if a["status"] == status and a["labels"].get("alertname") == alertname:
                        return a
            time.sleep(0.2)
        raise AssertionError(f"no {status} {alertname} notification within {timeout}s: {self.notifications}")


def push(url: str, value: float, ts_ms: int) -> None:
    body = encode_request([point("hw.gpu.row_remap.failure", value, **CHIP)], RESOURCE,
                          start_time_ns=0, default_time_ns=ts_ms * 1_000_000)
    r = httpx.post(url + "/v1/metrics", content=body, timeout=10,
                   headers={"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text


def shortened_rules(path) -> None:
    doc = yaml.safe_load((ROOT / "alerts" / "shopfloor.yaml").read_text())
    rule = next(r for g in doc["groups"] for r in g["rules"] if r.get("alert") == "GpuRowRemapFailure")
    rule["for"] = "2s"
    path.write_text(yaml.safe_dump({"groups": [{"name": "e2e", "interval": "1s", "rules": [rule]}]}))


def test_fault_fires_reaches_alertmanager_and_resolves(tmp_path):
    alertmanager = require_binary("prometheus-alertmanager", "alertmanager")
    rules = tmp_path / "rules.yaml"
    shortened_rules(rules)
    with Webhook() as hook:
        am_port = free_port()
        (tmp_path / "am.yaml").write_text(yaml.safe_dump({
            "route": {"receiver": "hook", "group_by": ["alertname", "node"], "group_wait": "1s",
                      "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "hook", "webhook_configs": [{"url": hook.url, "send_resolved": True}]}],
        }))
        am_cmd = [alertmanager, f"--config.file={tmp_path / 'am.yaml'}", f"--storage.path={tmp_path / 'am'}",
                  f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="]
        with running(am_cmd, ready_url=f"http://127.0.0.1:{am_port}/-/ready", log=tmp_path / "am.log"):
            config = {"rules": {"rule_files": [str(rules)], "alertmanager_url": f"http://127.0.0.1:{am_port}",
                                "resend_delay": "1s", "external_labels": {"site": "test-site"}}}
            with start_collector(tmp_path, config, token=TOKEN) as c:
                auth = {"Authorization": f"Bearer {TOKEN}"}
                assert httpx.get(c.url + "/api/v1/alerts", timeout=5).status_code == 401

                now_ms = int(time.time() * 1000)
                push(c.url, 0, now_ms - 2000)          # healthy first
                push(c.url, 1, now_ms)                 # then the row remap fails
                fired = hook.wait_for("firing", "GpuRowRemapFailure")
                assert fired["labels"]["node"] == "gpu-017" and fired["labels"]["chip"] == "5"
                assert fired["labels"]["severity"] == "critical" and fired["labels"]["site"] == "test-site"
                assert fired["annotations"]["summary"] == "Row remapping failed on gpu-017 GPU 5"
                assert fired["annotations"]["runbook_url"] == "docs/runbooks/GpuRowRemapFailure.md"
                assert "/graph?g0.expr=" in fired["generatorURL"]

                alerts = httpx.get(c.url + "/api/v1/alerts", headers=auth, timeout=5).json()["data"]["alerts"]
                assert [(a["labels"]["alertname"], a["state"]) for a in alerts] == [("GpuRowRemapFailure", "firing")]
                rules_doc = httpx.get(c.url + "/api/v1/rules", params={"type": "alert"}, headers=auth,
                                      timeout=5).json()
                rule = rules_doc["data"]["groups"][0]["rules"][0]
                assert rule["state"] == "firing" and rule["health"] == "ok" and rule["duration"] == 2

                am_alerts = httpx.get(f"http://127.0.0.1:{am_port}/api/v2/alerts", timeout=5).json()
                assert [a["labels"]["alertname"] for a in am_alerts] == ["GpuRowRemapFailure"]

                push(c.url, 0, int(time.time() * 1000))   # the fault clears (GPU replaced)
                resolved = hook.wait_for("resolved", "GpuRowRemapFailure")
                assert resolved["labels"]["chip"] == "5"
                assert httpx.get(c.url + "/api/v1/alerts", headers=auth, timeout=5).json()["data"]["alerts"] == []
