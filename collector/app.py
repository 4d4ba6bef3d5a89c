"""The collector's FastAPI application: shared context, auth, and the routers of every area.

create_app(config) opens the store, builds the single Writer, an apscheduler BackgroundScheduler
(started with the app, stopped with it) and mounts:
    collector.receive.otlp         POST /v1/metrics            (this area)
    collector.receive.remote_write POST /api/v1/write          (this area)
    collector.sql                  POST /api/v1/sql            (this area)
    collector.promql.api           /api/v1/query, ...          (E)
    collector.rules.service        /api/v1/rules, /api/v1/alerts (F)
    collector.health.api           health verdicts             (G1)
    collector.remediate.api        remediation                 (G2)
Each module exposes make_router(ctx) -> fastapi.APIRouter, except the two ingest receivers,
whose make_endpoint(ctx) -> (path, handler) are served by plain-ASGI IngestRoutes ahead of
FastAPI's router (collector.receive.common says why). While the team builds in parallel a
missing module is logged and skipped.

Authentication: when a token is configured every endpoint except /-/healthy and /-/ready needs
`Authorization: Bearer <token>` (Grafana's Prometheus data source sends it as a custom header).
Self-metrics: other areas register theirs on ctx.registry; GET /metrics exposes it.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from fastapi import FastAPI, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent.catalog import catalog
from collector.config import Config
from collector.receive.common import IngestRoutes
from collector.store.core import Store
from collector.store.writer import Writer

log = logging.getLogger("shopfloor.collector")
disable_created_metrics()   # the *_created series only double what scrapers store

INGEST_MODULES = ("collector.receive.otlp", "collector.receive.remote_write")
ROUTER_MODULES = (
    "collector.sql",
    "collector.promql.api",
    "collector.rules.service",
    "collector.health.api",
    "collector.remediate.api",
)
OPEN_PATHS = ("/-/healthy", "/-/ready")


def _prom_base(otel_name: str) -> str:
    """Name prometheus_client wants for a catalog counter (it appends _total itself)."""
    name = catalog().prom(otel_name)
    return name[:-len("_total")] if name.endswith("_total") else name


class IngestMetrics:
    """The collector's own ingest figures, named by the catalog's collector entries."""

    def __init__(self, registry: CollectorRegistry, store: Store):
        cat = catalog()
        self.samples = Counter(_prom_base("shopfloor.collector.ingest.samples"),
                               cat["shopfloor.collector.ingest.samples"].help,
                               ["protocol", "outcome"], registry=registry)
        self.requests = Counter(_prom_base("shopfloor.collector.ingest.requests"),
                                cat["shopfloor.collector.ingest.requests"].help,
                                ["protocol", "code"], registry=registry)
        self.shed = Counter(_prom_base("shopfloor.collector.ingest.shed"),
                            cat["shopfloor.collector.ingest.shed"].help, ["protocol"], registry=registry)
        series = Gauge(cat.prom("shopfloor.collector.series"), cat["shopfloor.collector.series"].help,
                       registry=registry)
        series.set_function(store.series_count)
        self.wire_path = Gauge(cat.prom("shopfloor.collector.ingest.wire_path"),
                               cat["shopfloor.collector.ingest.wire_path"].help, ["protocol"], registry=registry)
        self._requests: dict[tuple[str, int], Any] = {}

    def request(self, protocol: str, status: int) -> None:
        child = self._requests.get((protocol, status))
        if child is None:   # labels() takes a lock and builds a key: done once per pair
            child = self._requests[(protocol, status)] = self.requests.labels(protocol, str(status))
        child.inc()

    def refusal(self, protocol: str, exc) -> dict[str, str]:
        """Count an ingest request answered with an IngestError; the answer's extra headers
        (Retry-After when it shed load)."""
        self.request(protocol, exc.status)
        if exc.retry_after is None:
            return {}
        self.shed.labels(protocol).inc()
        return {"Retry-After": str(exc.retry_after)}

    def count(self, protocol: str, result) -> None:
        for outcome in ("accepted", "duplicate", "limited", "rejected"):
            n = getattr(result, outcome)
            if n:
                self.samples.labels(protocol, outcome).inc(n)


@dataclass
class AppContext:
    config: Config
    store: Store
    writer: Writer
    scheduler: BackgroundScheduler
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    ingest_metrics: Any = None
    extras: dict = field(default_factory=dict)   # per-area state, keyed by area name


class AuthMiddleware:
    """Bearer-token check as plain ASGI middleware (cheap on the ingest hot path)."""

    def __init__(self, app, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(got, self.expected):
            return await self.app(scope, receive, send)
        body = b'{"status":"error","errorType":"unauthorized","error":"missing or wrong bearer token"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b'Bearer realm="shopfloor"'),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 for any request whose declared body exceeds the limit, before a handler reads it.
    (The ingest endpoints also count the bytes they actually read and the decompressed size.)"""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                body = f"request body larger than {self.limit} bytes\n".encode()
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"text/plain"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def make_context(config: Config) -> AppContext:
    store = Store(config.db, sandbox=True)
    writer = Writer(store, max_series_per_metric=config.ingest.max_series_per_metric,
                    max_series_total=config.ingest.max_series_total)
    ctx = AppContext(config=config, store=store, writer=writer,
                     scheduler=BackgroundScheduler(timezone="UTC"))
    ctx.ingest_metrics = IngestMetrics(ctx.registry, store)
    return ctx


def create_app(config: Config, ctx: AppContext | None = None) -> FastAPI:
    ctx = ctx or make_context(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.scheduler.start()
        try:
            yield
        finally:
            ctx.scheduler.shutdown(wait=True)
            with ctx.store.write_lock:
                with contextlib.suppress(Exception):
                    ctx.store.con.execute("CHECKPOINT")
                ctx.store.close()

    app = FastAPI(title="Shopfloor collector", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx

    @app.get("/-/healthy")
    def healthy() -> Response:
        return Response("Shopfloor collector is Healthy.\n", media_type="text/plain")

    @app.get("/-/ready")
    def ready() -> Response:
        return Response("Shopfloor collector is Ready.\n", media_type="text/plain")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)

    for module in ROUTER_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                log.warning("router %s not available yet (%s); skipped", module, exc)
                continue
            raise
        app.include_router(mod.make_router(ctx))

    from collector.store import maintenance   # rollups, compaction, retention, export
    maintenance.schedule(ctx)

    ingest_routes = dict(importlib.import_module(module).make_endpoint(ctx) for module in INGEST_MODULES)
    app.add_middleware(IngestRoutes, routes=ingest_routes)
    app.add_middleware(BodyLimitMiddleware, limit=config.ingest.max_body_bytes)
    if config.token:   # added last = runs first: no body is looked at before the token is checked
        app.add_middleware(AuthMiddleware, token=config.token)
    return app
