"""The compiled remote-write path (collector.receive.wire.RemoteWritePath) against the general
upb path, end to end: two collectors' receivers, one with each path, take the same request bytes
and must answer the same (accepted, refused, message) and store the same samples.

Requests are built field by field, so layouts no Prometheus writes are covered too: labels after
samples, Label and Sample fields in any order or missing, a repeated label name, no __name__,
invalid label names, stale NaNs, negative and out-of-range timestamps, empty series, series over
a cardinality limit; every request is sent twice (the retry is a duplicate on both paths).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.app import make_context
from collector.config import from_dict
from collector.receive.common import IngestError, LoadedInBackground
from collector.receive.remote_write import STALE_NAN_BITS, RemoteWriteReceiver, WriteRequest
from collector.receive.wire import FALLBACK, OK, walk_remote_write
from tests.collector.test_wire import corrupted, field, varint

LABEL_NAMES = ["__name__", "node", "chip", "bad-name", "", "le"]
LABEL_VALUES = ["m1", "m2", "", "n1", "é", "x" * 20]
VALUES = [0.0, 1.5, -2.25, float("inf"), float("nan"), struct.unpack("<d", struct.pack("<Q", STALE_NAN_BITS))[0]]
STAMPS = [0, 1, -5, 1_790_000_000_000, 1_790_000_010_000, (1 << 62) - 1, 1 << 62, -(1 << 62), -(1 << 63)]


def receivers(tmp_path_factory, name):
    cfg = from_dict({"ingest": {"max_series_per_metric": 3}})
    cfg.db = str(tmp_path_factory.mktemp(name) / "x.duckdb")
    ctx = make_context(cfg)
    return ctx, RemoteWriteReceiver(ctx)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(general-path receiver, wire-path receiver), each on its own store."""
    ctx_g, general = receivers(tmp_path_factory, "general")
    general.wire = LoadedInBackground("no wire path", lambda: None)   # every request: the general path
    ctx_w, wired = receivers(tmp_path_factory, "wire")
    wired.wire.value = wired._build_wire()      # loaded now, not in the background
    yield general, wired
    ctx_g.store.close()
    ctx_w.store.close()


@st.composite
def label_bytes(draw) -> bytes:
    parts = []
    if draw(st.booleans()):
        parts.append(field(1, draw(st.sampled_from(LABEL_NAMES)).encode()))
    if draw(st.booleans()):
        parts.append(field(2, draw(st.sampled_from(LABEL_VALUES)).encode()))
    return b"".join(draw(st.permutations(parts)))


@st.composite
def sample_bytes(draw) -> bytes:
    parts = []
    if draw(st.booleans()):
        parts.append(b"\x09" + struct.pack("<d", draw(st.sampled_from(VALUES))))
    if draw(st.booleans()):
        parts.append(b"\x10" + varint(draw(st.sampled_from(STAMPS)) & ((1 << 64) - 1)))
    return b"".join(draw(st.permutations(parts)))


@st.composite
def series_bytes(draw) -> bytes:
    metric = [field(1, field(1, b"__name__") + field(2, draw(st.sampled_from([b"m1", b"m2", b"m3"]))))]
    labels = [field(1, draw(label_bytes())) for _ in range(draw(st.integers(0, 3)))]
    if draw(st.integers(0, 9)) == 0:
        metric = []                             # no __name__ at all
    samples = [field(2, draw(sample_bytes())) for _ in range(draw(st.integers(0, 3)))]
    return b"".join(draw(st.permutations(metric + labels + samples)))


@st.composite
def request_bytes(draw) -> bytes:
    return b"".join(field(1, draw(series_bytes())) for _ in range(draw(st.integers(0, 4))))


def stored(receiver) -> list:
    rows = receiver.ctx.store.con.execute(
        "SELECT s.metric, map_entries(s.labels)::VARCHAR, h.ts, h.value IS NULL, h.value::VARCHAR "
        "FROM samples_hot h JOIN series s ON s.id = h.series_id").fetchall()
    return sorted(rows)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(st.lists(request_bytes(), min_size=1, max_size=3))
def test_wire_and_general_paths_answer_and_store_the_same(pair, bodies):
    general, wired = pair
    for body in bodies + bodies:               # the repeat is a retry: a duplicate on both
        WriteRequest.FromString(body)           # the strategies build valid requests
        assert wired.ingest(body, "identity") == general.ingest(body, "identity")
    assert stored(wired) == stored(general)


def test_prometheus_shaped_requests_take_the_wire_path(pair):
    general, wired = pair
    req = WriteRequest()
    for chip in range(3):   # the fixture allows 3 series per metric
        ts = req.timeseries.add()
        for k, v in (("__name__", "hw_gpu_power_watts"), ("chip", str(chip)), ("node", "n7")):
            ts.labels.add(name=k, value=v)
        ts.samples.add(value=100.0 + chip, timestamp=1_790_000_000_000)
    body = req.SerializeToString()
    path = wired.wire.value
    status, series, *_ = walk_remote_write(path_buf(body), path.seed1, path.seed2)
    assert status == OK and len(series) == 3
    assert wired.ingest(body, "identity") == (3, 0, "") == general.ingest(body, "identity")
    found, _ = path.known.lookup(*walk_remote_write(path_buf(body), path.seed1, path.seed2)[2:4])
    assert found.all()                          # the next request of these series costs no Python


def test_what_the_walker_hands_over(pair):
    """Metadata, exemplars, histograms and unknown fields go to the general path."""
    _, wired = pair
    path = wired.wire.value
    series = field(1, field(1, b"__name__") + field(2, b"m1")) + field(2, b"\x09" + b"\0" * 8)
    cases = {
        "metadata": field(1, series) + field(3, field(2, b"m1")),
        "exemplar": field(1, series + field(3, b"")),
        "histogram": field(1, series + field(4, b"")),
        "unknown sample field": field(1, field(2, b"\x18\x01")),
        "truncated sample value": field(1, field(2, b"\x09\0\0")),
        "length past the end": b"\x0a\x7f" + series,
    }
    assert walk_remote_write(path_buf(field(1, series)), path.seed1, path.seed2)[0] == OK
    for what, body in cases.items():
        assert walk_remote_write(path_buf(body), path.seed1, path.seed2)[0] == FALLBACK, what


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_corrupted_bodies_are_never_read_differently(pair, data):
    """Any body, however broken, is answered and stored the same on both paths (so the wire
    path never accepts what upb refuses, nor reads it differently)."""
    general, wired = pair
    body = corrupted(data, data.draw(request_bytes()))
    assert answer(wired, body) == answer(general, body)
    assert stored(wired) == stored(general)


def answer(receiver, body: bytes):
    try:
        return receiver.ingest(body, "identity")
    except IngestError as exc:
        return exc.status, exc.message


def path_buf(body: bytes):
    return np.frombuffer(body, np.uint8)
