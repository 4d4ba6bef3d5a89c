"""Helpers shared by the tests: free ports, starting real servers on loopback, waiting for them.

Real servers (Prometheus, Alertmanager, Slurm, the collector itself) are started as processes
on 127.0.0.1 and stopped afterwards. A test that needs a binary which is not installed is
skipped with the binary's name (scripts/test installs them all).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = ROOT.parent / "shared"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(name: str, *candidates: str) -> str:
    """Path of a binary, or skip the test naming the missing tool."""
    for cand in (name, *candidates):
        path = shutil.which(cand) or (cand if os.path.isabs(cand) and os.access(cand, os.X_OK) else None)
        if path:
            return path
    pytest.skip(f"missing tool: {name} (installed by scripts/test from Debian packages)")


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until GET url answers (any HTTP status), or fail with the process's output."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except Exception as exc:  # noqa: BLE001 - anything means "not yet"
            last = exc
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last}")


@contextlib.contextmanager
def running(cmd: list[str], *, ready_url: str | None = None, timeout: float = 30.0,
            log: Path | None = None, env: dict | None = None, cwd: str | Path | None = None):
    """Start a process, wait for ready_url, yield it, and stop it (SIGTERM, then SIGKILL)."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        if ready_url:
            try:
                wait_http(ready_url, timeout, proc)
            except Exception:
                if log:
                    sys.stderr.write(Path(log).read_text(errors="replace")[-4000:])
                raise
        yield proc
    finally:
        stop(proc)
        if log:
            out.close()


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
