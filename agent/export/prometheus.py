"""Prometheus exposition of the agent's latest collection (/metrics and `agent scrape --once`).

prometheus_client does the text format (escaping, number formatting, HELP/TYPE lines); this
module only turns catalog points into its metric families. Names, types and help come from the
catalog; labels are the resource labels (cluster, node, rack, site labels) plus the point's
attributes, so a Prometheus scrape of /metrics yields the same series the collector stores from
OTLP. No timestamps are exposed (like node_exporter): Prometheus stamps the scrape time.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Mapping

from prometheus_client.core import CollectorRegistry, Metric
from prometheus_client.exposition import generate_latest

from agent.catalog import catalog, prometheus_label
from agent.sources.base import Point

log = logging.getLogger(__name__)

_DIGITS = re.compile(r"(\d+)")
# Classic names and labels only, so the 0.0.4 text format every Prometheus parses (newer
# prometheus_client versions default to announcing 1.0.0).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _natural(labels: Mapping[str, str]) -> tuple:
    """Identity and sort key of a series: puts chip 2 before chip 10 (stable, readable output)."""
    return tuple((k, tuple(int(t) if t.isdigit() else t for t in _DIGITS.split(v))) for k, v in labels.items())


# A node's series are the same from one collection to the next, so each series' label dict and
# sort key are computed once (the scrape then costs a dict lookup per point). Bounded: cleared
# when label churn outgrows it.
_SERIES_CACHE: dict[tuple, tuple[dict[str, str], tuple]] = {}
_SERIES_CACHE_MAX = 100_000


def _series(resource_key: tuple, attributes: Mapping[str, str]) -> tuple[dict[str, str], tuple]:
    key = (resource_key, tuple(attributes.items()))
    hit = _SERIES_CACHE.get(key)
    if hit is None:
        labels = {prometheus_label(k): str(v) for k, v in resource_key}
        for k, v in attributes.items():
            labels[prometheus_label(k)] = str(v)
        if len(_SERIES_CACHE) >= _SERIES_CACHE_MAX:
            _SERIES_CACHE.clear()
        hit = _SERIES_CACHE[key] = (labels, _natural(labels))
    return hit


def families(points: Iterable[Point], resource: Mapping[str, str]) -> list[Metric]:
    """Metric families for points, in catalog order, samples sorted naturally by label values.

    A later point with the same name and labels replaces an earlier one (a series appears once).
    """
    resource_key = tuple((k, str(v)) for k, v in resource.items())
    grouped: dict[str, dict[tuple, tuple[dict[str, str], float]]] = {}
    for p in points:
        labels, sort_key = _series(resource_key, p.attributes)
        grouped.setdefault(p.name, {})[sort_key] = (labels, p.value)
    out = []
    for m in catalog():
        series = grouped.get(m.name)
        if series is None:
            continue
        prom = m.prom_name
        # prometheus_client appends _total to a counter family's HELP/TYPE names itself.
        family = Metric(prom[:-len("_total")] if m.prom_type == "counter" else prom, m.help, m.prom_type)
        for sort_key in sorted(series):
            labels, value = series[sort_key]
            family.add_sample(prom, labels, value)
        out.append(family)
    return out


class LatestCollection:
    """A prometheus_client custom collector serving whatever the agent collected last."""

    def __init__(self, resource: Mapping[str, str]):
        self._resource = dict(resource)
        self._points: list[Point] = []
        self._lock = threading.Lock()
        self.generation = 0          # bumped by every update

    def update(self, points: list[Point]) -> None:
        with self._lock:
            self._points = list(points)
            self.generation += 1

    @property
    def points(self) -> list[Point]:
        """The last collection (a new list is set by each update, so this one stays as is)."""
        with self._lock:
            return self._points

    def collect(self):
        with self._lock:
            points = self._points
        return families(points, self._resource)


def render(points: Iterable[Point], resource: Mapping[str, str]) -> str:
    """Prometheus text exposition (format 0.0.4) of points."""
    registry = CollectorRegistry(auto_describe=False)
    latest = LatestCollection(resource)
    latest.update(list(points))
    registry.register(latest)
    return generate_latest(registry).decode("utf-8")


class MetricsServer:
    """GET /metrics on host:port. Reads no request body (nothing to limit but the request line
    and headers, which http.server caps at 64 KiB), times out idle connections, and requires
    `Authorization: Bearer <token>` when a token is configured."""

    def __init__(self, listen: str, collection: LatestCollection, token: str | None = None,
                 timeout: float = 10.0):
        host, _, port = listen.rpartition(":")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collection)
        registry, expected = self.registry, (f"Bearer {token}" if token else None)
        # The text is rendered once per collection: a second scraper (an HA Prometheus pair)
        # or a scrape interval shorter than the agent's gets the cached bytes.
        cache: dict[str, tuple[int, bytes]] = {}
        cache_lock = threading.Lock()

        def exposition() -> bytes:
            with cache_lock:
                generation = collection.generation
                hit = cache.get("text")
                if hit is None or hit[0] != generation:
                    hit = cache["text"] = (generation, generate_latest(registry))
                return hit[1]

        class Handler(BaseHTTPRequestHandler):
            def setup(self):
                self.timeout = timeout  # socket timeout for slow or idle clients
                super().setup()

            def log_message(self, fmt, *args):
                log.debug("metrics %s - " + fmt, self.client_address[0], *args)

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path not in ("/metrics", "/"):
                    return self._reply(404, b"not found: try /metrics\n", "text/plain")
                if expected and not hmac.compare_digest(self.headers.get("Authorization", ""), expected):
                    return self._reply(401, b"unauthorized\n", "text/plain", {"WWW-Authenticate": "Bearer"})
                if path == "/":
                    return self._reply(200, b'<a href="/metrics">metrics</a>\n', "text/html")
                self._reply(200, exposition(), CONTENT_TYPE)

            def _refuse(self):
                self._reply(405, b"only GET /metrics\n", "text/plain", {"Allow": "GET"})

            do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

            def _reply(self, status, body, ctype, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join(5)
