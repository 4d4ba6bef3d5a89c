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
    Metric as MetricProto,
    NumberDataPoint,
)

from agent.catalog import catalog
from agent.sources.base import Point

log = logging.getLogger(__name__)

SERVICE_NAME = "shopfloor-agent"
SCOPE_NAME = "shopfloor.agent"
CONTENT_TYPE = "application/x-protobuf"
# The status codes the OTLP/HTTP specification says a client retries.
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
_CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


def _scope_version() -> str:
    try:
        from importlib.metadata import version
        return version("shopfloor")
    except Exception:  # noqa: BLE001 - not installed as a distribution (running from a tree)
        return ""


@lru_cache(maxsize=None)
def _metric_shape(otel_name: str) -> tuple[str, str, str, bool]:
    """(kind, unit, description, is_monotonic) for a catalog metric, looked up once per name."""
    m = catalog()[otel_name]
    kind = "gauge" if m.instrument == "gauge" else "sum"
    return kind, m.unit, m.help, m.instrument == "counter"


def _kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


# A node's series keep the same attributes from one collection to the next, so the KeyValue
# messages for an attribute set are built once and reused (2-3x faster encoding). Bounded: a
# cache that outgrows it (labels churning) is simply started afresh.
_ATTR_CACHE: dict[tuple, list[KeyValue]] = {}
_ATTR_CACHE_MAX = 100_000


def _attributes(attributes: Mapping[str, str]) -> list[KeyValue]:
    key = tuple(attributes.items())
    kvs = _ATTR_CACHE.get(key)
    if kvs is None:
        if len(_ATTR_CACHE) >= _ATTR_CACHE_MAX:
            _ATTR_CACHE.clear()
        kvs = _ATTR_CACHE[key] = [_kv(k, v) for k, v in key]
    return kvs


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
    request = ExportMetricsServiceRequest()
    rm = request.resource_metrics.add()
    rm.resource.attributes.extend(_kv(k, v) for k, v in resource_attributes(resource))
    sm = rm.scope_metrics.add()
    sm.scope.CopyFrom(InstrumentationScope(name=SCOPE_NAME, version=_scope_version_cached()))

    by_name: dict[str, list[Point]] = {}
    for p in points:
        group = by_name.get(p.name)
        if group is None:
            _metric_shape(p.name)  # fail on an unknown name before building anything
            group = by_name[p.name] = []
        group.append(p)

    metrics = []
    for name, group in by_name.items():
        kind, unit, description, monotonic = _metric_shape(name)
        if kind == "gauge":
            dps = [NumberDataPoint(
                attributes=_attributes(p.attributes),
                time_unix_nano=p.time_ns or default_time_ns,
                as_double=p.value) for p in group]
            metric = MetricProto(name=name, unit=unit, description=description)
            metric.gauge.data_points.extend(dps)
        else:
            dps = [NumberDataPoint(
                attributes=_attributes(p.attributes),
                start_time_unix_nano=start_time_ns,
                time_unix_nano=p.time_ns or default_time_ns,
                as_double=p.value) for p in group]
            metric = MetricProto(name=name, unit=unit, description=description)
            metric.sum.aggregation_temporality = _CUMULATIVE
            metric.sum.is_monotonic = monotonic
            metric.sum.data_points.extend(dps)
        metrics.append(metric)
    sm.metrics.extend(metrics)
    return request.SerializeToString()


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
                resp = self._session.post(self.endpoint, data=data, headers=self._headers, timeout=self.timeout)
            except requests.ConnectionError:
                # A keep-alive connection the server closed: retry once at once, as the OTLP
                # exporter does; a second failure means the collector is really unreachable.
                resp = self._session.post(self.endpoint, data=data, headers=self._headers, timeout=self.timeout)
        except requests.RequestException as exc:
            return SendResult(False, True, None, None, f"{type(exc).__name__}: {exc}")
        status = resp.status_code
        if 200 <= status < 300:
            return self._success(resp)
        retryable = status in RETRYABLE_STATUS
        retry_after = parse_retry_after(resp.headers.get("Retry-After")) if retryable else None
        text = resp.text[:500].strip()
        return SendResult(False, retryable, status, retry_after, f"HTTP {status}: {text}")

    def _success(self, resp: requests.Response) -> SendResult:
        rejected, message = 0, ""
        if resp.content and resp.headers.get("Content-Type", "").startswith(CONTENT_TYPE):
            try:
                answer = ExportMetricsServiceResponse.FromString(resp.content)
                rejected = answer.partial_success.rejected_data_points
                message = answer.partial_success.error_message
            except Exception as exc:  # noqa: BLE001 - a malformed answer to an accepted batch
                log.warning("collector answered %s with an unreadable body: %s", resp.status_code, exc)
        elif resp.content and resp.headers.get("Content-Type", "").startswith("application/json"):
            try:
                doc = resp.json().get("partialSuccess") or {}
                rejected = int(doc.get("rejectedDataPoints", 0))
                message = doc.get("errorMessage", "")
            except Exception:  # noqa: BLE001
                pass
        if rejected or message:
            # Partial success is still success: the rest is stored and resending would not help.
            log.warning("collector rejected %d data points: %s", rejected, message)
        return SendResult(True, False, resp.status_code, None, message, rejected)

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
