"""HTTP API of remediation (mounted by collector.app; the collector's bearer token covers it).

    GET  /api/v1/cordons                              chips Shopfloor holds (or would, in dry-run)
    GET  /api/v1/remediation/audit?limit=&cluster=&node=&since=
                                                     decisions, newest first
    POST /api/v1/cordons/{cluster}/{node}/{chip}/healthy   {"by": "alice"}
                                                     an operator marks the chip healthy: resumed
                                                     now if Shopfloor held it; always audited
    POST /api/v1/cordons/{cluster}/{node}/{chip}/confirm   {"by": "alice", "mode": "hbm_uncorrectable",
                                                           "at": <epoch s, default now>, "note": ".."}
                                                     an operator confirms a real failure (training label)

Answers use the Prometheus API's envelope: {"status": "success", "data": ...} or
{"status": "error", "errorType": ..., "error": ...}.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from collector.remediate.audit import Audit
from collector.remediate.base import validate_chip, validate_node

MAX_BODY = 4096
FAILURE_MODES = ("off_bus", "hbm_uncorrectable", "sram_ecc", "gsp", "thermal", "nic", "other")


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def cordon_json(c) -> dict[str, Any]:
    d = c.as_dict()
    d["since"], d["healthy_since"] = iso(c.since), iso(c.healthy_since)
    return d


def decision_json(d) -> dict[str, Any]:
    out = d.as_dict()
    out["ts"] = iso(d.ts)
    return out


def _error(code: int, kind: str, msg: str) -> JSONResponse:
    return JSONResponse({"status": "error", "errorType": kind, "error": msg}, status_code=code)


class TooLarge(Exception):
    pass


async def _body(request: Request) -> dict[str, Any]:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise TooLarge()
    doc = json.loads(raw or b"{}")
    if not isinstance(doc, dict):
        raise TypeError("body must be a JSON object")
    return doc


def _target(cluster: str, node: str, chip: str) -> None:
    validate_node(node)
    validate_chip(chip)
    if not cluster or len(cluster) > 253:
        raise ValueError(f"invalid cluster {cluster!r}")


def make_router(ctx) -> APIRouter:
    from collector.remediate.service import remediator_for

    router = APIRouter()
    audit = Audit(ctx.store)
    remediator_for(ctx)   # build it now: a bad `remediation:` section fails at start-up, not at 3 am

    @router.get("/api/v1/cordons")
    def cordons() -> JSONResponse:
        rows = audit.cordons()
        return JSONResponse({"status": "success", "data": [cordon_json(c) for c in rows]})

    @router.get("/api/v1/remediation/audit")
    def history(limit: int = 100, cluster: str | None = None, node: str | None = None,
                since: float | None = None) -> JSONResponse:
        if not 1 <= limit <= 10000:
            return _error(400, "bad_data", "limit must be between 1 and 10000")
        rows = audit.history(limit, cluster=cluster, node=node, since=since)
        return JSONResponse({"status": "success", "data": [decision_json(d) for d in rows]})

    @router.post("/api/v1/cordons/{cluster}/{node}/{chip}/healthy")
    async def healthy(cluster: str, node: str, chip: str, request: Request) -> JSONResponse:
        try:
            _target(cluster, node, chip)
            doc = await _body(request)
            by = str(doc.get("by") or "").strip()
            if not by or len(by) > 100:
                raise ValueError('body must name the operator: {"by": "NAME"}')
            d = await run_in_threadpool(remediator_for(ctx).mark_healthy, cluster, node, chip, by, time.time())
        except TooLarge:
            return _error(413, "bad_data", f"body larger than {MAX_BODY} bytes")
        except (ValueError, TypeError) as exc:
            return _error(400, "bad_data", str(exc))
        return JSONResponse({"status": "success", "data": decision_json(d)})

    @router.post("/api/v1/cordons/{cluster}/{node}/{chip}/confirm")
    async def confirm(cluster: str, node: str, chip: str, request: Request) -> JSONResponse:
        try:
            _target(cluster, node, chip)
            doc = await _body(request)
            by, mode = str(doc.get("by") or "").strip(), str(doc.get("mode") or "other")
            if not by or len(by) > 100:
                raise ValueError('body must name the operator: {"by": "NAME"}')
            if mode not in FAILURE_MODES:
                raise ValueError(f"mode must be one of {', '.join(FAILURE_MODES)}")
            at = doc.get("at", time.time())
            if not isinstance(at, (int, float)) or isinstance(at, bool) or not 0 < at <= time.time() + 60:
                raise ValueError("at must be the failure time in epoch seconds, not in the future")
            d = await run_in_threadpool(confirm_failure, audit, cluster, node, chip, by, mode,
                                        str(doc.get("note") or "")[:1000], time.time(), float(at))
        except TooLarge:
            return _error(413, "bad_data", f"body larger than {MAX_BODY} bytes")
        except (ValueError, TypeError) as exc:
            return _error(400, "bad_data", str(exc))
        return JSONResponse({"status": "success", "data": decision_json(d)})

    return router


def confirm_failure(audit: Audit, cluster: str, node: str, chip: str, by: str, mode: str, note: str,
                    now: float, failed_at: float | None = None):
    """Record an operator-confirmed failure (health_confirmed_failures) and audit it."""
    from collector.remediate.audit import Decision
    failed_at = now if failed_at is None else failed_at
    held = audit.get(cluster, node, chip)
    audit.confirm_failure(cluster, node, chip, failed_at=failed_at, actor=by, mode=mode)
    audit.clear_override(cluster, node, chip)   # a confirmed failure may be cordoned again at once
    words = f"failure confirmed by {by}: {mode}, failed at {iso(failed_at)}" + (f" ({note})" if note else "")
    d = Decision(now, cluster, node, chip, "confirm_failure", "done", False, held.backend if held else "",
                 [words], {}, by)
    audit.record(d)
    return d
