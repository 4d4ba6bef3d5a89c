"""`shopfloor health train --from-collector DB`: operator-confirmed failures from the collector's
database become training labels; without any, a clear error."""

import json
import subprocess

from collector.health.cli import CONFIRMED_SCHEMA, from_collector
from collector.store.core import Store
from tests.health.tracegen import HOUR, START_MS, Trace
from tests.support import PYTHON, ROOT


def collector_db(path, confirmed: bool) -> str:
    t = Trace(nodes=2, chips=2, hours=30).baseline()
    s = Store(str(path))
    s.append_series((name, json.loads(labels), ts, value) for ts, name, labels, value in t.rows)
    if confirmed:
        s.con.execute(CONFIRMED_SCHEMA)
        s.con.execute("INSERT INTO health_confirmed_failures VALUES (?, 'c1', 'n001', '1', 'hbm_uncorrectable', 'alice')",
                      [START_MS + 20 * HOUR])
    s.con.execute("CHECKPOINT")
    s.close()
    return str(path)


def test_confirmed_failures_become_labels(tmp_path):
    grid, failures = from_collector(collector_db(tmp_path / "c.duckdb", True))
    assert grid.height == 4 * 30
    row = failures.row(0, named=True)
    assert (row["node"], row["chip"], row["uuid"], row["mode"]) == ("n001", "1", "GPU-001-1", "hbm_uncorrectable")
    assert row["precursor_start"] < row["ts"]


def test_without_confirmed_failures_the_cli_says_so(tmp_path):
    db = collector_db(tmp_path / "c.duckdb", False)
    r = subprocess.run([PYTHON, "-m", "shopfloor", "health", "train", "--from-collector", db, "--out",
                        str(tmp_path / "m.joblib")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "health_confirmed_failures" in r.stderr
    assert not (tmp_path / "m.joblib").exists()
