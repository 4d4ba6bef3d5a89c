"""Prometheus remote-write 1.0 receiver: POST /api/v1/write (snappy block + protobuf WriteRequest).

The WriteRequest messages are built here from a descriptor (descriptor_pb2) in a private
descriptor pool, instead of depending on a package: PyPI has no maintained Prometheus
remote-write proto package, and the messages are tiny and frozen by the 1.0 spec
(prometheus/prompb/types.proto and remote.proto). Only the fields 1.0 senders use are declared;
protobuf skips the rest (exemplars, native histograms) as unknown fields.

    message WriteRequest { repeated TimeSeries timeseries = 1; repeated MetricMetadata metadata = 3; }
    message TimeSeries   { repeated Label labels = 1; repeated Sample samples = 2; }
    message Label        { string name = 1; string value = 2; }
    message Sample       { double value = 1; int64 timestamp = 2; }   // timestamp in ms
    message MetricMetadata { int32 type = 1; string metric_family_name = 2; string help = 4; string unit = 5; }

Prometheus' staleness marker (the NaN with payload 0x7ff0000000000002) becomes a stored NULL.
Answers: 204 when everything was stored; 400 with the reasons when some samples were refused
(Prometheus does not retry 4xx, and the accepted part is committed); 400 for an undecodable
body; 413 over the size limits; 429 + Retry-After when shedding load.
"""

from __future__ import annotations

import struct
import time

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from collector.receive.common import (Answer, IngestError, IngestGate, LoadedInBackground, batch_key, decode_content,
                                      read_asgi_body)
from collector.store.writer import WriteResult

STALE_NAN_BITS = 0x7FF0000000000002

_F = descriptor_pb2.FieldDescriptorProto


def _build_messages():
    fdp = descriptor_pb2.FileDescriptorProto(name="shopfloor_prompb.proto", package="prometheus",
                                             syntax="proto3")

    def message(name, *fields):
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name

    rep, opt = _F.LABEL_REPEATED, _F.LABEL_OPTIONAL
    message("Label", ("name", 1, _F.TYPE_STRING, opt, None), ("value", 2, _F.TYPE_STRING, opt, None))
    message("Sample", ("value", 1, _F.TYPE_DOUBLE, opt, None), ("timestamp", 2, _F.TYPE_INT64, opt, None))
    message("TimeSeries", ("labels", 1, _F.TYPE_MESSAGE, rep, ".prometheus.Label"),
            ("samples", 2, _F.TYPE_MESSAGE, rep, ".prometheus.Sample"))
    message("MetricMetadata", ("type", 1, _F.TYPE_INT32, opt, None),
            ("metric_family_name", 2, _F.TYPE_STRING, opt, None),
            ("help", 4, _F.TYPE_STRING, opt, None), ("unit", 5, _F.TYPE_STRING, opt, None))
    message("WriteRequest", ("timeseries", 1, _F.TYPE_MESSAGE, rep, ".prometheus.TimeSeries"),
            ("metadata", 3, _F.TYPE_MESSAGE, rep, ".prometheus.MetricMetadata"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"prometheus.{name}"))
            for name in ("Label", "Sample", "TimeSeries", "MetricMetadata", "WriteRequest")}


MESSAGES = _build_messages()
WriteRequest = MESSAGES["WriteRequest"]


def is_stale_nan(value: float) -> bool:
    return value != value and struct.unpack("<Q", struct.pack("<d", value))[0] == STALE_NAN_BITS


def stale_nan() -> float:
    return struct.unpack("<d", struct.pack("<Q", STALE_NAN_BITS))[0]


def encode(series: list[tuple[dict[str, str], list[tuple[int, float]]]]) -> bytes:
    """A snappy-compressed WriteRequest (used by tests, the benchmark and the demo)."""
    import cramjam

    req = WriteRequest()
    for labels, samples in series:
        ts = req.timeseries.add()
        for k in sorted(labels):
            ts.labels.add(name=k, value=labels[k])
        for t, v in samples:
            ts.samples.add(value=v, timestamp=t)
    return bytes(cramjam.snappy.compress_raw(req.SerializeToString()))


def series_labels(series) -> tuple[str | None, dict[str, str]]:
    """(metric name or None, the other labels) of a TimeSeries; a repeated name keeps its last value."""
    labels = {}
    metric = None
    for lab in series.labels:
        if lab.name == "__name__":
            metric = lab.value
        else:
            labels[lab.name] = lab.value
    return metric, labels


def translate(req) -> tuple[list, int, list[str]]:
    rows: list = []
    refused = 0
    reasons: list[str] = []
    for series in req.timeseries:
        metric, labels = series_labels(series)
        if not metric:
            refused += len(series.samples)
            if len(reasons) < 5:
                reasons.append("series without __name__ label")
            continue
        for s in series.samples:
            v = s.value
            rows.append((metric, labels, s.timestamp, None if v != v and is_stale_nan(v) else v))
    return rows, refused, reasons


class RemoteWriteReceiver:
    def __init__(self, ctx):
        self.ctx = ctx
        cfg = ctx.config.ingest
        self.gate = IngestGate(cfg.max_inflight, cfg.queue_timeout_s, cfg.retry_after_s)
        self.wire = LoadedInBackground("remote-write wire path", self._build_wire)

    def _build_wire(self):
        from collector.receive.wire import RemoteWritePath

        return RemoteWritePath(self.ctx.writer)

    def ingest(self, raw: bytes, encoding: str | None) -> tuple[int, int, str]:
        """Returns (accepted, refused, message)."""
        body = decode_content(raw, encoding or "snappy", self.ctx.config.ingest.max_decompressed_bytes)
        key = batch_key(b"remote_write", body)
        writer = self.ctx.writer
        wire = self.wire.get()
        res = WriteResult()
        walked = wire.translate(body, res) if wire is not None else None
        if walked is not None:
            sids, ts, values, stale, refused, reasons = walked
            result = writer.write_resolved(sids, ts, values, key, res, nulls=stale)
        else:
            req = WriteRequest()
            try:
                req.ParseFromString(body)
            except (DecodeError, RecursionError, ValueError) as exc:
                raise IngestError(400, f"cannot decode remote-write WriteRequest: {str(exc)[:300]}") from None
            rows, refused, reasons = translate(req)
            result = writer.write(rows, batch_key=key)
        self.ctx.ingest_metrics.count("remote_write", result)
        if refused:
            self.ctx.ingest_metrics.samples.labels("remote_write", "rejected").inc(refused)
        return result.accepted + result.duplicate, refused + result.refused, "; ".join(reasons + result.errors)


def make_endpoint(ctx):
    """("/api/v1/write", handler) for collector.receive.common.IngestRoutes."""
    receiver = RemoteWriteReceiver(ctx)
    metrics = ctx.ingest_metrics
    metrics.wire_path.labels("remote_write").set_function(lambda: float(receiver.wire.value is not None))
    limits = ctx.config.ingest

    async def remote_write(headers: dict[bytes, bytes], receive) -> Answer:
        try:
            raw = await read_asgi_body(receive, headers.get(b"content-length"), limits.max_body_bytes)
            encoding = headers.get(b"content-encoding")
            accepted, refused, message = await receiver.gate.run(
                receiver.ingest, raw, encoding and encoding.decode("latin-1"))
        except IngestError as exc:
            return Answer(exc.status, (exc.message + "\n").encode(), "text/plain",
                          metrics.refusal("remote_write", exc))
        if refused:
            metrics.request("remote_write", 400)
            return Answer(400, f"{refused} samples refused ({accepted} stored): {message}\n".encode(), "text/plain")
        metrics.request("remote_write", 204)
        return Answer(204)

    return "/api/v1/write", remote_write
