"""OTLP/HTTP export: encode data points as an ExportMetricsServiceRequest and POST it.

Why the request is built from the opentelemetry-proto messages directly instead of through the
SDK's MeterProvider + OTLPMetricExporter:
  * timestamps must be explicit. The simulator runs in simulated time and the spool replays
    batches minutes later; the SDK's readers stamp wall-clock time at collection.
  * the spool must hold the exact bytes that will be sent (one file per batch, resent as is
    after an outage), so encoding and sending are two separate steps here.
  * the SDK exporter retries inside export() and only answers success/failure; the agent needs
    the status, whether it is retryable and the Retry-After value to decide between "send
    later from the spool" and "drop, the collector will never accept it".
What is reused from OpenTelemetry: the protobuf classes (opentelemetry-proto) and the OTLP/HTTP
exporter's conventions (retryable codes 429/502/503/504, Retry-After as seconds or HTTP date,
exponential backoff 2**n with 20 % jitter, gzip, one immediate retry of a stale pooled
connection) over the same `requests` session handling the exporter package uses.
"""

from __future__ import annotations

import gzip
import logging
import math
import random
import struct
import time
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Iterable, Mapping

import requests
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality,
    Gauge,
    Metric as MetricProto,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from agent.catalog import catalog
from agent.sources.base import Point

log = logging.getLogger(__name__)

SERVICE_NAME = "shopfloor-agent"
SCOPE_NAME = "shopfloor.agent"
CONTENT_TYPE = "application/x-protobuf"
# The status codes the OTLP/HTTP specification says a client retries.
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
MAX_RESPONSE_BYTES = 64 * 1024
_CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


def _scope_version() -> str:
    try:
        from importlib.metadata import version
        return version("shopfloor")
    except Exception:  # noqa: BLE001 - not installed as a distribution (running from a tree)
        return ""


def _kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


# ---------------------------------------------------------------- encoding
# Speed: building one NumberDataPoint message per point costs ~5 us in protobuf's Python API, so
# a 1000-point node spent 5-8 ms per collection encoding (the whole budget is 10 ms). The parts
# that do not change between collections are therefore serialized ONCE with the official
# messages and cached as bytes: the resource, each metric's header (name, description, unit),
# each Sum's temporality/monotonic flags, and each series' attributes. Per point only the
# fixed-width fields are packed (timestamps as fixed64, the value as double). Protobuf's wire
# format allows this: a message is the concatenation of its fields, nested messages are
# length-prefixed. Field numbers come from the descriptors, not from this file, and the tests
# decode the result with opentelemetry-proto.

def _field(message, name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[name].number


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_tag(number: int) -> bytes:
    return _varint(number << 3 | 2)      # wire type 2: length-delimited


def _fixed64_tag(number: int) -> int:
    return number << 3 | 1               # wire type 1: 64-bit (fixed64, double)


_RM_TAG = _len_tag(_field(ExportMetricsServiceRequest, "resource_metrics"))
_RESOURCE_TAG = _len_tag(_field(ResourceMetrics, "resource"))
_SM_TAG = _len_tag(_field(ResourceMetrics, "scope_metrics"))
_METRICS_TAG = _len_tag(_field(ScopeMetrics, "metrics"))
_GAUGE_TAG = _len_tag(_field(MetricProto, "gauge"))
_SUM_TAG = _len_tag(_field(MetricProto, "sum"))
_DP_TAG = _len_tag(_field(Gauge, "data_points"))
assert _field(Gauge, "data_points") == _field(Sum, "data_points")
_GAUGE_DP = struct.Struct("<BQBd").pack        # time_unix_nano, as_double
_SUM_DP = struct.Struct("<BQBQBd").pack        # start_time_unix_nano, time_unix_nano, as_double
_START_T = _fixed64_tag(_field(NumberDataPoint, "start_time_unix_nano"))
_TIME_T = _fixed64_tag(_field(NumberDataPoint, "time_unix_nano"))
_VALUE_T = _fixed64_tag(_field(NumberDataPoint, "as_double"))
assert max(_START_T, _TIME_T, _VALUE_T) < 0x80    # one-byte tags, as packed above


def _wrap(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


@lru_cache(maxsize=None)
def _metric_parts(otel_name: str) -> tuple[bytes, bool, bytes]:
    """(serialized Metric header, is_gauge, serialized Sum flags) of a catalog metric."""
    m = catalog()[otel_name]
    header = MetricProto(name=m.name, unit=m.unit, description=m.help).SerializeToString()
    if m.instrument == "gauge":
        return header, True, b""
    flags = Sum(aggregation_temporality=_CUMULATIVE, is_monotonic=m.instrument == "counter")
    return header, False, flags.SerializeToString()


# A node's series keep the same attributes from one collection to the next, and the fixed
# fields have a fixed size, so everything of a data point before its fixed fields (the tag, the
# length and the serialized attributes) is cached per series. Bounded: a cache that outgrows it
# (labels churning) is started afresh.
_GAUGE_FIXED = struct.calcsize("<BQBd")
_SUM_FIXED = struct.calcsize("<BQBQBd")
_PREFIX_CACHE: dict[tuple, bytes] = {}
_PREFIX_CACHE_MAX = 100_000


def _dp_prefix(attributes: Mapping[str, str], fixed_size: int) -> bytes:
    key = (fixed_size, *attributes.items())
    prefix = _PREFIX_CACHE.get(key)
    if prefix is None:
        if len(_PREFIX_CACHE) >= _PREFIX_CACHE_MAX:
            _PREFIX_CACHE.clear()
        attrs = NumberDataPoint(attributes=[_kv(k, v) for k, v in attributes.items()]).SerializeToString()
        prefix = _PREFIX_CACHE[key] = _DP_TAG + _varint(len(attrs) + fixed_size) + attrs
    return prefix


@lru_cache(maxsize=64)
def _resource_bytes(resource_key: tuple) -> tuple[bytes, bytes]:
    """(serialized Resource, serialized ScopeMetrics holding only the scope)."""
    res = Resource(attributes=[_kv(k, v) for k, v in resource_attributes(dict(resource_key))])
    scope = InstrumentationScope(name=SCOPE_NAME, version=_scope_version_cached())
    return res.SerializeToString(), ScopeMetrics(scope=scope).SerializeToString()


def resource_attributes(resource: Mapping[str, str]) -> list[tuple[str, str]]:
    """The resource attributes the agent sends: its labels plus the OTel service identity."""
    attrs = [(k, str(v)) for k, v in resource.items()]
    attrs.append(("service.name", SERVICE_NAME))
    attrs.append(("service.instance.id", str(resource.get("node", ""))))
    return attrs


def encode_request(points: Iterable[Point], resource: Mapping[str, str], start_time_ns: int,
                   default_time_ns: int) -> bytes:
    """Serialize points as one ExportMetricsServiceRequest (one resource, one scope).

    One Metric per catalog metric present, in first-seen order; gauges as Gauge, counters as a
    monotonic cumulative Sum, updowncounters as a non-monotonic cumulative Sum (both with
    start_time_unix_nano = start_time_ns). A point with time_ns == 0 is stamped default_time_ns.
    Raises KeyError for a name that is not in the catalog.
    """
    by_name: dict[str, list[Point]] = {}
    for p in points:
        group = by_name.get(p.name)
        if group is None:
            _metric_parts(p.name)  # fail on an unknown name before building anything
            group = by_name[p.name] = []
        group.append(p)

    metrics = []
    for name, group in by_name.items():
        header, is_gauge, sum_flags = _metric_parts(name)
        if is_gauge:
            dps = b"".join([_dp_prefix(p.attributes, _GAUGE_FIXED) + _GAUGE_DP(
                _TIME_T, p.time_ns or default_time_ns, _VALUE_T, p.value) for p in group])
            metrics.append(_wrap(_METRICS_TAG, header + _wrap(_GAUGE_TAG, dps)))
        else:
            dps = b"".join([_dp_prefix(p.attributes, _SUM_FIXED) + _SUM_DP(
                _START_T, start_time_ns, _TIME_T, p.time_ns or default_time_ns, _VALUE_T, p.value)
                for p in group])
            metrics.append(_wrap(_METRICS_TAG, header + _wrap(_SUM_TAG, sum_flags + dps)))
    resource_raw, scope_raw = _resource_bytes(tuple((k, str(v)) for k, v in resource.items()))
    scope_metrics = _wrap(_SM_TAG, scope_raw + b"".join(metrics))
    return _wrap(_RM_TAG, _wrap(_RESOURCE_TAG, resource_raw) + scope_metrics)


@lru_cache(maxsize=1)
def _scope_version_cached() -> str:
    return _scope_version()


@dataclass(frozen=True)
class SendResult:
    ok: bool
    retryable: bool
    status: int | None          # HTTP status, None when no answer came (connection error)
    retry_after: float | None   # seconds the server asked us to wait, if it said
    error: str = ""
    rejected_points: int = 0    # partial_success.rejected_data_points of a 200 answer


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: delay-seconds or an HTTP-date (RFC 9110 section 10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(when.timestamp() - time.time(), 0.0)


def backoff_seconds(attempt: int, cap: float = 60.0, jitter: float = 0.2) -> float:
    """Exponential backoff like the OTLP exporter's: 2**attempt seconds +-20 %, capped."""
    return min(cap, 2 ** attempt) * random.uniform(1 - jitter, 1 + jitter)


class OtlpSender:
    """POSTs serialized requests to an OTLP/HTTP metrics endpoint (one attempt per send()).

    send() makes one attempt (plus one immediate retry when a pooled connection turned out to
    be stale) and classifies the answer; the agent's spool does the waiting and resending, so a
    collector outage never blocks collection. send_with_retry() is the blocking loop for
    callers without a spool (the simulator).
    """

    def __init__(self, endpoint: str, headers: Mapping[str, str] | None = None,
                 timeout: float = 10.0, compression: str = "gzip") -> None:
        if compression not in ("gzip", "none"):
            raise ValueError(f"compression must be 'gzip' or 'none', not {compression!r}")
        self.endpoint = endpoint
        self.timeout = timeout
        self.compression = compression
        self._headers = {"Content-Type": CONTENT_TYPE, "User-Agent": f"{SERVICE_NAME}/{_scope_version_cached() or 'dev'}"}
        if compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        self._headers.update(headers or {})
        self._session = requests.Session()

    def close(self) -> None:
        self._session.close()

    def send(self, body: bytes) -> SendResult:
        data = gzip.compress(body, compresslevel=6, mtime=0) if self.compression == "gzip" else body
        try:
            try:
                resp = self._post(data)
            except requests.ConnectionError:
                # A keep-alive connection the server closed: retry once at once, as the OTLP
                # exporter does; a second failure means the collector is really unreachable.
                resp = self._post(data)
        except requests.RequestException as exc:
            return SendResult(False, True, None, None, f"{type(exc).__name__}: {exc}")
        status, headers, content = resp
        if 200 <= status < 300:
            return self._success(status, headers, content)
        retryable = status in RETRYABLE_STATUS
        retry_after = parse_retry_after(headers.get("Retry-After")) if retryable else None
        text = content[:500].decode("utf-8", "replace").strip()
        return SendResult(False, retryable, status, retry_after, f"HTTP {status}: {text}")

    def _post(self, data: bytes) -> tuple[int, Mapping[str, str], bytes]:
        # Streamed so that an endpoint answering with a huge body cannot make the agent read it:
        # at most MAX_RESPONSE_BYTES are read (an OTLP answer is a few bytes).
        with self._session.post(self.endpoint, data=data, headers=self._headers, timeout=self.timeout,
                                stream=True) as resp:
            content = resp.raw.read(MAX_RESPONSE_BYTES, decode_content=True) or b""
            return resp.status_code, resp.headers, content

    def _success(self, status: int, headers: Mapping[str, str], content: bytes) -> SendResult:
        rejected, message = 0, ""
        ctype = headers.get("Content-Type", "")
        try:
            if content and ctype.startswith(CONTENT_TYPE):
                answer = ExportMetricsServiceResponse.FromString(content)
                rejected = answer.partial_success.rejected_data_points
                message = answer.partial_success.error_message
            elif content and ctype.startswith("application/json"):
                import json
                doc = json.loads(content).get("partialSuccess") or {}
                rejected = int(doc.get("rejectedDataPoints", 0))
                message = doc.get("errorMessage", "")
        except Exception as exc:  # noqa: BLE001 - a malformed answer to an accepted batch
            log.warning("collector answered %s with an unreadable body: %s", status, exc)
        if rejected or message:
            # Partial success is still success: the rest is stored and resending would not help.
            log.warning("collector rejected %d data points: %s", rejected, message)
        return SendResult(True, False, status, None, message, rejected)

    def send_with_retry(self, body: bytes, max_attempts: int = 6, deadline_s: float | None = None) -> SendResult:
        """Send, retrying retryable failures with backoff (Retry-After wins) within deadline_s."""
        deadline = time.monotonic() + (deadline_s if deadline_s is not None else 6 * self.timeout)
        result = self.send(body)
        for attempt in range(1, max_attempts):
            if result.ok or not result.retryable:
                return result
            wait = result.retry_after if result.retry_after is not None else backoff_seconds(attempt - 1)
            if time.monotonic() + wait > deadline:
                return result
            time.sleep(wait)
            result = self.send(body)
        return result
