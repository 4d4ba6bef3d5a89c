"""The Prometheus HTTP API (query side) through the collector's real FastAPI app."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from agent.catalog import catalog
from collector.app import create_app
from collector.config import from_dict

UTIL = catalog().prom("hw.gpu.utilization")


@pytest.fixture()
def client():
    app = create_app(from_dict({"db": ":memory:", "query": {"max_points_per_series": 100, "max_samples": 5000}}))
    with TestClient(app) as c:
        rows = []
        for node, scale in (("n1", 0.5), ("n2", 0.25)):
            for i in range(0, 601, 15):
                rows.append((UTIL, {"cluster": "c1", "node": node, "chip": "0"}, i * 1000, scale))
        result = app.state.ctx.writer.write(rows)
        assert result.accepted == len(rows)
        yield c


def test_instant_query_envelope(client):
    r = client.get("/api/v1/query", params={"query": f"sum by (cluster) ({UTIL})", "time": "300"})
    assert r.status_code == 200
    assert r.json() == {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"cluster": "c1"}, "value": [300.0, "0.75"]}]}}


def test_post_form_range_query(client):
    r = client.post("/api/v1/query_range", data={"query": f'{UTIL}{{node="n1"}} * 2', "start": "0",
                                                  "end": "60", "step": "30s"})
    body = r.json()
    assert body["data"]["resultType"] == "matrix"
    assert body["data"]["result"] == [{"metric": {"chip": "0", "cluster": "c1", "node": "n1"},
                                       "values": [[0.0, "1"], [30.0, "1"], [60.0, "1"]]}]


def test_scalar_and_special_values(client):
    assert client.get("/api/v1/query", params={"query": "1/0", "time": "1"}).json()["data"] == \
        {"resultType": "scalar", "result": [1.0, "+Inf"]}
    assert client.get("/api/v1/query", params={"query": "-1/0", "time": "1"}).json()["data"]["result"][1] == "-Inf"
    assert client.get("/api/v1/query", params={"query": "0/0", "time": "1"}).json()["data"]["result"][1] == "NaN"
    assert client.get("/api/v1/query", params={"query": '"hi"', "time": "2"}).json()["data"] == \
        {"resultType": "string", "result": [2.0, "hi"]}


def test_errors_use_prometheus_types_and_codes(client):
    r = client.get("/api/v1/query", params={"query": "sum(", "time": "1"})
    assert r.status_code == 400 and r.json()["errorType"] == "bad_data"
    r = client.get("/api/v1/query", params={"query": UTIL, "time": "yesterday"})
    assert r.status_code == 400 and "cannot parse" in r.json()["error"]
    r = client.get("/api/v1/query_range", params={"query": UTIL, "start": "0", "end": "1000", "step": "1"})
    assert r.status_code == 400 and "exceeded maximum resolution of 100 points" in r.json()["error"]
    # duplicate series on the one side of a match -> cannot execute (422)
    r = client.get("/api/v1/query", params={"query": f"vector(1) + on() {UTIL}", "time": "300"})
    assert r.status_code == 422 and r.json()["errorType"] == "execution"
    r = client.get("/api/v1/query_range", params={"query": '"s"', "start": "0", "end": "10", "step": "5"})
    assert r.status_code == 400


def test_sample_limit(client):
    r = client.get("/api/v1/query_range", params={"query": f"max_over_time({UTIL}[10m])", "start": "0",
                                                   "end": "600", "step": "15"})
    assert r.status_code == 200   # 41 steps x 2 series x <= 41 samples per window
    # a 1s subquery over 10m windows touches 41 steps x 2 series x 600 points
    r = client.get("/api/v1/query_range", params={"query": f"max_over_time({UTIL}[10m:1s])", "start": "0",
                                                   "end": "600", "step": "15"})
    assert r.status_code == 422 and "too many samples" in r.json()["error"]


def test_series_labels_values(client):
    r = client.get("/api/v1/series", params={"match[]": f'{UTIL}{{node="n2"}}'})
    assert r.json()["data"] == [{"__name__": UTIL, "chip": "0", "cluster": "c1", "node": "n2"}]
    assert client.get("/api/v1/series", params={"match[]": UTIL, "start": "10000", "end": "20000"}).json()["data"] == []
    assert client.get("/api/v1/series").status_code == 400
    assert client.get("/api/v1/labels").json()["data"] == ["__name__", "chip", "cluster", "node"]
    assert client.get("/api/v1/label/node/values").json()["data"] == ["n1", "n2"]
    assert client.get("/api/v1/label/__name__/values").json()["data"] == [UTIL]


def test_metadata_and_buildinfo(client):
    meta = client.get("/api/v1/metadata").json()["data"]
    energy = catalog()["hw.energy"]
    assert meta[energy.prom_name] == [{"type": "counter", "help": energy.help, "unit": "joules"}]
    assert client.get("/api/v1/metadata", params={"metric": UTIL}).json()["data"].keys() == {UTIL}
    info = client.get("/api/v1/status/buildinfo").json()["data"]
    assert info["version"].startswith("2.")


def test_request_size_limit(client):
    r = client.post("/api/v1/query", data={"query": "1" + " + 1" * 400_000})
    assert r.status_code == 400 and "exceeds" in r.json()["error"]


def test_timeout_answers_503(client):
    r = client.get("/api/v1/query_range", params={"query": f"max_over_time({UTIL}[10m:1s])", "start": "0",
                                                   "end": "600", "step": "15", "timeout": "0.000001"})
    assert r.status_code == 503 and r.json() == {"status": "error", "errorType": "timeout",
                                                 "error": "query timed out in expression evaluation"}


def test_query_endpoints_need_the_token_when_configured():
    app = create_app(from_dict({"db": ":memory:", "auth": {"token": "s3cret"}}))
    with TestClient(app) as c:
        for path in ("/api/v1/query?query=1", "/api/v1/labels", "/api/v1/status/buildinfo"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_limit_truncates_series_with_a_warning(client):
    body = client.get("/api/v1/query", params={"query": UTIL, "time": "300", "limit": "1"}).json()
    assert len(body["data"]["result"]) == 1 and body["warnings"] == ["results truncated due to limit"]
    body = client.get("/api/v1/query", params={"query": UTIL, "time": "300", "limit": "5"}).json()
    assert len(body["data"]["result"]) == 2 and "warnings" not in body
