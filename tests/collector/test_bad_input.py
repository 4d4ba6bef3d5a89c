"""Random and malformed payloads (hypothesis) never give a 5xx, never crash the collector and
never change what was stored before."""

from __future__ import annotations

import gzip
import json

import cramjam
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from collector.receive.remote_write import WriteRequest
from tests.collector.conftest import start_collector
from tests.collector.fleet import batch

PB = "application/x-protobuf"
BASELINE = batch(0, 1, 1_700_000_000_000)
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    cfg = {"ingest": {"max_body_bytes": 200_000, "max_decompressed_bytes": 1_000_000}}
    with start_collector(tmp_path_factory.mktemp("bad"), cfg) as c:
        r = httpx.post(c.url + "/v1/metrics", content=BASELINE, headers={"Content-Type": PB})
        assert r.status_code == 200
        c.baseline = c.sql("SELECT name, labels, epoch_ms(ts), value FROM metrics ORDER BY ALL")
        c.client = httpx.Client(timeout=10)
        yield c
        c.client.close()
        # the baseline is intact and the process is still alive
        assert c.proc.poll() is None
        now = c.sql("SELECT name, labels, epoch_ms(ts), value FROM metrics ORDER BY ALL")
        assert [r for r in now if r in c.baseline] == c.baseline


def post(c, path, content, headers):
    before = c.sql("SELECT count(*) FROM metrics")[0][0]
    r = c.client.post(c.url + path, content=content, headers=headers)
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400 and path == "/v1/metrics":
        assert c.sql("SELECT count(*) FROM metrics")[0][0] == before, "a refused request stored something"
    return r


encodings = st.sampled_from([None, "gzip", "snappy", "identity", "deflate"])
types = st.sampled_from([PB, "application/json", "text/plain", "application/x-protobuf; charset=x"])


@SETTINGS
@given(data=st.binary(max_size=3000), ctype=types, enc=encodings)
def test_random_bytes(live, data, ctype, enc):
    headers = {"Content-Type": ctype}
    if enc:
        headers["Content-Encoding"] = enc
    post(live, "/v1/metrics", data, headers)
    post(live, "/api/v1/write", data, {"Content-Encoding": "snappy"})


@SETTINGS
@given(cut=st.integers(0, len(BASELINE)), flips=st.lists(st.tuples(st.integers(0, len(BASELINE) - 1),
                                                                    st.integers(1, 255)), max_size=4),
       wrap=st.sampled_from(["raw", "gzip", "snappy-rw"]))
def test_truncated_and_corrupted_valid_bodies(live, cut, flips, wrap):
    data = bytearray(BASELINE[:cut])
    for pos, x in flips:
        if pos < len(data):
            data[pos] ^= x
    if wrap == "gzip":
        post(live, "/v1/metrics", gzip.compress(bytes(data)), {"Content-Type": PB, "Content-Encoding": "gzip"})
    elif wrap == "snappy-rw":
        post(live, "/api/v1/write", bytes(cramjam.snappy.compress_raw(bytes(data))), {"Content-Encoding": "snappy"})
    else:
        post(live, "/v1/metrics", bytes(data), {"Content-Type": PB})


text = st.text(max_size=30)
floats = st.floats(allow_nan=True, allow_infinity=True)


@SETTINGS
@given(name=text, unit=st.sampled_from(["", "1", "By", "{x}", "W/s", "%"]), key=text, value=text, v=floats,
       t=st.integers(0, 2**64 - 1), kind=st.sampled_from(["gauge", "sum", "histogram"]))
def test_wrongly_typed_and_odd_otlp_fields(live, name, unit, key, value, v, t, kind):
    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name=name, unit=unit)
    if kind == "histogram":
        dp = m.histogram.data_points.add(time_unix_nano=t, count=3, sum=v)
        dp.explicit_bounds.extend([v, 1.0])
        dp.bucket_counts.extend([1, 1])     # one count short of the bounds: must not crash
        m.histogram.aggregation_temporality = 2
    else:
        dp = getattr(m, kind).data_points.add(time_unix_nano=t, as_double=v)
    kv = dp.attributes.add(key=key)
    kv.value.string_value = value
    r = post(live, "/v1/metrics", req.SerializeToString(), {"Content-Type": PB})
    assert r.status_code == 200
    # the same thing as JSON, with a field of the wrong JSON type thrown in
    doc = json.loads(json.dumps({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
        {"name": name, "gauge": {"dataPoints": [{"asDouble": value, "timeUnixNano": str(t)}]}}]}]}]}))
    post(live, "/v1/metrics", json.dumps(doc).encode(), {"Content-Type": "application/json"})


@SETTINGS
@given(labels=st.dictionaries(text, text, max_size=4), ts=st.integers(-(2**63), 2**63 - 1), v=floats)
def test_odd_remote_write_series(live, labels, ts, v):
    req = WriteRequest()
    series = req.timeseries.add()
    for k, val in labels.items():
        series.labels.add(name=k, value=val)
    series.samples.add(value=v, timestamp=ts)
    post(live, "/api/v1/write", bytes(cramjam.snappy.compress_raw(req.SerializeToString())),
         {"Content-Encoding": "snappy"})
