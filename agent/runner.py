"""The agent loop: collect every source each interval, add self-metrics, push OTLP, serve /metrics.

Each interval, every enabled source that says it is supported is collected in turn and timed. A
source that raises is recorded (shopfloor.agent.scrape.success = 0, logged) and never stops the
others; an unsupported one only reports shopfloor.agent.source.supported = 0, which is not an
error. The points plus the agent's self-metrics are encoded once (agent.export.otlp) and handed
to the shipper, which sends them or spools them through an outage (agent.export.spool); the same
points become /metrics (agent.export.prometheus). Event sources (XID) push through the same
shipper the moment an event arrives, so events and scrapes share one ordered path.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from agent.config import AgentConfig
from agent.export.otlp import OtlpSender, encode_request
from agent.export.prometheus import LatestCollection, MetricsServer
from agent.export.spool import Shipper, Spool
from agent.sources import build_sources
from agent.sources.base import Point, Source, point

log = logging.getLogger(__name__)


@dataclass
class SourceStatus:
    supported: bool = False
    reason: str = ""
    success: bool = False
    duration_s: float = 0.0
    error: str = ""
    points: int = 0


def close_sources(sources: list[Source]) -> None:
    """Stop event threads and child processes (neuron-monitor) of sources that have them."""
    for src in sources:
        for method in ("stop_events", "close"):
            fn = getattr(src, method, None)
            if fn is None:
                continue
            try:
                fn()
            except Exception:  # noqa: BLE001 - shutting down: log and go on with the rest
                log.exception("source %s: %s failed", src.name, method)


def collect_sources(sources: list[Source], status: dict[str, SourceStatus] | None = None) -> tuple[list[Point], list[Point]]:
    """Collect every source once: (data points, self-metric points). Never raises."""
    data: list[Point] = []
    selfm: list[Point] = []
    for src in sources:
        st = status.setdefault(src.name, SourceStatus()) if status is not None else SourceStatus()
        try:
            st.supported, st.reason = src.supported()
        except Exception as exc:  # noqa: BLE001 - a broken probe counts as a failed scrape
            st.supported, st.reason = True, ""
            st.success, st.error, st.duration_s = False, f"supported() failed: {exc!r}", 0.0
            log.warning("source %s: %s", src.name, st.error)
            selfm += [point("shopfloor.agent.source.supported", 1, source=src.name),
                      point("shopfloor.agent.scrape.success", 0, source=src.name),
                      point("shopfloor.agent.scrape.duration", 0.0, source=src.name)]
            continue
        selfm.append(point("shopfloor.agent.source.supported", 1 if st.supported else 0, source=src.name))
        if not st.supported:
            continue
        t0 = time.perf_counter()
        try:
            got = src.collect()
            st.success, st.error = True, ""
            st.points = len(got)
            data.extend(got)
        except Exception as exc:  # noqa: BLE001 - one source failing must not stop the others
            st.success, st.error, st.points = False, f"{type(exc).__name__}: {exc}", 0
            log.warning("source %s failed: %s", src.name, st.error)
        st.duration_s = time.perf_counter() - t0
        selfm += [point("shopfloor.agent.scrape.success", 1 if st.success else 0, source=src.name),
                  point("shopfloor.agent.scrape.duration", st.duration_s, source=src.name)]
    return data, selfm


class Agent:
    """The running agent. Sources and the sender can be injected (tests, the benchmark)."""

    def __init__(self, config: AgentConfig, sources: list[Source] | None = None,
                 sender: OtlpSender | None = None):
        self.config = config
        self.resource = config.resource
        self.sources = build_sources(config) if sources is None else sources
        self.status: dict[str, SourceStatus] = {}
        self.start_time_ns = time.time_ns()
        self.latest = LatestCollection(self.resource)
        self.collections = 0
        self.last_time_ns = 0        # the default timestamp of the last collection's batch
        self._stop = threading.Event()
        self.shipper: Shipper | None = None
        if config.collector_endpoint:
            headers = {"Authorization": f"Bearer {config.collector_token}"} if config.collector_token else {}
            self.sender = sender or OtlpSender(config.collector_endpoint, headers=headers,
                                               timeout=config.export_timeout, compression=config.compression)
            spool = Spool(config.spool_dir, config.spool_max_bytes)
            # Retry at least once per interval while the collector is away, and never slower than 30 s.
            self.shipper = Shipper(self.sender.send, spool, max_backoff=min(30.0, max(1.0, config.interval)))
        self.server = MetricsServer(config.listen, self.latest, config.metrics_token) if config.listen else None

    # ---------------------------------------------------------------- one collection
    def export_metrics(self) -> list[Point]:
        if self.shipper is None:
            return []
        sp = self.shipper.spool
        pts = [point("shopfloor.agent.export.requests", n, outcome=o) for o, n in self.shipper.counts.items()]
        pts += [point("shopfloor.agent.spool.usage", sp.bytes),
                point("shopfloor.agent.spool.batches", len(sp)),
                point("shopfloor.agent.spool.dropped", sp.dropped)]
        return pts

    def collect_once(self) -> list[Point]:
        """Collect, publish to /metrics and hand the batch to the shipper. Returns the points."""
        now_ns = time.time_ns()
        data, selfm = collect_sources(self.sources, self.status)
        points = data + selfm + self.export_metrics()
        self.latest.update(points)
        if self.shipper is not None:
            self.shipper.submit(encode_request(points, self.resource, self.start_time_ns, now_ns))
        self.collections += 1
        self.last_time_ns = now_ns
        return points

    def on_event(self, points: list[Point]) -> None:
        """EventSink for event sources: push at once through the same ordered path."""
        if self.shipper is not None and points:
            self.shipper.submit(encode_request(points, self.resource, self.start_time_ns, time.time_ns()))

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self.shipper is not None:
            self.shipper.start()
        if self.server is not None:
            self.server.start()
            log.info("serving /metrics on %s", self.config.listen)
        for src in self.sources:
            if hasattr(src, "start_events"):
                try:
                    if src.supported()[0]:
                        src.start_events(self.on_event)
                except Exception:  # noqa: BLE001
                    log.exception("source %s: cannot start events; its events arrive with scrapes", src.name)

    def run(self, max_collections: int | None = None) -> None:
        """Collect every interval (drift-free) until stop() or max_collections."""
        interval = self.config.interval
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.collect_once()
            except Exception:  # noqa: BLE001 - e.g. an encoding bug: log, keep the loop alive
                log.exception("collection failed")
            if max_collections is not None and self.collections >= max_collections:
                break
            next_at += interval
            now = time.monotonic()
            if next_at < now:  # fell behind (a slow source): skip the missed ticks
                next_at = now + interval - ((now - next_at) % interval)
            self._stop.wait(next_at - now)

    def request_stop(self) -> None:
        """Make run() return after the current collection (safe from a signal handler)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        close_sources(self.sources)
        if self.shipper is not None:
            self.shipper.stop(timeout=self.config.export_timeout + 1)
        if self.server is not None:
            self.server.stop()
