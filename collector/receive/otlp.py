"""OTLP/HTTP metrics receiver: POST /v1/metrics (protobuf or JSON, optionally gzip).

Translation to Prometheus series follows Prometheus' own OTLP translation:
- names: agent.catalog.prometheus_name(name, unit, instrument), so catalog metrics get exactly
  their catalog names (gauge -> unit suffix, "1" -> _ratio; monotonic sum -> _total);
- labels: data-point attributes, plus resource attributes whose key has no dot (cluster, node,
  rack, site labels), plus job = service.name and instance = service.instance.id;
- sums: cumulative as-is; delta points are accumulated per series into a running cumulative
  total held in memory (a restart starts the total again at the next delta, which PromQL's
  rate() treats as a counter reset);
- histograms: classic _bucket{le=...} (cumulative), _sum, _count; summaries: {quantile=...},
  _sum, _count; exponential histograms are refused with a reason (no native histograms here);
- a point flagged NO_RECORDED_VALUE becomes a staleness marker.

Answers (OTLP spec): 200 with partial_success (rejected_data_points counts refused samples, and
error_message says why) - the response is in the request's encoding; 400 for an undecodable body;
413 over the size limits; 415 for an unknown content type; 429 + Retry-After when shedding load.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import threading
import time
from dataclasses import dataclass, field

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import NumberDataPoint
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from agent.catalog import prometheus_label, prometheus_name
from collector.receive.common import (Answer, IngestError, IngestGate, LoadedInBackground, batch_key, decode_content,
                                      read_asgi_body)
from collector.store.writer import INVALID, WriteResult

log = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
FLAG_NO_RECORDED_VALUE = 1
CUMULATIVE, DELTA = 2, 1   # AggregationTemporality


def any_value(v) -> str:
    """An OTLP AnyValue as a label string."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return "true" if v.bool_value else "false"
    if kind == "int_value":
        return str(v.int_value)
    if kind == "double_value":
        return repr(v.double_value)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    if kind == "array_value":
        return json.dumps([any_value(x) for x in v.array_value.values])
    if kind == "kvlist_value":
        return json.dumps({kv.key: any_value(kv.value) for kv in v.kvlist_value.values}, sort_keys=True)
    return ""


_label_names: dict[str, str] = {}


def label_name(key: str) -> str:
    name = _label_names.get(key)
    if name is None:
        name = _label_names[key] = prometheus_label(key)
    return name


def format_le(bound: float) -> str:
    """Prometheus spells bucket bounds like Go's FormatFloat(f, 'f', -1): 0.5, 1, 2.5, +Inf."""
    if math.isinf(bound):
        return "+Inf" if bound > 0 else "-Inf"
    text = repr(float(bound))
    return text[:-2] if text.endswith(".0") else text


_U64 = struct.Struct("<Q").unpack_from
_I64 = struct.Struct("<q").unpack_from
_F64 = struct.Struct("<d").unpack_from


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """Decode a protobuf varint at buf[i]; returns (value, next index)."""
    value = shift = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def _skip_field(buf: bytes, i: int) -> int:
    """Index after the field whose tag starts at buf[i] (any wire type protobuf still uses)."""
    tag, i = _varint(buf, i)
    wire = tag & 7
    if wire == 0:
        return _varint(buf, i)[1]
    if wire == 1:
        return i + 8
    if wire == 2:
        length, i = _varint(buf, i)
        return i + length
    if wire == 5:
        return i + 4
    raise ValueError(f"unsupported protobuf wire type {wire}")


@dataclass
class Resolved:
    """Samples with series ids already resolved, on their way to Writer.write_resolved."""
    result: WriteResult
    sids: list = field(default_factory=list)
    ts: list = field(default_factory=list)
    values: list = field(default_factory=list)


class DeltaAccumulator:
    """Running cumulative totals for delta sums, keyed by series."""

    def __init__(self):
        self.totals: dict[tuple, float] = {}
        self.lock = threading.Lock()

    def accumulate(self, points, rows: list) -> dict[tuple, float]:
        """Append cumulative rows for delta points; returns the new totals (applied on commit)."""
        updates: dict[tuple, float] = {}
        for name, labels, ts, inc in points:
            if inc is None:
                rows.append((name, labels, ts, None))
                continue
            key = (name, tuple(sorted(labels.items())))
            total = updates.get(key, self.totals.get(key, 0.0)) + inc
            updates[key] = total
            rows.append((name, labels, ts, total))
        return updates


class Translator:
    """ExportMetricsServiceRequest -> writer rows (metric, labels, ts_ms, value)."""

    def __init__(self, deltas: DeltaAccumulator, writer):
        self.deltas = deltas
        self.writer = writer
        self._names: dict[tuple, str] = {}
        self._bases: dict[bytes, dict] = {}                    # serialized Resource -> base labels
        self._series: dict[tuple, dict[bytes, int]] = {}       # (resource, name) -> attrs bytes -> id
        self._cached = 0

    def name(self, metric_name: str, unit: str, instrument: str) -> str:
        key = (metric_name, unit, instrument)
        n = self._names.get(key)
        if n is None:
            n = self._names[key] = prometheus_name(metric_name, unit, instrument)
        return n

    def base_labels(self, resource) -> tuple[bytes, dict]:
        rkey = resource.SerializeToString()
        return rkey, self.base_for(rkey, resource)

    def base_for(self, rkey: bytes, resource=None) -> dict:
        """Base labels of a serialized Resource (parsed from rkey when not given; DecodeError
        when rkey is not a valid Resource)."""
        base = self._bases.get(rkey)
        if base is None:
            if resource is None:
                resource = Resource.FromString(rkey)
            base = {}
            for kv in resource.attributes:
                if kv.key == "service.name":
                    base["job"] = any_value(kv.value)
                elif kv.key == "service.instance.id":
                    base["instance"] = any_value(kv.value)
                elif "." not in kv.key:
                    base[label_name(kv.key)] = any_value(kv.value)
            if len(self._bases) > 100_000:
                self._bases.clear()
            self._bases[rkey] = base
        return base

    def translate(self, req: ExportMetricsServiceRequest, now_ms: int, out: "Resolved"):
        """Gauges and cumulative sums go straight to `out` (series ids); returns the rest as
        (rows, delta_points, refused, reasons)."""
        rows: list = []
        deltas: list = []
        refused = 0
        reasons: list[str] = []
        for rm in req.resource_metrics:
            rkey, base = self.base_labels(rm.resource)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    if kind == "gauge":
                        name = self.name(m.name, m.unit, "gauge")
                        self._fast_numbers(out, name, base, rkey, m.gauge, now_ms)
                    elif kind == "sum":
                        mono = m.sum.is_monotonic
                        name = self.name(m.name, m.unit, "counter" if mono else "updowncounter")
                        if m.sum.aggregation_temporality == DELTA:
                            self._deltas(deltas, name, base, m.sum.data_points, now_ms)
                        else:
                            self._fast_numbers(out, name, base, rkey, m.sum, now_ms)
                    elif kind == "histogram":
                        name = self.name(m.name, m.unit, "histogram")
                        if m.histogram.aggregation_temporality == DELTA:
                            refused += len(m.histogram.data_points)
                            _reason(reasons, f"{m.name}: delta histograms are not supported; "
                                             "export cumulative temporality")
                            continue
                        self._histogram(rows, name, base, m.histogram.data_points, now_ms)
                    elif kind == "summary":
                        name = self.name(m.name, m.unit, "summary")
                        self._summary(rows, name, base, m.summary.data_points, now_ms)
                    elif kind == "exponential_histogram":
                        refused += len(m.exponential_histogram.data_points)
                        _reason(reasons, f"{m.name}: exponential histograms are not supported; "
                                         "use explicit bucket boundaries")
                    else:
                        _reason(reasons, f"{m.name or '(unnamed)'}: metric has no data")
        return rows, deltas, refused, reasons

    def _fast_numbers(self, out: "Resolved", name: str, base: dict, rkey: bytes, container, now_ms: int) -> None:
        """Number data points of a Gauge or Sum, read from their wire bytes.

        Why bytes: building a labels dict per point from the protobuf objects costs ~20 us in
        Python, far too slow for fleet rates. A node sends the same series every interval, so a
        point's serialized attributes identify its series: after the first time, a point costs
        a dictionary lookup plus reading its fixed64 timestamp and value. Layout (opentelemetry
        metrics.proto): Gauge/Sum field 1 = NumberDataPoint (0x0a); in a point, fields 2, 3
        (start/time, fixed64: 0x11, 0x19), 4 (as_double: 0x21), 6 (as_int, sfixed64: 0x31),
        then 7 attributes (0x3a) and 8 flags. Anything else takes the general path."""
        cache = self._series.get((rkey, name))
        if cache is None:
            cache = self._series[(rkey, name)] = {}
        buf = container.SerializeToString()
        sids, tss, vals = out.sids, out.ts, out.values
        n = len(buf)
        i = 0
        while i < n:
            tag = buf[i]
            if tag != 0x0A:   # a Sum's temporality / monotonic flag, or a field we do not know
                i = _skip_field(buf, i)
                continue
            ln = buf[i + 1]
            i += 2
            if ln & 0x80:   # a point of 128..16383 bytes has a 2-byte length; longer ones are rare
                b2 = buf[i]
                if b2 & 0x80:
                    ln, i = _varint(buf, i - 1)
                else:
                    ln = (ln & 0x7F) | (b2 << 7)
                    i += 1
            start, i = i, i + ln
            # The layouts the agent and the OTel SDKs write, read at fixed offsets; else walk.
            if ln >= 27 and buf[start] == 0x11 and buf[start + 9] == 0x19 and buf[start + 18] == 0x21:
                ts = _U64(buf, start + 10)[0]
                value = _F64(buf, start + 19)[0]
                key = buf[start + 27:i]
            elif ln >= 18 and buf[start] == 0x19 and buf[start + 9] == 0x21:
                ts = _U64(buf, start + 1)[0]
                value = _F64(buf, start + 10)[0]
                key = buf[start + 18:i]
            else:
                j, ts, value, m = start, 0, 0.0, i
                while j < m:
                    t = buf[j]
                    if t == 0x19:
                        ts = _U64(buf, j + 1)[0]
                    elif t == 0x21:
                        value = _F64(buf, j + 1)[0]
                    elif t == 0x31:
                        value = float(_I64(buf, j + 1)[0])
                    elif t != 0x11:
                        break
                    j += 9
                key = buf[j:i]
            sid = cache.get(key)
            if sid is None:
                point = NumberDataPoint.FromString(buf[start:i])
                stale = bool(point.flags & FLAG_NO_RECORDED_VALUE)
                # the walk above stops at exemplars (field 5), which upb writes before as_int
                ts = point.time_unix_nano
                value = float(point.as_int) if point.WhichOneof("value") == "as_int" else point.as_double
                sid = self.writer.resolve(name, self._labels(base, point.attributes), out.result)
                if sid is None:
                    out.result.limited += 1
                    continue
                if sid == INVALID:
                    out.result.rejected += 1
                    continue
                if not stale and (not key or key[0] == 0x3A):
                    if self._cached > 2_000_000:   # bounded; label churn just refills it
                        self._series.clear()
                        cache = self._series[(rkey, name)] = {}
                        self._cached = 0
                    cache[key] = sid
                    self._cached += 1
                if stale:
                    value = None
            sids.append(sid)
            tss.append(ts // 1_000_000 if ts else now_ms)
            vals.append(value)

    @staticmethod
    def _labels(base: dict, attributes) -> dict:
        labels = dict(base)
        for kv in attributes:
            labels[label_name(kv.key)] = any_value(kv.value)
        return labels

    @staticmethod
    def _ts(dp, now_ms: int) -> int:
        return dp.time_unix_nano // 1_000_000 if dp.time_unix_nano else now_ms

    def _deltas(self, deltas, name, base, points, now_ms) -> None:
        """Collect delta points; their running totals are computed at commit time."""
        for dp in points:
            labels = self._labels(base, dp.attributes)
            if dp.flags & FLAG_NO_RECORDED_VALUE:
                inc = None
            else:
                inc = float(dp.as_int) if dp.WhichOneof("value") == "as_int" else dp.as_double
            deltas.append((name, labels, self._ts(dp, now_ms), inc))

    def _histogram(self, rows, name, base, points, now_ms) -> None:
        for dp in points:
            labels = self._labels(base, dp.attributes)
            ts = self._ts(dp, now_ms)
            stale = bool(dp.flags & FLAG_NO_RECORDED_VALUE)
            running = 0
            bounds = list(dp.explicit_bounds) + [math.inf]
            for bound, count in zip(bounds, dp.bucket_counts):
                running += count
                rows.append((name + "_bucket", {**labels, "le": format_le(bound)}, ts,
                             None if stale else float(running)))
            if not dp.bucket_counts:   # a point without buckets still has +Inf = count
                rows.append((name + "_bucket", {**labels, "le": "+Inf"}, ts, None if stale else float(dp.count)))
            if dp.HasField("sum"):
                rows.append((name + "_sum", labels, ts, None if stale else dp.sum))
            rows.append((name + "_count", labels, ts, None if stale else float(dp.count)))

    def _summary(self, rows, name, base, points, now_ms) -> None:
        for dp in points:
            labels = self._labels(base, dp.attributes)
            ts = self._ts(dp, now_ms)
            stale = bool(dp.flags & FLAG_NO_RECORDED_VALUE)
            for q in dp.quantile_values:
                rows.append((name, {**labels, "quantile": format_le(q.quantile)}, ts, None if stale else q.value))
            rows.append((name + "_sum", labels, ts, None if stale else dp.sum))
            rows.append((name + "_count", labels, ts, None if stale else float(dp.count)))


def _reason(reasons: list[str], text: str) -> None:
    if len(reasons) < 5 and text not in reasons:
        reasons.append(text)


def decode_request(body: bytes, content_type: str) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    try:
        if content_type == JSON:
            json_format.Parse(body.decode("utf-8"), req, ignore_unknown_fields=True)
        else:
            req.ParseFromString(body)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IngestError(400, f"cannot decode OTLP {content_type} body: {str(exc)[:300]}") from None
    return req


def media_type(content_type: bytes | None) -> str:
    ct = (content_type or PROTOBUF.encode()).decode("latin-1").split(";")[0].strip().lower()
    if ct in (PROTOBUF, "application/protobuf", "application/octet-stream"):
        return PROTOBUF
    if ct == JSON:
        return JSON
    raise IngestError(415, f"unsupported Content-Type {ct!r} (use {PROTOBUF} or {JSON})")


class OtlpReceiver:
    def __init__(self, ctx):
        self.ctx = ctx
        cfg = ctx.config.ingest
        self.gate = IngestGate(cfg.max_inflight, cfg.queue_timeout_s, cfg.retry_after_s)
        self.deltas = DeltaAccumulator()
        self.translator = Translator(self.deltas, ctx.writer)
        self.wire = LoadedInBackground("OTLP wire path", self._build_wire)

    def _build_wire(self):
        from collector.receive.wire import WirePath

        return WirePath(self.translator)

    def _resolve_rows(self, rows: list, out: Resolved) -> None:
        """Histogram/summary/delta rows (built by the translator, so well-typed) -> series ids."""
        resolve = self.ctx.writer.resolve
        for name, labels, ts, value in rows:
            sid = resolve(name, labels, out.result)
            if sid is None:
                out.result.limited += 1
            elif sid == INVALID:
                out.result.rejected += 1
            else:
                out.sids.append(sid)
                out.ts.append(ts)
                out.values.append(value)

    def ingest(self, raw: bytes, encoding: str | None, content_type: str) -> ExportMetricsServiceResponse:
        """Decompress, decode, translate and commit one request (runs in a worker thread)."""
        body = decode_content(raw, encoding, self.ctx.config.ingest.max_decompressed_bytes)
        writer = self.ctx.writer
        # The batch key: a retried request carries the same bytes (see collector.store.writer).
        key = batch_key(b"otlp", body)
        resp = ExportMetricsServiceResponse()
        now_ms = int(time.time() * 1000)
        wire = self.wire.get()
        if wire is not None and content_type == PROTOBUF:
            res = WriteResult()
            samples = wire.translate(body, now_ms, res)
            if samples is not None:
                sids, ts, values, stale = samples
                result = writer.write_resolved(sids, ts, values, key, res, nulls=stale)
                return self._answer(resp, result, 0, [])
        req = decode_request(body, content_type)
        out = Resolved(WriteResult())
        rows, delta_points, refused, reasons = self.translator.translate(req, now_ms, out)
        if not delta_points:
            self._resolve_rows(rows, out)
            result = writer.write_resolved(out.sids, out.ts, out.values, key, out.result)
        else:
            with self.deltas.lock:   # running totals must follow commit order
                updates = self.deltas.accumulate(delta_points, rows)
                self._resolve_rows(rows, out)
                result = writer.write_resolved(out.sids, out.ts, out.values, key, out.result)
                if result.accepted:
                    self.deltas.totals.update(updates)
        return self._answer(resp, result, refused, reasons)

    def _answer(self, resp, result: WriteResult, refused: int, reasons: list[str]):
        self.ctx.ingest_metrics.count("otlp", result)
        if refused:
            self.ctx.ingest_metrics.samples.labels("otlp", "rejected").inc(refused)
        refused += result.refused
        if refused:
            resp.partial_success.rejected_data_points = refused
            resp.partial_success.error_message = "; ".join(reasons + result.errors)[:2000]
        return resp


def _status_body(content_type: str, status: int, message: str) -> bytes:
    st = status_pb2.Status(code=_grpc_code(status), message=message)
    if content_type == JSON:
        return json_format.MessageToJson(st).encode()
    return st.SerializeToString()


def _grpc_code(status: int) -> int:
    return {400: 3, 401: 16, 413: 8, 415: 3, 429: 8, 503: 14}.get(status, 13)


def make_endpoint(ctx):
    """("/v1/metrics", handler) for collector.receive.common.IngestRoutes."""
    receiver = OtlpReceiver(ctx)
    ctx.extras["otlp"] = receiver
    metrics = ctx.ingest_metrics
    metrics.wire_path.labels("otlp").set_function(lambda: float(receiver.wire.value is not None))
    limits = ctx.config.ingest

    async def otlp_metrics(headers: dict[bytes, bytes], receive) -> Answer:
        ct = PROTOBUF
        try:
            ct = media_type(headers.get(b"content-type"))
            raw = await read_asgi_body(receive, headers.get(b"content-length"), limits.max_body_bytes)
            encoding = headers.get(b"content-encoding")
            resp = await receiver.gate.run(receiver.ingest, raw, encoding and encoding.decode("latin-1"), ct)
        except IngestError as exc:
            return Answer(exc.status, _status_body(ct, exc.status, exc.message), ct, metrics.refusal("otlp", exc))
        metrics.request("otlp", 200)
        if ct == JSON:
            return Answer(200, json_format.MessageToJson(resp).encode(), JSON)
        return Answer(200, resp.SerializeToString(), PROTOBUF)

    return "/v1/metrics", otlp_metrics
