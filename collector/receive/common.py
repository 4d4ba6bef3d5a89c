"""What both ingest protocols share: bounded body reading, safe decompression, load shedding,
and the plain-ASGI front door that serves them.

Limits are enforced before any work is done: Content-Length first, then the bytes actually
streamed, then the size after decompression (gzip output is produced in bounded steps and the
snappy header's declared length is checked before decoding), so a small "bomb" cannot make the
collector allocate more than `max_decompressed_bytes`.

Why the ingest endpoints bypass FastAPI's router (IngestRoutes): a busy collector takes
hundreds of ingest requests a second, and on the event loop each paid ~1 ms of Python for
routing, dependency solving, exception-handling layers and anyio's thread hand-off, all under
the GIL that the decoding threads need too (measured with py-spy: 40 % of the GIL-holding
time). The ingest requests need none of it: a body, a thread, an answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import cramjam
from fastapi import Request
from zlib_ng import zlib_ng   # zlib's API and format, inflates ~2.7x faster (0.065 vs 0.18 ms per request)


log = logging.getLogger(__name__)


class LoadedInBackground:
    """An object built on a background thread the first time it is asked for; None until then.

    The compiled wire paths (collector.receive.wire) load this way: importing numba at start
    made the collector ~0.8 s slower to start, and numba compiles them once (~15-20 s, then
    ~1 s from its disk cache). Until one is ready every request takes the general path, which
    gives the same result."""

    def __init__(self, name: str, build: Callable[[], object]):
        self.name = name
        self.value = None
        self._build = build
        self._lock = threading.Lock()
        self._started = False

    def get(self):
        value = self.value
        if value is None and not self._started:
            with self._lock:
                if not self._started:
                    self._started = True
                    threading.Thread(target=self._load, name=f"{self.name} compile", daemon=True).start()
        return value

    def _load(self) -> None:
        try:
            t0 = time.perf_counter()
            self.value = self._build()
            log.info("%s ready in %.1f s", self.name, time.perf_counter() - t0)
        except Exception:  # noqa: BLE001 - the general path still serves every request
            log.exception("%s unavailable; every request takes the general path", self.name)


class IngestError(Exception):
    """An error answered with `status` (4xx/5xx) and a clear message."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


async def read_body(request: Request, limit: int) -> bytes:
    return await read_asgi_body(request.receive, request.headers.get("content-length"), limit)


async def read_asgi_body(receive, declared: str | bytes | None, limit: int) -> bytes:
    """The request body from ASGI `receive`, refused (413) as soon as it is known to pass `limit`."""
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise IngestError(400, "invalid Content-Length") from None
        if n > limit:
            raise IngestError(413, f"request body of {n} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise IngestError(400, "client disconnected before the body was complete")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise IngestError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def gunzip(body: bytes, limit: int) -> bytes:
    d = zlib_ng.decompressobj(wbits=16 + zlib_ng.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib_ng.error as exc:
        raise IngestError(400, f"invalid gzip body: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise IngestError(413, f"decompressed body exceeds the limit of {limit} bytes")
    if not d.eof:
        raise IngestError(400, "invalid gzip body: truncated")
    return out


def batch_key(protocol: bytes, body: bytes) -> bytes:
    """The key a retried request is recognised by (collector.store.writer): a hash of the
    decompressed body, so a client that compresses again on retry still matches. SHA-256 runs
    on the CPU's SHA extensions: 0.10 ms for a 200 kB request, against 0.20 for BLAKE2b."""
    h = hashlib.sha256(protocol)
    h.update(body)
    return h.digest()[:16]


def snappy_declared_length(body: bytes) -> int:
    """The uncompressed length a snappy block declares in its leading varint."""
    value = shift = 0
    for i, byte in enumerate(body[:5]):
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
    raise IngestError(400, "invalid snappy body: bad length header")


def unsnappy(body: bytes, limit: int) -> bytes:
    n = snappy_declared_length(body)
    if n > limit:
        raise IngestError(413, f"decompressed body of {n} bytes exceeds the limit of {limit} bytes")
    try:
        return bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:  # noqa: BLE001 - cramjam raises its own DecompressionError
        raise IngestError(400, f"invalid snappy block: {exc}") from None


def decode_content(body: bytes, encoding: str | None, limit: int) -> bytes:
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        if len(body) > limit:
            raise IngestError(413, f"body exceeds the limit of {limit} bytes")
        return body
    if encoding == "gzip":
        return gunzip(body, limit)
    if encoding == "snappy":
        return unsnappy(body, limit)
    raise IngestError(415, f"unsupported Content-Encoding {encoding!r} (use gzip or identity)")


class IngestGate:
    """At most `max_inflight` requests decode and write at once, each on one of the gate's own
    threads; the rest wait a little, then get 429 + Retry-After (OTLP and Prometheus clients
    retry those with backoff)."""

    def __init__(self, max_inflight: int, wait_s: float, retry_after_s: int):
        self._sem = asyncio.Semaphore(max_inflight)
        self._threads = ThreadPoolExecutor(max_inflight, thread_name_prefix="ingest")
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s

    async def run(self, fn, *args):
        """fn(*args) on a gate thread once a slot is free; 429 if none frees up in wait_s."""
        if self._sem.locked():
            try:
                await asyncio.wait_for(self._sem.acquire(), self.wait_s)
            except TimeoutError:
                raise IngestError(429, "collector busy: too many ingest requests in flight, retry later",
                                  retry_after=self.retry_after_s) from None
        else:
            await self._sem.acquire()   # free: no timer task (wait_for makes one per call)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)
        finally:
            self._sem.release()


@dataclass
class Answer:
    """An ingest endpoint's response."""
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


# handler(request headers (lower-case names, as ASGI gives them), ASGI receive) -> Answer
IngestHandler = Callable[[dict[bytes, bytes], Callable], Awaitable[Answer]]


class IngestRoutes:
    """Plain-ASGI middleware that serves the ingest endpoints (path -> handler, POST only) and
    passes everything else to the application. Placed inside the auth and body-limit
    middleware, so those still run first."""

    def __init__(self, app, routes: dict[str, IngestHandler]):
        self.app = app
        self.routes = routes

    async def __call__(self, scope, receive, send):
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None:
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":
            answer = Answer(405, b"method not allowed: use POST\n", "text/plain", {"Allow": "POST"})
        else:
            answer = await handler(dict(scope["headers"]), receive)
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
        if answer.status != 204:   # a 204 carries neither body nor length (RFC 9110 8.6)
            headers.append((b"content-length", str(len(answer.body)).encode()))
            if answer.content_type:
                headers.append((b"content-type", answer.content_type.encode("latin-1")))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
