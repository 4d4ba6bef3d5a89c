"""The Prometheus HTTP API (the query part) over the collector's store.

Endpoints, answers and errors follow https://prometheus.io/docs/prometheus/latest/querying/api/
so Grafana's built-in Prometheus data source and other Prometheus tools work unchanged:

    GET|POST /api/v1/query, /api/v1/query_range   (POST form-encoded too)
    GET|POST /api/v1/series, /api/v1/labels, GET /api/v1/label/<name>/values
    GET /api/v1/metadata         (from agent/catalog.yaml: type, help, unit)
    GET /api/v1/status/buildinfo (a Prometheus-like version so Grafana enables its features)
    GET|POST /api/v1/query_exemplars (always empty: the collector keeps no exemplars)

Errors: 400 bad_data (bad parameter or query), 422 execution, 503 timeout, each in Prometheus'
envelope. Limits (collector config, section `query`): timeout_s, max_samples,
max_points_per_series, lookback_delta_s, plus max_request_bytes for the query/body size.
"""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime
from urllib.parse import parse_qs

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from agent.catalog import catalog, prometheus_unit
from collector.store.core import Matcher

from .engine import Engine, Limits, Result, parse, selector_matchers
from .values import NAME, PromQLError, duration_seconds, format_value

# Grafana reads this to decide which Prometheus features to use; 2.53 is a widely deployed LTS.
log = logging.getLogger(__name__)

BUILD_INFO = {"version": "2.53.0", "revision": "shopfloor", "branch": "main", "buildUser": "shopfloor",
              "buildDate": "20240618-00:00:00", "goVersion": "n/a"}
STATUS = {"bad_data": 400, "execution": 422, "timeout": 503, "internal": 500, "not_found": 404}
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
MIN_TIME = -9223372036854775.808 / 1000
MAX_TIME = 9223372036854775.807 / 1000


def _json(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status_code=status,
                    media_type="application/json")


def error(kind: str, message: str) -> Response:
    return _json({"status": "error", "errorType": kind, "error": message}, STATUS.get(kind, 500))


def success(data, warnings: list[str] | None = None, infos: list[str] | None = None, *,
            data_json: bytes | None = None) -> Response:
    """Prometheus' success envelope; `data_json` is already-encoded data (query answers)."""
    extra = b""
    if warnings:
        extra += b',"warnings":' + orjson.dumps(list(dict.fromkeys(warnings)))
    if infos:
        extra += b',"infos":' + orjson.dumps(list(dict.fromkeys(infos)))
    if data_json is None:
        data_json = orjson.dumps(data)
    return Response(b'{"status":"success","data":' + data_json + extra + b"}", media_type="application/json")


def parse_time(value: str | None, name: str, default: float | None = None) -> float:
    """Unix seconds (float) or RFC 3339, as Prometheus accepts them."""
    if value is None or value == "":
        if default is None:
            raise PromQLError(f'invalid parameter "{name}": missing', "bad_data")
        return default
    try:
        t = float(value)
        if math.isnan(t) or math.isinf(t):
            raise ValueError
        return t
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise PromQLError(f'invalid parameter "{name}": cannot parse "{value}" to a valid timestamp',
                          "bad_data") from None


def parse_duration_s(value: str, name: str) -> float:
    try:
        d = float(value)
        if math.isnan(d) or math.isinf(d):
            raise ValueError
        return d
    except ValueError:
        pass
    try:
        return duration_seconds(value)
    except ValueError:
        raise PromQLError(f'invalid parameter "{name}": cannot parse "{value}" to a valid duration',
                          "bad_data") from None


def _sample(t_s: float, v: float) -> list:
    return [t_s, format_value(v)]


def result_json(res: Result) -> bytes:
    """The `data` member of a query answer, as JSON text."""
    if res.type == "scalar":
        return orjson.dumps({"resultType": "scalar", "result": _sample(res.time_s, res.value)})
    if res.type == "string":
        return orjson.dumps({"resultType": "string", "result": [res.time_s, res.value]})
    if res.type == "vector":
        return orjson.dumps({"resultType": "vector",
                             "result": [{"metric": lb, "value": _sample(res.time_s, v)} for lb, v in res.value]})
    return b'{"resultType":"matrix","result":[' + matrix_json(res.value) + b"]}"


def matrix_json(series: list[tuple[dict, np.ndarray, np.ndarray]]) -> bytes:
    """{"metric":{..},"values":[[t,"v"],...]},... for (labels, ts_ms, values) series.

    A dashboard answer has ~10^5 points, so no Python code runs per point: every timestamp and
    value is spelled by one orjson call per kind, and the points are assembled from those pieces
    by bytes joins and list slicing (C loops).
    """
    if not series:
        return b""
    # '[t,"' pieces, then 'v"],' pieces: interleaved, a series' points are one join (less the
    # last comma).
    t_pieces = (b"[" + _spelled(np.concatenate([ts for _, ts, _ in series]) / 1000)
                .replace(b",", b',"\n[')).split(b"\n")[:-1]
    v_pieces = _spelled(np.concatenate([vs for _, _, vs in series])).replace(b",", b'"],\n').split(b"\n")[:-1]
    out = []
    a = 0
    for labels, ts, _ in series:
        b = a + len(ts)
        points = [b""] * (2 * (b - a))
        points[0::2] = t_pieces[a:b]
        points[1::2] = v_pieces[a:b]
        out.append(b'{"metric":' + orjson.dumps(labels) + b',"values":[' + b"".join(points)[:-1] + b"]}")
        a = b
    return b",".join(out)


def _spelled(numbers: np.ndarray) -> bytes:
    """"n1,n2,...,nk," in Prometheus' spelling of floats (Go's strconv 'f', -1: shortest
    round-trip digits, never an exponent, no trailing ".0"; NaN, +Inf, -Inf).

    orjson writes the shortest round-trip digits in C; its spellings that differ from Go's are
    fixed on the text: ".0" endings for all, and per number (rare) exponents and non-finite
    values, which orjson writes as null.
    """
    if len(numbers) == 0:
        return b""
    numbers = np.ascontiguousarray(numbers, dtype=np.float64)
    text = orjson.dumps(numbers, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1] + b","
    if b"e" in text or b"null" in text:
        parts = text.split(b",")[:-1]
        for i in np.flatnonzero(~np.isfinite(numbers)):
            parts[i] = format_value(float(numbers[i])).encode()
        if b"e" in text:
            parts = [format_value(float(p)).encode() if b"e" in p else p for p in parts]
        text = b",".join(parts) + b","
    return text.replace(b".0,", b",")


class QueryAPI:
    def __init__(self, ctx):
        self.ctx = ctx
        section = getattr(getattr(ctx, "config", None), "query", None) or {}
        section = dict(section)
        self.max_request_bytes = int(section.pop("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES))
        self.limits = Limits.from_config(section)
        self.engine = Engine(ctx.store, self.limits)

    async def params(self, request: Request) -> dict[str, list[str]]:
        """Query-string and form-encoded body parameters (Prometheus accepts both)."""
        if len(request.url.query) > self.max_request_bytes:
            raise PromQLError(f"request exceeds {self.max_request_bytes} bytes", "bad_data")
        params = parse_qs(request.url.query, keep_blank_values=True)
        if request.method == "POST":
            declared = request.headers.get("content-length")
            if declared and int(declared) > self.max_request_bytes:
                raise PromQLError(f"request body exceeds {self.max_request_bytes} bytes", "bad_data")
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.max_request_bytes:
                    raise PromQLError(f"request body exceeds {self.max_request_bytes} bytes", "bad_data")
            ctype = request.headers.get("content-type", "")
            if body and "application/x-www-form-urlencoded" in ctype:
                for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items():
                    params.setdefault(k, []).extend(v)
        return params

    def engine_for(self, params) -> Engine:
        """The engine, with the timeout lowered when the request asks for less."""
        timeout = params.get("timeout", [None])[0]
        if not timeout:
            return self.engine
        t = parse_duration_s(timeout, "timeout")
        if t <= 0 or t >= self.limits.timeout_s:
            return self.engine
        lim = Limits(**{**self.limits.__dict__, "timeout_s": t})
        engine = Engine(self.ctx.store, lim)
        engine.series_cache, engine.cache_lock = self.engine.series_cache, self.engine.cache_lock
        return engine

    def query(self, params) -> Response:
        q = _one(params, "query")
        t = parse_time(_first(params, "time"), "time", time.time())
        res = _truncate(self.engine_for(params).instant(q, t), _limit(params))
        return success(None, res.warnings, res.infos, data_json=result_json(res))

    def query_range(self, params) -> Response:
        q = _one(params, "query")
        start = parse_time(_first(params, "start"), "start")
        end = parse_time(_first(params, "end"), "end")
        step_s = parse_duration_s(_one(params, "step"), "step")
        if end < start:
            raise PromQLError('invalid parameter "end": end timestamp must not be before start time', "bad_data")
        if step_s <= 0:
            raise PromQLError('invalid parameter "step": zero or negative query resolution step widths are '
                              'not accepted. Try a positive integer', "bad_data")
        res = _truncate(self.engine_for(params).range(q, start, end, step_s), _limit(params))
        return success(None, res.warnings, res.infos, data_json=result_json(res))

    # ------------------------------------------------------------------ metadata endpoints
    def _matched_series(self, params) -> list[dict[str, str]]:
        """Label sets of series selected by match[] (all if none), with samples in [start, end]."""
        store = self.ctx.store
        cur = store.cursor()
        start = parse_time(_first(params, "start"), "start", MIN_TIME)
        end = parse_time(_first(params, "end"), "end", MAX_TIME)
        selectors = params.get("match[]", [])
        groups: list[list[Matcher]] = []
        for sel in selectors:
            ast, _ = parse(sel)
            if type(ast).__name__ != "VectorSelector":
                raise PromQLError(f'invalid parameter "match[]": {sel!r} is not a series selector', "bad_data")
            groups.extend(selector_matchers(ast))
        if not groups:
            groups = [[]]
        found: dict[int, dict[str, str]] = {}
        for g in groups:
            for sid, metric, labels in store.select_series(g, cur):
                found[sid] = {NAME: metric, **labels}
        if found and (start > MIN_TIME or end < MAX_TIME):
            ids = list(found)
            lo = max(int(start * 1000), -(2 ** 62))
            hi = min(int(end * 1000), 2 ** 62)
            rows = cur.execute(
                "SELECT DISTINCT series_id FROM samples WHERE series_id IN (SELECT unnest(?::INTEGER[])) "
                "AND ts BETWEEN ? AND ?", [ids, lo, hi]).fetchall()
            keep = {int(r[0]) for r in rows}
            found = {k: v for k, v in found.items() if k in keep}
        return [found[k] for k in sorted(found)]

    def series(self, params) -> Response:
        if not params.get("match[]"):
            raise PromQLError("no match[] parameter provided", "bad_data")
        out = self._matched_series(params)
        limit = _limit(params)
        return success(out[:limit] if limit else out)

    def labels(self, params) -> Response:
        names = sorted({k for lb in self._matched_series(params) for k in lb})
        limit = _limit(params)
        return success(names[:limit] if limit else names)

    def label_values(self, name: str, params) -> Response:
        values = sorted({lb[name] for lb in self._matched_series(params) if lb.get(name)})
        limit = _limit(params)
        return success(values[:limit] if limit else values)


def metadata_json(metric: str | None = None, limit: int | None = None) -> dict:
    out: dict[str, list[dict]] = {}
    for m in catalog():
        if metric and m.prom_name != metric:
            continue
        out[m.prom_name] = [{"type": m.prom_type, "help": m.help,
                            "unit": prometheus_unit(m.unit, m.instrument)}]
        if limit and len(out) >= limit:
            break
    return out


def _truncate(res: Result, limit: int | None) -> Result:
    """Prometheus 3's `limit` query parameter: at most that many series, with a warning."""
    if limit and res.type in ("vector", "matrix") and len(res.value) > limit:
        res.value = res.value[:limit]
        res.warnings.append("results truncated due to limit")
    return res


def _first(params, name: str) -> str | None:
    vals = params.get(name)
    return vals[0] if vals else None


def _one(params, name: str) -> str:
    v = _first(params, name)
    if v is None or v == "":
        raise PromQLError(f'invalid parameter "{name}": missing', "bad_data")
    return v


def _limit(params) -> int | None:
    v = _first(params, "limit")
    if v in (None, ""):
        return None
    try:
        n = int(v)
    except ValueError:
        raise PromQLError('invalid parameter "limit": not a number', "bad_data") from None
    return n if n > 0 else None


def make_router(ctx) -> APIRouter:
    """The /api/v1 query endpoints over ctx.store, limited by ctx.config.query."""
    api = QueryAPI(ctx)
    router = APIRouter()

    async def run(request: Request, fn, *args) -> Response:
        try:
            params = await api.params(request)
            return await run_in_threadpool(fn, *args, params)
        except PromQLError as exc:
            return error(exc.kind, str(exc))
        except (ValueError, OverflowError) as exc:
            return error("bad_data", str(exc))
        except MemoryError:
            return error("execution", "query needs more memory than is available")
        except Exception as exc:  # noqa: BLE001 - an engine bug must still answer in the envelope
            log.exception("query failed: %s", request.url)
            return error("internal", f"{type(exc).__name__}: {exc}")

    @router.api_route("/api/v1/query", methods=["GET", "POST"])
    async def query(request: Request):
        return await run(request, api.query)

    @router.api_route("/api/v1/query_range", methods=["GET", "POST"])
    async def query_range(request: Request):
        return await run(request, api.query_range)

    @router.api_route("/api/v1/series", methods=["GET", "POST"])
    async def series(request: Request):
        return await run(request, api.series)

    @router.api_route("/api/v1/labels", methods=["GET", "POST"])
    async def labels(request: Request):
        return await run(request, api.labels)

    @router.get("/api/v1/label/{name}/values")
    async def label_values(name: str, request: Request):
        return await run(request, api.label_values, name)

    @router.api_route("/api/v1/query_exemplars", methods=["GET", "POST"])
    async def exemplars(request: Request):
        return success([])

    @router.get("/api/v1/metadata")
    async def metadata(request: Request):
        try:
            params = await api.params(request)
            return success(metadata_json(_first(params, "metric"), _limit(params)))
        except PromQLError as exc:
            return error(exc.kind, str(exc))

    @router.get("/api/v1/status/buildinfo")
    async def buildinfo():
        return success(BUILD_INFO)

    return router
