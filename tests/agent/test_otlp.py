"""OTLP encoding round-trip (decoded with opentelemetry-proto) and the sender's OTLP/HTTP rules
against a real HTTP server on loopback."""

from __future__ import annotations

import gzip
import time
from email.utils import formatdate

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from agent.catalog import catalog
from agent.export.otlp import OtlpSender, encode_request, parse_retry_after
from agent.sources.base import Point, point
from tests.agent.otlp_server import serve_in_thread

CHIP = dict(chip=0, uuid="GPU-aaaa", vendor="nvidia", model="NVIDIA H100 80GB HBM3")
RESOURCE = {"cluster": "c1", "node": "gpu-001", "rack": "r7", "site": "sov-1"}


def _decode(body: bytes) -> ExportMetricsServiceRequest:
    return ExportMetricsServiceRequest.FromString(body)


def _one_of_each_instrument() -> dict[str, str]:
    """An OTel metric name per instrument kind, taken from the catalog (never spelled here)."""
    found: dict[str, str] = {}
    for m in catalog():
        found.setdefault(m.instrument, m.name)
    assert {"gauge", "counter"} <= set(found)  # updowncounter too, once the catalog has one
    return found


def test_round_trip_names_units_types_temporality_attributes():
    kinds = _one_of_each_instrument()
    points = []
    for i, name in enumerate(kinds.values()):
        m = catalog()[name]
        attrs = {a: f"{a}-{i}" for a in m.attributes}
        points.append(Point(name, 10.0 + i, attrs, time_ns=0 if i == 0 else 5_000 + i))
    body = encode_request(points, RESOURCE, start_time_ns=1_000, default_time_ns=9_000)
    req = _decode(body)

    assert len(req.resource_metrics) == 1
    rm = req.resource_metrics[0]
    res = {kv.key: kv.value.string_value for kv in rm.resource.attributes}
    assert res == {**RESOURCE, "service.name": "shopfloor-agent", "service.instance.id": "gpu-001"}
    assert len(rm.scope_metrics) == 1
    sm = rm.scope_metrics[0]
    assert sm.scope.name == "shopfloor.agent"
    assert [m.name for m in sm.metrics] == list(kinds.values())

    for i, (instrument, name) in enumerate(kinds.items()):
        m = catalog()[name]
        got = sm.metrics[i]
        assert got.unit == m.unit and got.description == m.help
        if instrument == "gauge":
            assert got.HasField("gauge")
            dp = got.gauge.data_points[0]
            assert dp.start_time_unix_nano == 0
        else:
            assert got.HasField("sum")
            assert got.sum.aggregation_temporality == AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
            assert got.sum.is_monotonic == (instrument == "counter")
            dp = got.sum.data_points[0]
            assert dp.start_time_unix_nano == 1_000
        assert dp.as_double == 10.0 + i
        assert dp.time_unix_nano == (9_000 if i == 0 else 5_000 + i)
        assert {kv.key: kv.value.string_value for kv in dp.attributes} == {a: f"{a}-{i}" for a in m.attributes}


def test_points_of_one_metric_share_one_metric_message_in_order():
    pts = [point("hw.power", 100 + c, chip=c, uuid=f"GPU-{c}", vendor="nvidia", model="H100") for c in range(8)]
    pts.insert(3, point("shopfloor.agent.spool.dropped", 2))
    sm = _decode(encode_request(pts, RESOURCE, 1, 2)).resource_metrics[0].scope_metrics[0]
    assert [m.name for m in sm.metrics] == ["hw.power", "shopfloor.agent.spool.dropped"]
    dps = sm.metrics[0].gauge.data_points
    assert [dp.as_double for dp in dps] == [100 + c for c in range(8)]
    assert [dp.attributes[0].value.string_value for dp in dps] == [str(c) for c in range(8)]


def test_unknown_metric_name_is_refused():
    with pytest.raises(KeyError, match="not in agent/catalog.yaml"):
        encode_request([Point("hw.not.a.metric", 1.0)], RESOURCE, 1, 2)


def test_empty_request_is_valid():
    req = _decode(encode_request([], RESOURCE, 1, 2))
    assert len(req.resource_metrics) == 1 and not req.resource_metrics[0].scope_metrics[0].metrics


@pytest.fixture
def receiver():
    srv = serve_in_thread(token="s3cret")
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/v1/metrics"


def test_send_success_gzip_and_auth(receiver):
    body = encode_request([point("hw.power", 123, **CHIP)], RESOURCE, 1, 2)
    sender = OtlpSender(_url(receiver), headers={"Authorization": "Bearer s3cret"})
    res = sender.send(body)
    assert res.ok and res.status == 200 and not res.retryable
    req = receiver.requests[-1]
    assert req["headers"]["Content-Encoding"] == "gzip"
    assert req["headers"]["Content-Type"] == "application/x-protobuf"
    assert req["points"][0][0] == "hw.power" and req["points"][0][3] == 123.0


def test_send_without_token_is_not_retryable(receiver):
    res = OtlpSender(_url(receiver), compression="none").send(encode_request([], RESOURCE, 1, 2))
    assert not res.ok and res.status == 401 and not res.retryable


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_statuses_honour_retry_after(receiver, status):
    receiver.answers.append((status, {"Retry-After": "7"}))
    res = OtlpSender(_url(receiver), headers={"Authorization": "Bearer s3cret"}).send(b"")
    assert not res.ok and res.retryable and res.status == status and res.retry_after == 7.0


def test_400_is_not_retried(receiver):
    sender = OtlpSender(_url(receiver), headers={"Authorization": "Bearer s3cret"}, compression="none")
    res = sender.send(b"\xff\xff not protobuf")
    assert not res.ok and not res.retryable and res.status == 400 and "bad request" in res.error
    n = len(receiver.requests)
    # send_with_retry must not resend a 400 either
    res = sender.send_with_retry(b"\xff\xff not protobuf", deadline_s=5)
    assert res.status == 400 and len(receiver.requests) == n


def test_send_with_retry_waits_retry_after_then_succeeds(receiver):
    receiver.answers.append((503, {"Retry-After": "0.3"}))
    sender = OtlpSender(_url(receiver), headers={"Authorization": "Bearer s3cret"})
    t0 = time.monotonic()
    res = sender.send_with_retry(encode_request([point("hw.power", 1, **CHIP)], RESOURCE, 1, 2))
    assert res.ok and time.monotonic() - t0 >= 0.3
    assert len(receiver.requests) == 1


def test_unreachable_endpoint_is_retryable():
    from tests.support import free_port
    res = OtlpSender(f"http://127.0.0.1:{free_port()}/v1/metrics", timeout=2).send(b"")
    assert not res.ok and res.retryable and res.status is None and res.error


def test_parse_retry_after_forms():
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert 25 <= later <= 31
    assert parse_retry_after(formatdate(time.time() - 30, usegmt=True)) == 0.0


def test_gzip_body_is_the_encoded_request(receiver):
    body = encode_request([point("hw.power", 5, **CHIP)], RESOURCE, 1, 2)
    assert gzip.decompress(gzip.compress(body)) == body
    OtlpSender(_url(receiver), headers={"Authorization": "Bearer s3cret"}).send(body)
    assert receiver.requests[-1]["points"] == [["hw.power", {**RESOURCE, "service.name": "shopfloor-agent",
                                                            "service.instance.id": "gpu-001", **{k: str(v) for k, v in CHIP.items()}}, 2, 5.0]]


def test_encoding_equals_the_library_built_message():
    """The cached-bytes encoder must produce exactly what opentelemetry-proto's API builds."""
    kinds = _one_of_each_instrument()
    pts = []
    for i, name in enumerate(kinds.values()):
        for c in range(3):
            pts.append(Point(name, c * 1.5 + i, {a: f"{a}{c}" for a in catalog()[name].attributes},
                             time_ns=0 if c == 0 else 7_000 + c))
    assert _decode(encode_request(pts, RESOURCE, 111, 999)) == _library_request(pts, RESOURCE, 111, 999)


def _library_request(points, resource, start_ns, default_ns) -> ExportMetricsServiceRequest:
    """The same request built with opentelemetry-proto's message API (the reference)."""
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
    from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric, NumberDataPoint

    from agent.export.otlp import _scope_version_cached

    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    for k, v in [*resource.items(), ("service.name", "shopfloor-agent"), ("service.instance.id", resource.get("node", ""))]:
        rm.resource.attributes.append(KeyValue(key=k, value=AnyValue(string_value=v)))
    sm = rm.scope_metrics.add()
    sm.scope.CopyFrom(InstrumentationScope(name="shopfloor.agent", version=_scope_version_cached()))
    order = list(dict.fromkeys(p.name for p in points))
    for name in order:
        m = catalog()[name]
        metric = Metric(name=name, unit=m.unit, description=m.help)
        gauge = m.instrument == "gauge"
        if not gauge:
            metric.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
            metric.sum.is_monotonic = m.instrument == "counter"
        dps = metric.gauge.data_points if gauge else metric.sum.data_points
        for p in (p for p in points if p.name == name):
            dp = NumberDataPoint(time_unix_nano=p.time_ns or default_ns, as_double=p.value,
                                 start_time_unix_nano=0 if gauge else start_ns)
            dp.attributes.extend(KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in p.attributes.items())
            dps.append(dp)
        sm.metrics.append(metric)
    return req


from hypothesis import given, settings, strategies as st  # noqa: E402

_NAMES = [m.name for m in catalog()]
_text = st.text(min_size=0, max_size=300)
_points = st.lists(st.builds(
    Point, st.sampled_from(_NAMES), st.floats(allow_nan=False),
    st.dictionaries(st.text(min_size=1, max_size=20), _text, max_size=6),
    st.integers(min_value=0, max_value=2**64 - 1)), max_size=40)


@settings(max_examples=100, deadline=None)
@given(points=_points, resource=st.dictionaries(st.sampled_from(["cluster", "node", "rack", "site"]), _text),
       start=st.integers(min_value=0, max_value=2**64 - 1), default=st.integers(min_value=1, max_value=2**64 - 1))
def test_encoding_matches_library_for_any_input(points, resource, start, default):
    got = _decode(encode_request(points, resource, start, default))
    assert got == _library_request(points, resource, start, default)


def test_nan_and_infinities_survive():
    import math
    pts = [point("hw.power", v, **CHIP) for v in (float("nan"), float("inf"), float("-inf"), -0.0)]
    dps = _decode(encode_request(pts, RESOURCE, 1, 2)).resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points
    assert math.isnan(dps[0].as_double) and dps[1].as_double == math.inf and dps[2].as_double == -math.inf
    assert math.copysign(1, dps[3].as_double) == -1
