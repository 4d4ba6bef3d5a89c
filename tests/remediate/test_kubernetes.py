"""Kubernetes backend against recorded API exchanges.

No API server can run here, so a small HTTP server on 127.0.0.1 replays the Kubernetes API's
real JSON (a Node as `kubectl get node -o json` returns it, and the API's Status objects for
409/404/401) and applies the patches it receives as the API server does for these fields
(objects merged, null deletes a key, spec.taints replaced whole: it has no merge key). The
official `kubernetes` client is pointed at it; the tests assert the exact patches sent.
"""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from collector.health.verdict import ChipRef
from collector.remediate.base import BackendError, Result
from collector.remediate.kubernetes import KubernetesBackend, taint_value
from tests.remediate.helpers import NOW, failing, make

FIX = Path(__file__).parent / "fixtures" / "kubernetes"
TOKEN = "test-token-1234"


def merge(target: dict, patch: dict) -> dict:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)
    return target


class FakeApiServer:
    """Replays recorded Node objects; records every request."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}
        self.requests: list[tuple[str, str, str, dict | None]] = []
        self.concurrent_change: dict | None = None    # applied once, right before the next PATCH
        self.fail_status: int | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _node(self):
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._send(401, json.loads((FIX / "status-unauthorized.json").read_text()))
                    return None
                prefix = "/api/v1/nodes/"
                name = self.path.split("?")[0][len(prefix):] if self.path.startswith(prefix) else ""
                if name not in server.nodes:
                    status = json.loads((FIX / "status-not-found.json").read_text())
                    status["message"] = f'nodes "{name}" not found'
                    self._send(404, status)
                    return None
                return name

            def do_GET(self):
                server.requests.append(("GET", self.path, "", None))
                name = self._node()
                if name:
                    self._send(200, server.nodes[name])

            def do_PATCH(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ctype = self.headers.get("Content-Type", "")
                server.requests.append(("PATCH", self.path, ctype, body))
                name = self._node()
                if not name:
                    return
                if server.fail_status:
                    self._send(server.fail_status, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                    "code": server.fail_status, "message": "etcdserver: timeout"})
                    return
                if ctype != "application/strategic-merge-patch+json":
                    self._send(415, {"kind": "Status", "code": 415, "message": f"unsupported {ctype}"})
                    return
                node = server.nodes[name]
                if server.concurrent_change is not None:
                    merge(node, server.concurrent_change)
                    node["metadata"]["resourceVersion"] = str(int(node["metadata"]["resourceVersion"]) + 1)
                    server.concurrent_change = None
                want = (body.get("metadata") or {}).get("resourceVersion")
                if want is not None and want != node["metadata"]["resourceVersion"]:
                    self._send(409, json.loads((FIX / "status-conflict.json").read_text()))
                    return
                merge(node, body)
                node["metadata"]["resourceVersion"] = str(int(node["metadata"]["resourceVersion"]) + 1)
                self._send(200, node)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def patches(self) -> list[dict]:
        return [body for method, _, _, body in self.requests if method == "PATCH"]


@pytest.fixture
def api():
    server = FakeApiServer()
    server.nodes["gpu-001"] = json.loads((FIX / "node-gpu-001.json").read_text())
    human = json.loads((FIX / "node-gpu-001.json").read_text())
    human["metadata"]["name"] = "gpu-002"
    human["spec"]["unschedulable"] = True   # `kubectl cordon gpu-002` by an operator
    server.nodes["gpu-002"] = human
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def backend(api):
    from kubernetes import client
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{api.port}"
    cfg.api_key = {"authorization": TOKEN}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    return KubernetesBackend(client.ApiClient(cfg))


REASON = "shopfloor: chip 3 (GPU-abc): XID 79: GPU has fallen off the bus"
OTHER_TAINT = {"key": "dedicated", "value": "training", "effect": "NoSchedule"}


def test_cordon_sends_one_strategic_merge_patch_with_taint_label_and_annotations(api, backend):
    original = copy.deepcopy(api.nodes["gpu-001"])
    assert backend.cordon(ChipRef("c1", "gpu-001", "3"), REASON) == Result.DONE
    assert [(m, p, c) for m, p, c, _ in api.requests] == [
        ("GET", "/api/v1/nodes/gpu-001", "", None)[:3],
        ("PATCH", "/api/v1/nodes/gpu-001", "application/strategic-merge-patch+json")]
    assert api.patches() == [{
        "metadata": {"resourceVersion": "8812734",
                     "labels": {"shopfloor.io/chip-3": "cordoned"},
                     "annotations": {"shopfloor.io/chip-3.reason": REASON,
                                     "shopfloor.io/cordoned-by": "shopfloor",
                                     "shopfloor.io/reason": REASON}},
        "spec": {"unschedulable": True,
                 "taints": [OTHER_TAINT, {"key": "shopfloor.io/chip-3",
                                          "value": "XID-79-GPU-has-fallen-off-the-bus", "effect": "NoSchedule"}]}}]
    assert backend.status("gpu-001") == (True, REASON, True)
    # the same cordon again is a no-op
    assert backend.cordon(ChipRef("c1", "gpu-001", "3"), REASON) == Result.ALREADY
    assert len(api.patches()) == 1
    # uncordon removes exactly what was set: the node is back as it was
    assert backend.uncordon(ChipRef("c1", "gpu-001", "3")) == Result.DONE
    assert api.patches()[-1] == {
        "metadata": {"resourceVersion": "8812735",
                     "labels": {"shopfloor.io/chip-3": None},
                     "annotations": {"shopfloor.io/chip-3.reason": None, "shopfloor.io/cordoned-by": None,
                                     "shopfloor.io/reason": None}},
        "spec": {"taints": [OTHER_TAINT], "unschedulable": None}}
    node = api.nodes["gpu-001"]
    node["metadata"]["resourceVersion"] = original["metadata"]["resourceVersion"]
    assert node == original
    assert backend.uncordon(ChipRef("c1", "gpu-001", "3")) == Result.NOT_HELD


def test_a_node_a_human_cordoned_is_never_touched(api, backend):
    before = copy.deepcopy(api.nodes["gpu-002"])
    assert backend.status("gpu-002") == (True, "cordoned by someone else", False)
    assert backend.cordon(ChipRef("c1", "gpu-002", "1"), REASON) == Result.HELD_BY_OTHER
    assert backend.uncordon(ChipRef("c1", "gpu-002", "1")) == Result.HELD_BY_OTHER
    assert api.patches() == []
    assert api.nodes["gpu-002"] == before


def test_second_chip_keeps_the_node_cordoned_until_both_are_released(api, backend):
    backend.cordon(ChipRef("c1", "gpu-001", "3"), REASON)
    backend.cordon(ChipRef("c1", "gpu-001", "5"), "shopfloor: chip 5: row remap failure; " + REASON[11:])
    keys = [t["key"] for t in api.nodes["gpu-001"]["spec"]["taints"]]
    assert keys == ["dedicated", "shopfloor.io/chip-3", "shopfloor.io/chip-5"]
    assert backend.uncordon(ChipRef("c1", "gpu-001", "3"), "shopfloor: chip 5: row remap failure") == Result.ALREADY
    node = api.nodes["gpu-001"]
    assert node["spec"]["unschedulable"] is True
    assert [t["key"] for t in node["spec"]["taints"]] == ["dedicated", "shopfloor.io/chip-5"]
    assert "shopfloor.io/chip-3" not in node["metadata"]["labels"]
    assert node["metadata"]["annotations"]["shopfloor.io/reason"] == "shopfloor: chip 5: row remap failure"
    assert backend.uncordon(ChipRef("c1", "gpu-001", "5")) == Result.DONE
    assert "unschedulable" not in api.nodes["gpu-001"]["spec"]
    assert api.nodes["gpu-001"]["spec"]["taints"] == [OTHER_TAINT]


def test_a_concurrent_change_is_kept_not_overwritten(api, backend):
    # someone adds a taint between our read and our patch: 409, re-read, patch again
    api.concurrent_change = {"spec": {"taints": [OTHER_TAINT, {"key": "maintenance", "effect": "NoExecute"}]}}
    assert backend.cordon(ChipRef("c1", "gpu-001", "3"), REASON) == Result.DONE
    first, second = api.patches()
    assert first["metadata"]["resourceVersion"] == "8812734"
    assert second["metadata"]["resourceVersion"] == "8812735"
    assert [t["key"] for t in api.nodes["gpu-001"]["spec"]["taints"]] == [
        "dedicated", "maintenance", "shopfloor.io/chip-3"]


def test_api_errors_are_backend_errors_and_the_remediator_audits_them(api, backend):
    with pytest.raises(BackendError, match="404"):
        backend.status("gpu-404")
    api.fail_status = 500
    rem = make(backend)
    [d] = rem.apply([failing("gpu-001")], now=NOW)
    assert d.outcome == "failed" and "500" in " ".join(d.reasons)
    assert rem.audit.cordons() == []
    api.fail_status = None
    [d] = rem.apply([failing("gpu-001", at=NOW + 1)], now=NOW + 1)
    assert d.outcome == "done"
    assert api.nodes["gpu-001"]["spec"]["unschedulable"] is True


def test_wrong_token_is_refused(api):
    from kubernetes import client
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{api.port}"
    with pytest.raises(BackendError, match="401"):
        KubernetesBackend(client.ApiClient(cfg)).status("gpu-001")


def test_taint_value_is_a_valid_label_value():
    assert taint_value(REASON) == "XID-79-GPU-has-fallen-off-the-bus"
    v = taint_value("shopfloor: chip 0: " + "é" * 10 + "x" * 100)
    assert len(v) <= 63 and v[0].isalnum() and v[-1].isalnum()
    assert taint_value("shopfloor: chip 0: ???") == "unhealthy"


def test_configured_from_a_kubeconfig_through_the_collector_config(api, tmp_path):
    import yaml

    from collector.remediate.budget import Inventory
    from collector.remediate.service import build
    from collector.store.core import Store
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": f"http://127.0.0.1:{api.port}"}}],
        "users": [{"name": "shopfloor", "user": {"token": TOKEN}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "shopfloor"}}]}))
    rem = build({"backend": "kubernetes", "dry_run": False, "budget": {"max_cluster_percent": 100},
                 "kubernetes": {"kubeconfig": str(kubeconfig)}}, Store(":memory:"))
    rem.inventory_loader = lambda: Inventory({("c1", "gpu-001"): 8})
    [d] = rem.apply([failing("gpu-001", "3")], now=NOW)
    assert (d.backend, d.outcome) == ("kubernetes", "done")
    node = api.nodes["gpu-001"]
    assert node["spec"]["unschedulable"] is True
    assert node["metadata"]["labels"]["shopfloor.io/chip-3"] == "cordoned"
