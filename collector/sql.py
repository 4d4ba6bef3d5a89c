"""Read-only SQL for capacity questions: POST /api/v1/sql {"query": "SELECT ..."}.

Read-only by construction, in layers:
- the statement is split and classified by DuckDB's own parser (duckdb.extract_statements):
  exactly one statement, and it must be a SELECT (WITH ... SELECT included);
- it runs on its own cursor inside a transaction that is always rolled back;
- the collector's database has enable_external_access = false (Store(sandbox=True)), so no SQL
  can read or write files or reach the network (read_csv, COPY, ATTACH, httpfs all refuse);
- a timer interrupts the cursor after sql.timeout_s, and at most sql.max_rows rows come back
  ("truncated": true says there were more).

Answer (JSON):  {"status": "success", "data": {"columns": [...], "types": [...], "rows": [[...]],
                 "truncated": false}}
With {"format": "arrow"} the answer is an Arrow IPC stream instead (exact types; the Python
client helper `query()` uses it and returns a polars.DataFrame).
Errors:         400 {"status": "error", "errorType": "bad_data"|"forbidden"|"timeout"|"execution", "error": ...}
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import threading
import uuid
from typing import Any

import duckdb
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from collector.receive.common import IngestError, read_body

MAX_QUERY_BYTES = 100_000


class SqlError(Exception):
    def __init__(self, kind: str, message: str, status: int = 400):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


def check_read_only(query: str) -> str:
    """The single SELECT statement in `query`, or SqlError."""
    if not isinstance(query, str) or not query.strip():
        raise SqlError("bad_data", "query must be a non-empty string")
    if len(query.encode()) > MAX_QUERY_BYTES:
        raise SqlError("bad_data", f"query longer than {MAX_QUERY_BYTES} bytes")
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise SqlError("bad_data", f"cannot parse SQL: {exc}") from None
    if len(statements) != 1:
        raise SqlError("forbidden", f"exactly one statement allowed, got {len(statements)}")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise SqlError("forbidden", f"only SELECT queries are allowed, got {statements[0].type.name}")
    return query


def run(store, query: str, *, timeout_s: float, max_rows: int):
    """Execute a read-only query; returns (columns, types, rows as Arrow table, truncated)."""
    import pyarrow as pa

    check_read_only(query)
    cur = store.cursor()
    timer = threading.Timer(timeout_s, cur.interrupt)
    timer.start()
    try:
        cur.execute("BEGIN TRANSACTION")
        try:
            rel = cur.sql(query)
            columns = list(rel.columns)
            types = [str(t) for t in rel.types]
            reader = rel.to_arrow_reader(batch_size=min(max_rows + 1, 65_536))
            try:
                batches, n = [], 0
                for batch in reader:
                    batches.append(batch)
                    n += batch.num_rows
                    if n > max_rows:   # stop reading: the rest is never computed
                        break
                table = pa.Table.from_batches(batches, schema=reader.schema)
            finally:
                reader.close()
        finally:
            cur.execute("ROLLBACK")
    except duckdb.InterruptException:
        raise SqlError("timeout", f"query exceeded the time limit of {timeout_s:g}s") from None
    except duckdb.PermissionException as exc:
        raise SqlError("forbidden", str(exc)) from None
    except duckdb.Error as exc:
        if "interrupt" in str(exc).lower():
            raise SqlError("timeout", f"query exceeded the time limit of {timeout_s:g}s") from None
        raise SqlError("execution", str(exc)) from None
    finally:
        timer.cancel()
        cur.close()
    truncated = table.num_rows > max_rows
    return columns, types, table.slice(0, max_rows), truncated


def _json_value(v: Any) -> Any:
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, dt.timedelta):
        return v.total_seconds()
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, list) and v and isinstance(v[0], tuple) and len(v[0]) == 2:
        return {str(k): _json_value(x) for k, x in v}   # Arrow maps come as [(key, value)]
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def to_json(columns, types, table, truncated) -> bytes:
    rows = [[_json_value(v) for v in row.values()] for row in table.to_pylist()]
    return json.dumps({"status": "success", "data": {"columns": columns, "types": types, "rows": rows,
                                                      "truncated": truncated}}).encode()


def to_arrow_ipc(table, truncated) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    meta = {b"truncated": b"true" if truncated else b"false"}
    table = table.replace_schema_metadata(meta)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _error(exc: SqlError) -> Response:
    body = json.dumps({"status": "error", "errorType": exc.kind, "error": exc.message})
    return Response(body, status_code=exc.status, media_type="application/json")


def make_router(ctx) -> APIRouter:
    router = APIRouter()
    cfg = ctx.config.sql

    @router.post("/api/v1/sql")
    async def sql(request: Request) -> Response:
        try:
            try:
                raw = await read_body(request, MAX_QUERY_BYTES + 1000)
            except IngestError as exc:
                raise SqlError("bad_data", exc.message, exc.status) from None
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise SqlError("bad_data", 'body must be JSON: {"query": "SELECT ..."}') from None
            if not isinstance(doc, dict) or "query" not in doc:
                raise SqlError("bad_data", 'body must be JSON: {"query": "SELECT ..."}')
            fmt = doc.get("format", "json")
            if fmt not in ("json", "arrow"):
                raise SqlError("bad_data", "format must be json or arrow")
            columns, types, table, truncated = await run_in_threadpool(
                run, ctx.store, doc["query"], timeout_s=cfg.timeout_s, max_rows=cfg.max_rows)
        except SqlError as exc:
            return _error(exc)
        if fmt == "arrow":
            return Response(to_arrow_ipc(table, truncated), media_type="application/vnd.apache.arrow.stream")
        return Response(to_json(columns, types, table, truncated), media_type="application/json")

    return router


def query(url: str, sql_text: str, *, token: str | None = None, timeout: float = 60.0):
    """Run a read-only query on a collector at `url`; returns a polars.DataFrame."""
    import httpx
    import polars as pl
    import pyarrow as pa

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.post(url.rstrip("/") + "/api/v1/sql", json={"query": sql_text, "format": "arrow"},
                   headers=headers, timeout=timeout)
    if r.status_code != 200:
        try:
            detail = r.json().get("error", r.text)
        except ValueError:
            detail = r.text
        raise SqlError(r.json().get("errorType", "execution") if r.headers.get("content-type", "").startswith(
            "application/json") else "execution", f"HTTP {r.status_code}: {detail}", r.status_code)
    table = pa.ipc.open_stream(r.content).read_all()
    return pl.from_arrow(table)
