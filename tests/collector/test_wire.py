"""The compiled wire path (collector.receive.wire) against the general upb path.

For the same request bytes both must give the same samples - series ids, timestamps, values and
stale markers, in the same order - and the same refused counts; a request the wire path does not
fully understand must be handed to the general path (walk answers FALLBACK), never half-read.
Requests are built field by field so layouts no SDK writes (fields in any order, a Sum's
temporality after its points, int values, missing timestamps, stale flags, exemplars, unknown
fields) are covered, and series repeat across requests so the known-series table is exercised.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Exemplar,
    HistogramDataPoint,
    NumberDataPoint,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from collector.app import make_context
from collector.config import from_dict
from collector.receive.otlp import PROTOBUF, OtlpReceiver, Resolved, decode_request
from collector.receive.wire import FALLBACK, OK, WirePath, walk
from collector.store.writer import WriteResult
from tests.collector.fleet import batch

NOW_MS = 1_790_000_000_000


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def kv(key: str, value) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


# ------------------------------------------------------------------ request strategies
attr_values = st.one_of(st.sampled_from(["0", "1", "GPU-1", "a b", "é"]), st.integers(-3, 3), st.booleans(),
                        st.sampled_from([0.5, -1.0]))
attributes = st.lists(st.tuples(st.sampled_from(["chip", "uuid", "mode", "link.id", "le"]), attr_values),
                      max_size=4)


@st.composite
def point_bytes(draw) -> bytes:
    """One NumberDataPoint's bytes, its fields in any order (concatenated messages merge)."""
    chunks = [KeyValue_field(k, v) for k, v in draw(attributes)]
    if draw(st.booleans()):
        chunks.append(NumberDataPoint(start_time_unix_nano=draw(st.integers(1, 2**63))).SerializeToString())
    if draw(st.integers(0, 4)):   # mostly with a timestamp; else the collector's clock
        ts = draw(st.integers(1, 2**64 - 1) | st.integers(1_700_000_000_000_000_000, 1_800_000_000_000_000_000))
        chunks.append(NumberDataPoint(time_unix_nano=ts).SerializeToString())
    value = draw(st.sampled_from(["double", "int", "both", "none"]))
    if value in ("double", "both"):
        chunks.append(NumberDataPoint(as_double=draw(st.floats(allow_nan=True, allow_infinity=True))).SerializeToString())
    if value in ("int", "both"):
        chunks.append(NumberDataPoint(as_int=draw(st.integers(-2**63, 2**63 - 1))).SerializeToString())
    flags = draw(st.sampled_from([0, 0, 0, 1, 2, 3]))
    if flags:
        chunks.append(NumberDataPoint(flags=flags).SerializeToString())
    if draw(st.integers(0, 9)) == 0:
        chunks.append(NumberDataPoint(exemplars=[Exemplar(as_double=1.0, time_unix_nano=5)]).SerializeToString())
    if draw(st.integers(0, 9)) == 0:
        chunks.append(draw(st.sampled_from([b"\x78\x01", b"\x81\x01" + b"\x00" * 8, b"\x8a\x01\x02hi",
                                            b"\x95\x01\x00\x00\x00\x00"])))   # unknown fields 15, 16, 17, 18
    return b"".join(draw(st.permutations(chunks)))


def KeyValue_field(key, value) -> bytes:
    return NumberDataPoint(attributes=[kv(key, value)]).SerializeToString()


@st.composite
def metric_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["gauge", "sum", "sum", "delta", "histogram"]))
    name = field(1, draw(st.sampled_from(["hw.power", "hw.energy", "hw.gpu.utilization", "x"])).encode())
    unit = field(3, draw(st.sampled_from(["W", "J", "1", ""])).encode()) if draw(st.booleans()) else b""
    desc = field(2, b"about it") if draw(st.integers(0, 5)) == 0 else b""
    if kind == "histogram":
        data = field(1, HistogramDataPoint(count=2, bucket_counts=[1, 1], explicit_bounds=[1.0]).SerializeToString())
        data = field(9, data + b"\x10\x02")
    else:
        parts = [field(1, draw(point_bytes())) for _ in range(draw(st.integers(0, 4)))]
        if kind != "gauge":
            temporality = 1 if kind == "delta" else draw(st.sampled_from([0, 2, 2, 7]))
            if temporality:
                parts.append(b"\x10" + varint(temporality))
            if draw(st.booleans()):
                parts.append(b"\x18" + varint(draw(st.sampled_from([0, 1, 2]))))
        data = field(5 if kind == "gauge" else 7, b"".join(draw(st.permutations(parts))))
    return b"".join(draw(st.permutations([name, unit, desc, data])))


@st.composite
def request_bytes(draw) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 2))):
        rattrs = draw(st.lists(st.tuples(st.sampled_from(["node", "cluster", "service.name", "service.instance.id",
                                                          "host.name"]), st.sampled_from(["n1", "n2", "c"])),
                               max_size=3))
        parts = []
        if rattrs or draw(st.booleans()):
            parts.append(field(1, Resource(attributes=[kv(k, v) for k, v in rattrs]).SerializeToString()))
        for _ in range(draw(st.integers(1, 2))):
            sm = [field(2, draw(metric_bytes())) for _ in range(draw(st.integers(0, 3)))]
            if draw(st.booleans()):
                sm.insert(0, field(1, InstrumentationScope(name="s", version="1").SerializeToString()))
            parts.append(field(2, b"".join(sm)))
        out += field(1, b"".join(parts))
    return out


# ------------------------------------------------------------------ the two paths, same writer
@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """(general-path receiver, wire path) sharing one Writer, so series ids are comparable."""
    cfg = from_dict({"ingest": {"max_series_per_metric": 40}})
    cfg.db = str(tmp_path_factory.mktemp("wire") / "x.duckdb")
    ctx = make_context(cfg)
    receiver = OtlpReceiver(ctx)
    yield receiver, WirePath(receiver.translator)
    ctx.store.close()


def general(receiver, body: bytes):
    out = Resolved(WriteResult())
    rows, deltas, refused, _ = receiver.translator.translate(decode_request(body, PROTOBUF), NOW_MS, out)
    return out, rows, deltas, refused


def bits(v) -> object:
    return None if v is None else struct.pack("<d", v)


def assert_same(receiver, wire: WirePath, body: bytes) -> bool:
    """Both paths on body; True when the wire path took it (else it handed it over)."""
    out, rows, deltas, refused = general(receiver, body)
    res = WriteResult()
    fast = wire.translate(body, NOW_MS, res)
    if fast is None:
        return False
    assert not rows and not deltas and not refused   # only the general path handles those
    sids, ts, values, stale = fast
    assert sids.tolist() == out.sids
    assert ts.tolist() == out.ts
    fast_values = [None if stale is not None and stale[k] else float(v) for k, v in enumerate(values)]
    assert [bits(v) for v in fast_values] == [bits(v) for v in out.values]
    assert (res.limited, res.rejected) == (out.result.limited, out.result.rejected)
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(st.lists(request_bytes(), min_size=1, max_size=3))
def test_wire_and_general_paths_give_the_same_samples(paths, bodies):
    receiver, wire = paths
    for body in bodies + bodies:   # the repeat finds its series in the known-series table
        ExportMetricsServiceRequest.FromString(body)   # the strategies build valid requests
        assert_same(receiver, wire, body)


def corrupted(data, body: bytes) -> bytes:
    """body with 1-3 bytes overwritten, then cut at a drawn length."""
    body = bytearray(body)
    for _ in range(data.draw(st.integers(1, 3))):
        if body:
            body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    return bytes(body[:data.draw(st.integers(0, len(body)))])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_corrupted_bodies_are_never_read_differently(paths, data):
    """A body the wire path accepts is one upb accepts too, read the same way."""
    receiver, wire = paths
    body = corrupted(data, data.draw(request_bytes()))
    # walk leaves resources and scopes to upb (cached by their bytes), so ask the whole path
    if wire.translate(body, NOW_MS, WriteResult()) is not None:
        try:
            decode_request(body, PROTOBUF)
        except Exception as exc:   # noqa: BLE001 - reported with the body
            pytest.fail(f"wire path accepts a body upb refuses ({exc}): {body!r}")
        try:
            assert_same(receiver, wire, body)
        except UnicodeDecodeError:
            pytest.fail(f"wire path accepted bad UTF-8: {body!r}")


def test_agent_requests_take_the_wire_path_and_repeat_from_the_table(paths):
    receiver, wire = paths
    for step in range(3):
        body = batch(3, step, NOW_MS - 10_000 * step)
        assert assert_same(receiver, wire, body)
    found, _ = wire.known.lookup(*walk(np.frombuffer(body, np.uint8), wire.seed1, wire.seed2)[7:9])
    assert found.all()


def test_what_the_wire_path_hands_over(paths):
    """Histograms, delta sums, metadata, a second data field, bad UTF-8, truncation: FALLBACK."""
    _, wire = paths
    point = field(1, NumberDataPoint(as_double=1.0, time_unix_nano=5).SerializeToString())

    def request(metric: bytes) -> bytes:
        return field(1, field(2, field(2, metric)))

    good = request(field(1, b"m") + field(5, point))
    cases = {
        "histogram": request(field(1, b"m") + field(9, field(1, HistogramDataPoint(count=1).SerializeToString()))),
        "delta sum": request(field(1, b"m") + field(7, point + b"\x10\x01")),
        "metadata": request(field(1, b"m") + field(5, point) + field(12, KeyValue_field("a", "b")[2:])),
        "two data fields": request(field(1, b"m") + field(5, point) + field(7, point)),
        "no data": request(field(1, b"m")),
        "bad UTF-8 name": request(field(1, b"\xff") + field(5, point)),
        "truncated": good[:-1],
        "unknown top-level field": good + field(2, b""),
        "group wire type in a point": request(field(1, b"m") + field(5, field(1, b"\x7b\x7c"))),
    }
    walked = lambda b: walk(np.frombuffer(b, np.uint8), wire.seed1, wire.seed2)[0]   # noqa: E731
    assert walked(good) == OK
    for what, body in cases.items():
        assert walked(body) == FALLBACK, what


def test_stale_points_and_limits_are_counted_alike(paths):
    """A stale marker stays a None value; a series over the per-metric limit is refused, the same
    number of times on both paths."""
    receiver, wire = paths
    points = b"".join(field(1, NumberDataPoint(time_unix_nano=10**18, as_double=1.5, flags=1 if c == 0 else 0,
                                               attributes=[kv("chip", str(c))]).SerializeToString())
                      for c in range(60))
    body = field(1, field(1, Resource(attributes=[kv("node", "limits")]).SerializeToString())
                 + field(2, field(2, field(1, b"limited.metric") + field(5, points))))
    assert assert_same(receiver, wire, body)
    res = WriteResult()
    sids, ts, values, stale = wire.translate(body, NOW_MS, res)
    assert res.limited == 20 and len(sids) == 40 and stale is not None and stale[0] and not stale[1:].any()
    assert not math.isnan(values[1])


def test_wire_path_stores_stale_markers_and_recognises_retries(paths):
    """Through OtlpReceiver.ingest into DuckDB: a stale point is stored as a NULL value, and the
    same bytes sent again are a duplicate batch, stored once."""
    receiver, wire = paths
    receiver.wire.value = wire
    points = b"".join(field(1, NumberDataPoint(time_unix_nano=NOW_MS * 1_000_000, as_double=2.5, flags=flags,
                                               attributes=[kv("chip", chip)]).SerializeToString())
                      for chip, flags in (("0", 0), ("1", 1)))
    body = field(1, field(1, Resource(attributes=[kv("node", "e2e")]).SerializeToString())
                 + field(2, field(2, field(1, b"e2e.metric") + field(5, points))))
    query = ("SELECT s.labels['chip'], h.ts, h.value FROM samples_hot h JOIN series s ON s.id = h.series_id "
             "WHERE s.metric LIKE 'e2e%' ORDER BY 1")
    for _ in range(2):
        resp = receiver.ingest(body, None, PROTOBUF)
        assert resp.partial_success.rejected_data_points == 0
        assert receiver.ctx.store.con.execute(query).fetchall() == [("0", NOW_MS, 2.5), ("1", NOW_MS, None)]
