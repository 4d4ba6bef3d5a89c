"""`shopfloor simulate --endpoint`: a few simulated minutes pushed to a real collector process
(`shopfloor collector` on 127.0.0.1, with a bearer token) land every sample that was sent."""

from __future__ import annotations

import re
import subprocess

import numpy as np

from agent.catalog import catalog
from agent.simulate.scenario import build_scenario
from agent.simulate.signals import Renderer
from tests.collector.conftest import start_collector
from tests.support import PYTHON, ROOT

START = "2026-01-01T00:00:00Z"
START_MS = 1767225600000
ARGS = ["--nodes", "3", "--trainium-share", "0.34", "--seed", "9", "--start", START,
        "--duration", "3m", "--step", "10s"]


def expected_samples() -> tuple[int, int]:
    """(samples, series) the simulator renders for ARGS, counted from its values."""
    sc = build_scenario(9, START_MS, 180, 3, None, 0.34)
    r = Renderer(sc, 10, "all")
    samples, series = 0, 0
    for block in r.blocks(r.steps(), 60, block_seed=0):
        for g in block.groups:
            present = ~np.isnan(g.values)
            samples += int(present.sum())
            series += int(present.any(axis=1).sum())
    return samples, series


def test_a_few_minutes_land_in_the_collector(tmp_path):
    with start_collector(tmp_path, token="s3cret") as c:
        wrong = subprocess.run([PYTHON, "-m", "shopfloor", "simulate", *ARGS, "--endpoint", c.url + "/v1/metrics",
                                "--token", "wrong"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert wrong.returncode == 1 and "401" in wrong.stderr     # refused, not retried forever
        done = subprocess.run([PYTHON, "-m", "shopfloor", "simulate", *ARGS, "--endpoint", c.url + "/v1/metrics",
                               "--token", "s3cret"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        sent = int(re.search(r"sent (\d+) points", done.stderr).group(1))
        samples, series = expected_samples()
        assert sent == samples
        [[stored]] = c.sql("SELECT count(*) FROM samples")
        assert stored == samples
        [[stored_series]] = c.sql("SELECT count(DISTINCT series_id) FROM samples")
        assert stored_series == series
        [[first, last]] = c.sql("SELECT min(ts), max(ts) FROM samples")
        assert first == START_MS and last == START_MS + 170_000
        names = {row[0] for row in c.sql("SELECT DISTINCT metric FROM series")}
        assert catalog().prom("hw.gpu.utilization") in names and catalog().prom("hw.neuroncore.utilization") in names
        assert names <= {m.prom_name for m in catalog()}
        # --realtime paces the steps to the wall clock: 6 steps of 1 s starting now (aligned down to
        # the second) take at least 4 s; the same run --fast takes far less
        def run(pace):
            out = subprocess.run([PYTHON, "-m", "shopfloor", "simulate", "--nodes", "1", "--chips", "1",
                                  "--trainium-share", "0", "--duration", "6s", "--step", "1s", pace,
                                  "--metrics", "health", "--endpoint", c.url + "/v1/metrics", "--token", "s3cret"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            assert "over 6 steps" in out.stderr
            return float(re.search(r"steps in ([0-9.]+)s", out.stderr).group(1))

        assert run("--realtime") >= 4.0
        assert run("--fast") < 2.0
