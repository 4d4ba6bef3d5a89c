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

import hashlib
import json
import logging
import math
import threading
import time

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from agent.catalog import prometheus_label, prometheus_name
from collector.receive.common import IngestError, IngestGate, decode_content, read_body

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

    def __init__(self, deltas: DeltaAccumulator):
        self.deltas = deltas
        self._names: dict[tuple, str] = {}

    def name(self, metric_name: str, unit: str, instrument: str) -> str:
        key = (metric_name, unit, instrument)
        n = self._names.get(key)
        if n is None:
            n = self._names[key] = prometheus_name(metric_name, unit, instrument)
        return n

    def translate(self, req: ExportMetricsServiceRequest, now_ms: int):
        """Returns (rows, delta_points, refused, reasons)."""
        rows: list = []
        deltas: list = []
        refused = 0
        reasons: list[str] = []
        for rm in req.resource_metrics:
            base: dict[str, str] = {}
            for kv in rm.resource.attributes:
                if kv.key == "service.name":
                    base["job"] = any_value(kv.value)
                elif kv.key == "service.instance.id":
                    base["instance"] = any_value(kv.value)
                elif "." not in kv.key:
                    base[label_name(kv.key)] = any_value(kv.value)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    if kind == "gauge":
                        name = self.name(m.name, m.unit, "gauge")
                        self._numbers(rows, name, base, m.gauge.data_points, now_ms)
                    elif kind == "sum":
                        mono = m.sum.is_monotonic
                        name = self.name(m.name, m.unit, "counter" if mono else "updowncounter")
                        if m.sum.aggregation_temporality == DELTA:
                            self._deltas(deltas, name, base, m.sum.data_points, now_ms)
                        else:
                            self._numbers(rows, name, base, m.sum.data_points, now_ms)
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

    @staticmethod
    def _labels(base: dict, attributes) -> dict:
        labels = dict(base)
        for kv in attributes:
            labels[label_name(kv.key)] = any_value(kv.value)
        return labels

    @staticmethod
    def _ts(dp, now_ms: int) -> int:
        return dp.time_unix_nano // 1_000_000 if dp.time_unix_nano else now_ms

    def _numbers(self, rows, name, base, points, now_ms) -> None:
        for dp in points:
            labels = self._labels(base, dp.attributes)
            if dp.flags & FLAG_NO_RECORDED_VALUE:
                value = None
            elif dp.WhichOneof("value") == "as_int":
                value = float(dp.as_int)
            else:
                value = dp.as_double
            rows.append((name, labels, self._ts(dp, now_ms), value))

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


def media_type(request: Request) -> str:
    ct = (request.headers.get("content-type") or PROTOBUF).split(";")[0].strip().lower()
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
        self.translator = Translator(self.deltas)

    def ingest(self, raw: bytes, encoding: str | None, content_type: str) -> ExportMetricsServiceResponse:
        """Decompress, decode, translate and commit one request (runs in a worker thread)."""
        body = decode_content(raw, encoding, self.ctx.config.ingest.max_decompressed_bytes)
        req = decode_request(body, content_type)
        writer = self.ctx.writer
        # The batch key: a retried request carries the same bytes (see collector.store.writer).
        key = hashlib.blake2b(body, digest_size=16, person=b"otlp").digest()
        resp = ExportMetricsServiceResponse()
        rows, delta_points, refused, reasons = self.translator.translate(req, int(time.time() * 1000))
        if not delta_points:
            result = writer.write(rows, batch_key=key)
        else:
            with self.deltas.lock:   # running totals must follow commit order
                updates = self.deltas.accumulate(delta_points, rows)
                result = writer.write(rows, batch_key=key)
                if result.accepted:
                    self.deltas.totals.update(updates)
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


def make_router(ctx) -> APIRouter:
    router = APIRouter()
    receiver = OtlpReceiver(ctx)
    ctx.extras["otlp"] = receiver
    metrics = ctx.ingest_metrics
    limits = ctx.config.ingest

    @router.post("/v1/metrics")
    async def otlp_metrics(request: Request) -> Response:
        ct = PROTOBUF
        try:
            ct = media_type(request)
            raw = await read_body(request, limits.max_body_bytes)
            async with receiver.gate.slot():
                resp = await run_in_threadpool(receiver.ingest, raw, request.headers.get("content-encoding"), ct)
        except IngestError as exc:
            metrics.requests.labels("otlp", str(exc.status)).inc()
            headers = {}
            if exc.retry_after is not None:
                headers["Retry-After"] = str(exc.retry_after)
                metrics.shed.labels("otlp").inc()
            return Response(_status_body(ct, exc.status, exc.message), status_code=exc.status,
                            media_type=ct, headers=headers)
        metrics.requests.labels("otlp", "200").inc()
        if ct == JSON:
            return Response(json_format.MessageToJson(resp), media_type=JSON)
        return Response(resp.SerializeToString(), media_type=PROTOBUF)

    return router
