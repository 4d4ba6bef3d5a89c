"""The collector started as a real process on 127.0.0.1 (tests.support.running)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import PYTHON, ROOT, free_port, running


@dataclass
class Collector:
    url: str
    db: Path
    proc: object
    token: str | None = None

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def sql(self, query: str) -> list[list]:
        r = httpx.post(self.url + "/api/v1/sql", json={"query": query}, headers=self.headers(), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["data"]["rows"]


@contextlib.contextmanager
def start_collector(tmp: Path, config: dict | None = None, *, db: Path | None = None, token: str | None = None,
                    port: int | None = None):
    port = port or free_port()
    db = db or tmp / "collector.duckdb"
    cfg_path = tmp / f"collector-{port}.yaml"
    # the collector's own self-metrics (rules.self_metrics) would add series these tests count
    config = {"rules": {"self_metrics": False}, **(config or {})}
    cfg_path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOPFLOOR_COLLECTOR")}
    env["PYTHONPATH"] = str(ROOT)
    if token:
        env["SHOPFLOOR_COLLECTOR_TOKEN"] = token
    cmd = [PYTHON, "-m", "shopfloor", "collector", "--config", str(cfg_path),
           "--listen", f"127.0.0.1:{port}", "--db", str(db), "--log-level", "warning"]
    # generous start timeout: the CI machine's 2 cores may be busy with other suites
    with running(cmd, ready_url=f"http://127.0.0.1:{port}/-/healthy", log=tmp / f"collector-{port}.log",
                 env=env, cwd=ROOT, timeout=120) as proc:
        yield Collector(f"http://127.0.0.1:{port}", db, proc, token)


@pytest.fixture
def collector(tmp_path):
    with start_collector(tmp_path) as c:
        yield c
