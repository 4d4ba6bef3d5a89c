"""OTLP/HTTP ingest against the collector running as a real process.

The first tests push with OpenTelemetry's own SDK and OTLP/HTTP exporter, so the wire format is
what any OTel client sends; the others send hand-built requests to hit one rule each.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time

import httpx
import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from agent.catalog import catalog
from collector.receive.common import IngestError, IngestGate
from tests.collector.conftest import start_collector
from tests.collector.fleet import batch

PB = {"Content-Type": "application/x-protobuf"}
RESOURCE = {"service.name": "shopfloor-agent", "service.instance.id": "node-7", "cluster": "c1",
            "node": "node-7", "rack": "r2", "host.name": "dropped-because-dotted"}


def sdk_provider(url: str, *, delta: bool = False, headers=None, gzip_: bool = False):
    exporter = OTLPMetricExporter(
        endpoint=url + "/v1/metrics", headers=headers, timeout=10,
        compression=Compression.Gzip if gzip_ else Compression.NoCompression,
        preferred_temporality={Counter: AggregationTemporality.DELTA} if delta else None)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    return MeterProvider(resource=Resource.create(RESOURCE), metric_readers=[reader])


def rows_by_name(c, name: str) -> list:
    return c.sql(f"SELECT labels, value FROM metrics WHERE name = '{name}' ORDER BY ts")


def test_sdk_exporter_gauge_counter_histogram(collector):
    cat = catalog()
    provider = sdk_provider(collector.url, gzip_=True)
    meter = provider.get_meter("test")
    power = meter.create_gauge("hw.power", unit="W")
    energy = meter.create_counter("hw.energy", unit="J")
    latency = meter.create_histogram("request.latency", unit="s")
    power.set(612.5, {"chip": "3", "uuid": "GPU-3", "vendor": "nvidia", "model": "B200"})
    energy.add(1500, {"chip": "3"})
    for v in (0.004, 0.3, 7.0):
        latency.record(v, {"route": "/x"})
    assert provider.force_flush(10_000)

    (labels, value), = rows_by_name(collector, cat.prom("hw.power"))
    assert value == 612.5
    assert labels == {"chip": "3", "uuid": "GPU-3", "vendor": "nvidia", "model": "B200", "cluster": "c1",
                      "node": "node-7", "rack": "r2", "job": "shopfloor-agent", "instance": "node-7"}
    (labels, value), = rows_by_name(collector, cat.prom("hw.energy"))
    assert cat.prom("hw.energy") == "hw_energy_joules_total" and value == 1500
    buckets = collector.sql("SELECT labels['le'], value FROM metrics WHERE name = 'request_latency_seconds_bucket'")
    got = dict(buckets)
    # the SDK's default boundaries: 0, 5, 10, 25, ...
    assert got["+Inf"] == 3 and got["0"] == 0 and got["5"] == 2 and got["10"] == 3 and got["7500"] == 3
    assert rows_by_name(collector, "request_latency_seconds_count")[0][1] == 3
    assert rows_by_name(collector, "request_latency_seconds_sum")[0][1] == pytest.approx(7.304)
    provider.shutdown()


def test_delta_sums_are_accumulated(collector):
    provider = sdk_provider(collector.url, delta=True)
    counter = provider.get_meter("test").create_counter("jobs.done", unit="{job}")
    counter.add(5, {"queue": "a"})
    assert provider.force_flush(10_000)
    counter.add(3, {"queue": "a"})
    assert provider.force_flush(10_000)
    values = [v for _, v in rows_by_name(collector, "jobs_done_total")]
    assert values == [5, 8]
    provider.shutdown()


def test_json_body_and_partial_success_on_cardinality_limit(tmp_path):
    with start_collector(tmp_path, {"ingest": {"max_series_per_metric": 4}}) as c:
        # node 0 has 4 chips -> 4 series per metric: exactly the limit.
        r = httpx.post(c.url + "/v1/metrics", content=batch(0, 1, 1_700_000_000_000), headers=PB)
        assert r.status_code == 200
        resp = ExportMetricsServiceResponse.FromString(r.content)
        assert resp.partial_success.rejected_data_points == 0
        # node 1 brings 4 new series per metric: all refused, as JSON.
        req = ExportMetricsServiceRequest.FromString(batch(1, 1, 1_700_000_000_000))
        r = httpx.post(c.url + "/v1/metrics", content=json_format.MessageToJson(req),
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 200
        body = r.json()["partialSuccess"]
        assert int(body["rejectedDataPoints"]) == 16
        assert "series limit per metric (4)" in body["errorMessage"]
        # known series still go in
        r = httpx.post(c.url + "/v1/metrics", content=batch(0, 2, 1_700_000_010_000), headers=PB)
        assert ExportMetricsServiceResponse.FromString(r.content).partial_success.rejected_data_points == 0
        assert c.sql("SELECT count(*) FROM metrics")[0][0] == 32
        text = httpx.get(c.url + "/metrics").text
        assert 'shopfloor_collector_ingest_samples_total{outcome="limited",protocol="otlp"} 16.0' in text
        assert 'shopfloor_collector_ingest_samples_total{outcome="accepted",protocol="otlp"} 32.0' in text


def test_retried_batch_is_stored_once(collector):
    body = batch(2, 5, 1_700_000_000_000)
    for _ in range(3):
        assert httpx.post(collector.url + "/v1/metrics", content=body, headers=PB).status_code == 200
    assert collector.sql("SELECT count(*) FROM metrics")[0][0] == 16
    text = httpx.get(collector.url + "/metrics").text
    assert 'outcome="duplicate",protocol="otlp"} 32.0' in text


def test_compiled_decoder_loads_and_is_reported(collector):
    """The first request starts loading the compiled OTLP decoder in the background; /metrics
    says when it is in use (0 before)."""
    httpx.post(collector.url + "/v1/metrics", content=batch(3, 1, 1_700_000_000_000), headers=PB)
    deadline = time.monotonic() + 180   # a first compile after install takes ~20 s
    while 'shopfloor_collector_ingest_wire_path{protocol="otlp"} 1.0' not in httpx.get(collector.url + "/metrics").text:
        assert time.monotonic() < deadline, "the compiled OTLP decoder did not load"
        time.sleep(0.5)
    assert collector.sql("SELECT count(*) FROM metrics WHERE labels['node'] = 'node-003'")[0][0] == 16


def test_undecodable_wrong_type_and_unknown_encoding(collector):
    r = httpx.post(collector.url + "/v1/metrics", content=b"\x0a\xff\xff\xff", headers=PB)
    assert r.status_code == 400
    r = httpx.post(collector.url + "/v1/metrics", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "cannot decode" in r.json()["message"]
    r = httpx.post(collector.url + "/v1/metrics", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = httpx.post(collector.url + "/v1/metrics", content=b"x", headers={**PB, "Content-Encoding": "br"})
    assert r.status_code == 415
    r = httpx.post(collector.url + "/v1/metrics", content=gzip.compress(b"abc")[:-6],
                   headers={**PB, "Content-Encoding": "gzip"})
    assert r.status_code == 400
    # a wrongly typed JSON field is a clean 400, not a crash
    bad = {"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "x", "gauge": {"dataPoints": [
        {"asDouble": "not-a-number", "timeUnixNano": "1"}]}}]}]}]}
    r = httpx.post(collector.url + "/v1/metrics", content=json.dumps(bad), headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    for path in ("/v1/metrics", "/api/v1/write"):   # the ingest endpoints take POST only
        r = httpx.get(collector.url + path)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert collector.sql("SELECT name, labels, value FROM metrics") == []


def test_size_limits_and_gzip_bomb(tmp_path):
    cfg = {"ingest": {"max_body_bytes": 20_000, "max_decompressed_bytes": 100_000}}
    with start_collector(tmp_path, cfg) as c:
        r = httpx.post(c.url + "/v1/metrics", content=b"\0" * 20_001, headers=PB)
        assert r.status_code == 413
        bomb = gzip.compress(b"\0" * 10_000_000)   # ~10 KB on the wire, 10 MB inflated
        assert len(bomb) < 20_000
        r = httpx.post(c.url + "/v1/metrics", content=bomb, headers={**PB, "Content-Encoding": "gzip"})
        assert r.status_code == 413
        ok = batch(0, 1, 1_700_000_000_000)
        r = httpx.post(c.url + "/v1/metrics", content=gzip.compress(ok), headers={**PB, "Content-Encoding": "gzip"})
        assert r.status_code == 200
        assert c.sql("SELECT count(*) FROM metrics")[0][0] == 16
        # a chunked body (no Content-Length) is counted as it streams in
        r = httpx.post(c.url + "/v1/metrics", content=iter([b"\0" * 15_000] * 2), headers=PB)
        assert r.status_code == 413 and "exceeds the limit of 20000 bytes" in status_message(r)
        r = httpx.post(c.url + "/v1/metrics", content=iter([ok[:100], ok[100:]]), headers=PB)
        assert r.status_code == 200
        assert c.sql("SELECT count(*) FROM metrics")[0][0] == 16   # the same batch again: stored once
        # every endpoint, not only ingest, refuses a body over the limit before reading it
        for path in ("/api/v1/sql", "/api/v1/query", "/api/v1/write"):
            assert httpx.post(c.url + path, content=b"x" * 20_001).status_code == 413


def status_message(r) -> str:
    from google.rpc import status_pb2
    return status_pb2.Status.FromString(r.content).message


def test_bearer_token(tmp_path):
    with start_collector(tmp_path, token="s3cret") as c:
        body = batch(0, 1, 1_700_000_000_000)
        assert httpx.post(c.url + "/v1/metrics", content=body, headers=PB).status_code == 401
        assert httpx.post(c.url + "/v1/metrics", content=body,
                          headers={**PB, "Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(c.url + "/api/v1/sql", json={"query": "SELECT 1"}).status_code == 401
        assert httpx.get(c.url + "/-/healthy").status_code == 200
        provider = sdk_provider(c.url, headers={"Authorization": "Bearer s3cret"})
        provider.get_meter("t").create_gauge("hw.power", unit="W").set(1.0, {"chip": "0"})
        assert provider.force_flush(10_000)
        assert c.sql("SELECT count(*) FROM metrics")[0][0] == 1
        provider.shutdown()


def test_gate_sheds_load_with_retry_after():
    release = threading.Event()

    async def scenario():
        gate = IngestGate(max_inflight=1, wait_s=0.05, retry_after_s=3)
        busy = asyncio.ensure_future(gate.run(release.wait, 10))
        await asyncio.sleep(0.01)
        with pytest.raises(IngestError) as err:
            await gate.run(lambda: None)
        assert err.value.status == 429 and err.value.retry_after == 3
        release.set()
        assert await busy is True
        assert await gate.run(lambda x: x + 1, 1) == 2   # free again once the first request is done

    asyncio.run(scenario())


def test_refusals_are_counted_and_shedding_says_when_to_retry():
    from prometheus_client import CollectorRegistry

    from collector.app import IngestMetrics
    from collector.store.core import Store

    registry = CollectorRegistry()
    metrics = IngestMetrics(registry, Store(":memory:"))
    assert metrics.refusal("otlp", IngestError(429, "busy", retry_after=3)) == {"Retry-After": "3"}
    assert metrics.refusal("remote_write", IngestError(400, "bad")) == {}
    sample = registry.get_sample_value
    assert sample("shopfloor_collector_ingest_requests_total", {"protocol": "otlp", "code": "429"}) == 1
    assert sample("shopfloor_collector_ingest_shed_total", {"protocol": "otlp"}) == 1
    assert sample("shopfloor_collector_ingest_requests_total", {"protocol": "remote_write", "code": "400"}) == 1
    assert sample("shopfloor_collector_ingest_shed_total", {"protocol": "remote_write"}) is None
