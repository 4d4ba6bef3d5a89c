"""`shopfloor demo` end to end: collector + simulated fleet, then the DuckDB file it leaves."""

from __future__ import annotations

import subprocess

import duckdb

from agent.catalog import catalog
from tests.support import PYTHON, ROOT, free_port


def test_demo_runs_and_leaves_queryable_data(tmp_path):
    port = free_port()
    proc = subprocess.run(
        [PYTHON, "-m", "shopfloor", "demo", "--listen", f"127.0.0.1:{port}", "--dir", str(tmp_path),
         "--nodes", "2", "--trainium-share", "0.5", "--history", "15m", "--duration", "15", "--every", "5"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"http://127.0.0.1:{port}/api/v1/query" in out and "/api/v1/sql" in out
    assert "history loaded" in out and "final:" in out
    con = duckdb.connect(str(tmp_path / "shopfloor.duckdb"), read_only=True)
    power = catalog().prom("hw.gpu.utilization")
    vendors = con.execute("SELECT DISTINCT labels['vendor'] FROM metrics WHERE name = ? ORDER BY 1", [power]).fetchall()
    assert vendors == [("aws",), ("nvidia",)]
    # history (1-minute steps) and live (10-second steps) both arrived
    span = con.execute("SELECT (max(epoch_ms(ts)) - min(epoch_ms(ts))) / 60000 FROM metrics WHERE name = ?",
                       [power]).fetchall()[0][0]
    assert span >= 14
    # the rollups cover the backfilled history without a gap (live data and the collector's own
    # metrics arriving meanwhile must not move the rollup past history still being loaded)
    buckets = [b for b, in con.execute("SELECT DISTINCT epoch_ms(ts) FROM rollup_5m WHERE name = ? ORDER BY 1",
                                       [power]).fetchall()]
    assert len(buckets) >= 3 and buckets == list(range(buckets[0], buckets[-1] + 1, 300_000))
    assert con.execute("SELECT sum(chips) FROM accelerator_inventory").fetchall()[0][0] >= 2
