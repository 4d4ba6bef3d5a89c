"""What both ingest protocols share: bounded body reading, safe decompression, load shedding.

Limits are enforced before any work is done: Content-Length first, then the bytes actually
streamed, then the size after decompression (gzip output is produced in bounded steps and the
snappy header's declared length is checked before decoding), so a small "bomb" cannot make the
collector allocate more than `max_decompressed_bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib

import cramjam
from fastapi import Request


class IngestError(Exception):
    """An error answered with `status` (4xx/5xx) and a clear message."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise IngestError(400, "invalid Content-Length") from None
        if n > limit:
            raise IngestError(413, f"request body of {n} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise IngestError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def gunzip(body: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise IngestError(400, f"invalid gzip body: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise IngestError(413, f"decompressed body exceeds the limit of {limit} bytes")
    if not d.eof:
        raise IngestError(400, "invalid gzip body: truncated")
    return out


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
    """At most `max_inflight` requests decode and write at once; the rest wait a little, then
    get 429 + Retry-After (OTLP and Prometheus clients retry those with backoff)."""

    def __init__(self, max_inflight: int, wait_s: float, retry_after_s: int):
        self._sem = asyncio.Semaphore(max_inflight)
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s

    @contextlib.asynccontextmanager
    async def slot(self):
        try:
            await asyncio.wait_for(self._sem.acquire(), self.wait_s)
        except TimeoutError:
            raise IngestError(429, "collector busy: too many ingest requests in flight, retry later",
                              retry_after=self.retry_after_s) from None
        try:
            yield
        finally:
            self._sem.release()
