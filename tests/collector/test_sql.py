"""The read-only SQL API, its limits, the capacity views and `shopfloor sql`, on a live collector."""

from __future__ import annotations

import subprocess
import time

import httpx
import polars as pl
import pytest

from agent.catalog import catalog
from collector.receive.remote_write import encode
from collector.sql import SqlError, query
from tests.collector.conftest import start_collector
from tests.support import PYTHON, ROOT

H = 3_600_000
DAY0 = (int(time.time() * 1000) // (24 * H) - 1) * (24 * H)   # yesterday: inside every retention


def fleet_history():
    """Two hours of one rack: 2 B200 and 2 Trn2 chips, utilization, power, memory (1-minute steps)."""
    cat = catalog()
    series = []
    chips = [("nvidia", "B200", 192e9), ("nvidia", "B200", 192e9), ("aws", "Trainium2", 96e9), ("aws", "Trainium2", 96e9)]
    for i, (vendor, model, mem) in enumerate(chips):
        base = {"cluster": "c1", "rack": "r1", "node": f"n{i // 2}", "chip": str(i % 2), "uuid": f"u{i}",
                "vendor": vendor, "model": model}
        times = range(DAY0, DAY0 + 2 * H, 60_000)
        series.append(({"__name__": cat.prom("hw.gpu.utilization"), **base}, [(t, 0.5 + 0.1 * (i % 2)) for t in times]))
        series.append(({"__name__": cat.prom("hw.power"), **base}, [(t, 600.0 + i) for t in times]))
        series.append(({"__name__": cat.prom("hw.gpu.memory.usage"), **base},
                       [(t, mem * (0.25 if t < DAY0 + H else 0.75)) for t in times]))
        series.append(({"__name__": cat.prom("hw.gpu.memory.limit"), **base}, [(t, mem) for t in times]))
        series.append(({"__name__": cat.prom("hw.gpu.info"), **base, "driver_version": "570"}, [(DAY0, 1.0)]))
    return series


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sql")
    cfg = {"sql": {"timeout_s": 1, "max_rows": 1000}, "storage": {"maintenance_interval_s": 1}}
    with start_collector(tmp, cfg) as c:
        r = httpx.post(c.url + "/api/v1/write", content=encode(fleet_history()),
                       headers={"Content-Encoding": "snappy"})
        assert r.status_code == 204, r.text
        deadline = time.monotonic() + 20   # the maintenance job (every 1 s here) builds the rollups
        while time.monotonic() < deadline and c.sql("SELECT count(*) FROM rollup_1h")[0][0] < 36:
            time.sleep(0.3)
        yield c


def test_capacity_views(live):
    hours = live.sql("SELECT day, cluster, vendor, model, chips, chip_hours, busy_chip_hours "
                     "FROM accelerator_hours_daily ORDER BY vendor")
    day = str(pl.Series([DAY0]).cast(pl.Datetime("ms")).dt.date()[0])
    assert hours == [[day, "c1", "aws", "Trainium2", 2, 4, pytest.approx(2 * 0.5 + 2 * 0.6)],
                     [day, "c1", "nvidia", "B200", 2, 4, pytest.approx(2 * 0.5 + 2 * 0.6)]]
    power = live.sql("SELECT rack, chips, accelerator_watts, energy_kwh FROM power_per_rack_hourly ORDER BY hour")
    assert power == [["r1", 4, 2406.0, 2.406], ["r1", 4, 2406.0, 2.406]]
    head = live.sql("SELECT model, chips, memory_bytes, peak_used_fraction, min_headroom_bytes "
                    "FROM memory_headroom_daily ORDER BY model")
    assert head == [["B200", 2, 192e9, 0.75, 48e9], ["Trainium2", 2, 96e9, 0.75, 24e9]]
    inv = live.sql("SELECT vendor, model, chips FROM accelerator_inventory ORDER BY vendor")
    assert inv == [["aws", "Trainium2", 2], ["nvidia", "B200", 2]]
    r5 = live.sql("SELECT count(*), sum(count) FROM rollup_5m WHERE name = 'hw_power_watts'")
    assert r5 == [[4 * 24, 4 * 120]]


@pytest.mark.parametrize("bad, kind", [
    ("DELETE FROM samples", "forbidden"),
    ("DROP VIEW metrics", "forbidden"),
    ("INSERT INTO samples VALUES (1, 1, 1)", "forbidden"),
    ("SELECT 1; DELETE FROM samples", "forbidden"),
    ("COPY samples TO '/tmp/x.csv'", "forbidden"),
    ("ATTACH '/tmp/other.duckdb'", "forbidden"),
    ("SET enable_external_access = true", "forbidden"),
    ("PRAGMA database_size", "forbidden"),
    ("SELECT * FROM read_csv('/etc/passwd')", "forbidden"),
    ("SELECT * FROM read_parquet('http://example.com/x.parquet')", "forbidden"),
    ("SELECT * FROM query('DELETE FROM samples')", "execution"),
    ("SELEC 1", "bad_data"),
    ("SELECT count(*) FROM range(10000000000) a, range(10) b", "timeout"),
])
def test_sql_is_read_only_and_limited(live, bad, kind):
    before = live.sql("SELECT count(*) FROM samples")
    r = httpx.post(live.url + "/api/v1/sql", json={"query": bad}, timeout=30)
    assert r.status_code == 400 and r.json()["errorType"] == kind, r.text
    assert live.sql("SELECT count(*) FROM samples") == before


def test_row_limit_and_bad_bodies(live):
    r = httpx.post(live.url + "/api/v1/sql", json={"query": "SELECT * FROM range(5000)"}).json()["data"]
    assert r["truncated"] is True and len(r["rows"]) == 1000
    r = httpx.post(live.url + "/api/v1/sql", json={"query": "SELECT * FROM range(10)"}).json()["data"]
    assert r["truncated"] is False and r["columns"] == ["range"] and r["types"] == ["BIGINT"]
    for body in (b"not json", b"[]", b'{"q": 1}', b'{"query": 5}', b'{"query": "SELECT 1", "format": "xml"}'):
        r = httpx.post(live.url + "/api/v1/sql", content=body)
        assert r.status_code == 400 and r.json()["status"] == "error"


def test_polars_client_helper(live):
    df = query(live.url, "SELECT ts, name, labels, value FROM metrics WHERE name = 'hw_power_watts' ORDER BY ts LIMIT 3")
    assert isinstance(df, pl.DataFrame) and df.height == 3
    assert df.schema["ts"] == pl.Datetime("us") and df.schema["value"] == pl.Float64
    with pytest.raises(SqlError) as err:
        query(live.url, "DELETE FROM samples")
    assert err.value.kind == "forbidden"


def test_sql_cli_formats(live, tmp_path):
    def cli(*args):
        return subprocess.run([PYTHON, "-m", "shopfloor", "sql", *args, "--url", live.url],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)

    q = "SELECT model, chips FROM accelerator_inventory ORDER BY model"
    table = cli(q)
    assert table.returncode == 0 and "B200" in table.stdout and "Trainium2" in table.stdout
    csv = cli(q, "--format", "csv")
    assert csv.stdout.splitlines() == ["model,chips", "B200,2", "Trainium2,2"]
    labels_csv = cli("SELECT labels FROM metrics WHERE name = 'hw_gpu_info' ORDER BY labels['uuid'] LIMIT 1",
                     "--format", "csv")
    assert labels_csv.returncode == 0 and '""uuid"": ""u0""' in labels_csv.stdout
    out = tmp_path / "x.parquet"
    assert cli(q, "--format", "parquet", "--output", str(out)).returncode == 0
    assert pl.read_parquet(out)["chips"].to_list() == [2, 2]


def test_queries_do_not_wait_for_ingest(tmp_path):
    """A long ingest stream and SQL queries at once: queries answer while ingest goes on (they see
    the store grow between them), and ingest keeps going while queries run. (How fast is measured
    in benchmarks/, not here.)"""
    import threading

    with start_collector(tmp_path) as c:
        stop = threading.Event()

        def push():
            i = 0
            with httpx.Client() as client:
                while not stop.is_set():
                    body = encode([({"__name__": "load", "n": str(n)}, [(i * 1000 + k, float(k)) for k in range(200)])
                                   for n in range(50)])
                    client.post(c.url + "/api/v1/write", content=body)
                    i += 1

        t = threading.Thread(target=push)
        t.start()
        try:
            seen = []
            while len(set(seen)) < 5:
                seen.append(c.sql("SELECT count(*) FROM metrics")[0][0])
        finally:
            stop.set()
            t.join()
        assert seen == sorted(seen) and len(set(seen)) >= 5
        assert c.sql("SELECT count(*) FROM metrics")[0][0] >= seen[-1]
