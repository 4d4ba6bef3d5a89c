"""The on-disk spool that carries OTLP batches through collector outages, and the shipper that
sends from it.

Spool: one file per batch (the gzip'd OTLP request), named by a monotonically increasing sequence number
(00000000000000000042.otlp.gz) so the directory listing is the send order. Each file is written to
a temporary name, fsync'd, renamed into place and the directory fsync'd, so a crash leaves
either the whole batch or nothing. The spool is bounded by bytes: when a new batch does not fit,
the oldest batches are deleted and counted (`dropped`). A restarted agent finds the files and
continues the sequence.

Shipper: the one thread that talks to the collector. Order is kept by one rule: while anything
is spooled, new batches are spooled behind it and the spool is drained oldest first; only when
the spool is empty does a new batch go straight to the collector. A retryable failure (no
answer, 429/502/503/504) spools the batch and backs off (Retry-After when the collector gives
one); a non-retryable answer (400 and other 4xx) drops the batch and counts it, since resending
the same bytes can never succeed.
"""

from __future__ import annotations

import collections
import gzip
import logging
import os
import re
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

from agent.export.otlp import SendResult, backoff_seconds

log = logging.getLogger(__name__)

_BATCH = re.compile(r"^(\d{20})\.otlp\.gz$")


class Spool:
    def __init__(self, directory: str | os.PathLike, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("spool max_bytes must be positive")
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.dropped = 0            # batches dropped because the spool was full (this process)
        self._sizes: dict[int, int] = {}
        for entry in os.scandir(self.dir):
            m = _BATCH.match(entry.name)
            if m:
                self._sizes[int(m.group(1))] = entry.stat().st_size
            elif entry.name.startswith(".tmp-"):
                os.unlink(entry.path)   # a write interrupted by a crash: never renamed, never acked
        self._order = collections.deque(sorted(self._sizes))
        self._next = (self._order[-1] + 1) if self._order else 1
        self._bytes = sum(self._sizes.values())

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq:020d}.otlp.gz"

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._order)

    def append(self, body: bytes) -> int | None:
        """Store a batch; returns its sequence number, or None if it alone exceeds the limit."""
        with self._lock:
            if len(body) > self.max_bytes:
                self.dropped += 1
                log.error("batch of %d bytes is larger than the whole spool (%d); dropped", len(body), self.max_bytes)
                return None
            while self._order and self._bytes + len(body) > self.max_bytes:
                self._remove(self._order[0])
                self.dropped += 1
            seq = self._next
            self._next += 1
            tmp = self.dir / f".tmp-{seq}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self._path(seq))
            self._fsync_dir()
            self._order.append(seq)
            self._sizes[seq] = len(body)
            self._bytes += len(body)
            return seq

    def oldest(self) -> tuple[int, bytes] | None:
        with self._lock:
            while self._order:
                seq = self._order[0]
                try:
                    return seq, self._path(seq).read_bytes()
                except FileNotFoundError:   # removed behind our back: forget it
                    self._forget(seq)
            return None

    def remove(self, seq: int) -> None:
        with self._lock:
            self._remove(seq)

    def _remove(self, seq: int) -> None:
        try:
            os.unlink(self._path(seq))
        except FileNotFoundError:
            pass
        self._forget(seq)

    def _forget(self, seq: int) -> None:
        if seq in self._sizes:
            self._bytes -= self._sizes.pop(seq)
            self._order.remove(seq)

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Shipper:
    """Sends batches in order through a sender (OtlpSender-like: send(bytes) -> SendResult),
    spooling them while the collector is unreachable. Runs in its own thread."""

    OUTCOMES = ("success", "retry", "rejected", "spooled")

    def __init__(self, send: Callable[[bytes], SendResult], spool: Spool, max_backoff: float = 30.0):
        self._send = send
        self.spool = spool
        self.max_backoff = max_backoff
        self.counts = dict.fromkeys(self.OUTCOMES, 0)
        self.last_error = ""
        self._queue: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._busy = False
        self._retry_at = 0.0
        self._attempt = 0
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- producer side
    def submit(self, body: bytes) -> None:
        with self._cond:
            self._queue.append(body)
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="otlp-shipper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; batches not yet sent are written to the spool for the next start."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread:
            self._thread.join(timeout)
        with self._cond:
            while self._queue:
                self._spool(self._queue.popleft())

    def idle(self) -> bool:
        """True when nothing is queued, spooled or being sent."""
        with self._cond:
            return not self._queue and not self._busy and len(self.spool) == 0

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.02)
        return self.idle()

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._queue and not self._spool_due():
                    wait = None if len(self.spool) == 0 else max(0.0, self._retry_at - time.monotonic())
                    self._cond.wait(wait)
                if self._stop:
                    return
                self._busy = True
                new = collections.deque(self._queue)
                self._queue.clear()
            try:
                self._step(new)
            except Exception:  # noqa: BLE001 - the shipper must outlive a bug: keep the data
                log.exception("shipper step failed; retrying")
                self._retry_at = time.monotonic() + self._backoff(None)
                while new:
                    self._spool(new.popleft())
            finally:
                with self._cond:
                    self._busy = False

    def _spool_due(self) -> bool:
        return len(self.spool) > 0 and time.monotonic() >= self._retry_at

    def _step(self, new: collections.deque[bytes]) -> None:
        # 1. the oldest spooled batch first (one per step, so new batches are picked up between)
        if self._spool_due():
            self._send_oldest()
        # 2. new batches: straight to the collector only when nothing older waits. Each leaves
        #    `new` only once handled, so _run can spool what a failure left behind.
        while new:
            body = new[0]
            if not (len(self.spool) == 0 and time.monotonic() >= self._retry_at and self._deliver(body)):
                self._spool(body)
            new.popleft()

    def _send_oldest(self) -> None:
        item = self.spool.oldest()
        if item is None:
            return
        seq, stored = item
        try:
            body = gzip.decompress(stored)
        except (OSError, EOFError, zlib.error) as exc:   # damaged on disk: never sendable
            log.error("spooled batch %d is unreadable (%s); dropped", seq, exc)
            self.spool.remove(seq)
            self.spool.dropped += 1
            return
        if self._deliver(body):
            self.spool.remove(seq)

    def _deliver(self, body: bytes) -> bool:
        """Send once. True when the batch is finished with (sent, or rejected for good)."""
        result = self._send(body)
        if result.ok:
            self.counts["success"] += 1
            self._attempt = 0
            self._retry_at = 0.0
            return True
        self.last_error = result.error
        if not result.retryable:
            self.counts["rejected"] += 1
            log.error("collector rejected a batch (dropped, not retryable): %s", result.error)
            return True
        self.counts["retry"] += 1
        self._retry_at = time.monotonic() + self._backoff(result.retry_after)
        self._attempt += 1
        log.warning("collector unavailable (%s); retrying in %.1fs", result.error, self._retry_at - time.monotonic())
        return False

    def _backoff(self, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, max(self.max_backoff, 300.0))
        return backoff_seconds(self._attempt, cap=self.max_backoff)

    def _spool(self, body: bytes) -> None:
        try:
            # Stored gzip'd: OTLP batches repeat label strings, so the same spool_max_bytes
            # holds about ten times more of an outage.
            seq = self.spool.append(gzip.compress(body, compresslevel=6, mtime=0))
        except OSError as exc:   # disk full, directory gone: this batch is lost, say so
            self.spool.dropped += 1
            log.error("cannot spool a batch (dropped): %s", exc)
            return
        if seq is not None:
            self.counts["spooled"] += 1
