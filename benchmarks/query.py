"""Dashboard-style PromQL range queries: the collector against Prometheus, same data, same run.

A simulated fleet (default 1,000 chips, 6 hours at a 15 s scrape interval: 5.8M samples over four
catalog metrics) is pushed by remote write to a real Prometheus (Debian 2.42, started here on
127.0.0.1 with a temporary TSDB) and to a real collector process (embedded DuckDB). Then each
query runs as a 6-hour range query at a 30 s step (what Grafana asks for a 6 h panel), `--repeat`
times against each server; the median wall time (HTTP round trip included, JSON parsed) is
reported with the ratio collector / Prometheus (< 1 means the collector is faster). Before the
queries the collector is stopped, its closed hours compacted by the store's own maintenance step
(collector.store.maintenance.compact: samples sorted by series, as a running collector keeps
them) and started again; --no-compact skips that.

    .venv/bin/python benchmarks/query.py [--chips 1000] [--hours 6] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.promql import fleet  # noqa: E402
from tests.support import PYTHON, free_port, running  # noqa: E402

QUERIES = {
    "fleet utilization by cluster": f"avg by (cluster) ({fleet.UTIL})",
    "top 10 hottest chips": f"topk(10, max_over_time({fleet.TEMP}[5m]))",
    "ECC error rate by node": f"sum by (node) (rate({fleet.ECC}[5m]))",
    "power by rack": f"sum by (rack) ({fleet.POWER})",
}
METRICS = {fleet.UTIL, fleet.TEMP, fleet.ECC, fleet.POWER}


def timed(client: httpx.Client, url: str, query: str, start: float, end: float, step: float) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = client.get(url + "/api/v1/query_range", params={"query": query, "start": start, "end": end, "step": step},
                   timeout=600)
    r.raise_for_status()
    data = r.json()["data"]["result"]
    return time.perf_counter() - t0, sum(len(s["values"]) for s in data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chips", type=int, default=1000)
    ap.add_argument("--hours", type=float, default=6)
    ap.add_argument("--scrape", type=int, default=15, help="scrape interval of the simulated data, s")
    ap.add_argument("--step", type=float, default=30, help="range query step, s")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--no-compact", dest="compact", action="store_false",
                    help="query the collector's store as ingested, without compacting closed hours first")
    args = ap.parse_args(argv)
    prom = shutil.which("prometheus")
    if not prom:
        print("prometheus is not installed (Debian package `prometheus`); it is the peer of this benchmark")
        return 2
    duration = int(args.hours * 3600)
    end_ms = (int(time.time()) // 60) * 60 * 1000
    series = [s for s in fleet.fleet(args.chips, duration, args.scrape, end_ms) if s[0]["__name__"] in METRICS]
    samples = sum(len(ts) for _, ts, _ in series)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "prometheus.yml").write_text("global:\n  scrape_interval: 1h\n")
        # The store's maintenance job (rollups, compaction) is left to run after the load, not
        # during it: it shares the write lock with ingest, and its timing would make runs differ.
        (tmp / "collector.yaml").write_text("storage:\n  maintenance_interval_s: 86400\n")
        pport, cport = free_port(), free_port()
        prom_cmd = [prom, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{pport}", "--web.enable-remote-write-receiver",
                    "--storage.tsdb.retention.time=2d", "--log.level=warn"]
        col_cmd = [PYTHON, "-m", "shopfloor", "collector", "--config", str(tmp / "collector.yaml"),
                   "--listen", f"127.0.0.1:{cport}", "--db", str(tmp / "c.duckdb"), "--log-level", "warning"]
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
        purl, curl = f"http://127.0.0.1:{pport}", f"http://127.0.0.1:{cport}"
        with running(prom_cmd, ready_url=purl + "/-/ready", log=tmp / "prometheus.log", timeout=120):
            t0 = time.perf_counter()
            fleet.push(purl + "/api/v1/write", series)
            t_prom = time.perf_counter() - t0
            with running(col_cmd, ready_url=curl + "/-/healthy", log=tmp / "collector.log", env=env, cwd=ROOT,
                         timeout=120):
                t0 = time.perf_counter()
                fleet.push(curl + "/api/v1/write", series)
                t_col = time.perf_counter() - t0
            t_compact = 0.0
            if args.compact:
                # Steady state of a running collector: closed hours compacted (sorted by series)
                # by the store's own maintenance step, as Prometheus compacts its head into blocks.
                from collector.store import maintenance
                from collector.store.core import Store
                t0 = time.perf_counter()
                store = Store(str(tmp / "c.duckdb"))
                maintenance.compact(store, end_ms + 7_200_000, 3_600_000)
                store.close()
                t_compact = time.perf_counter() - t0
            print(f"data: {args.chips} chips x {len(METRICS)} metrics, {args.hours:g} h at {args.scrape} s: "
                  f"{samples:,} samples (remote write: Prometheus {t_prom:.1f} s, collector {t_col:.1f} s; "
                  f"compaction {t_compact:.1f} s)")
            start, end = end_ms / 1000 - duration + 300, end_ms / 1000
            results = []
            with running(col_cmd, ready_url=curl + "/-/healthy", log=tmp / "collector.log", env=env, cwd=ROOT,
                         timeout=120), httpx.Client() as client:
                for name, q in QUERIES.items():
                    timed(client, purl, q, start, end, args.step)    # warm both once
                    timed(client, curl, q, start, end, args.step)
                    tp, tc, points = [], [], (0, 0)
                    for _ in range(args.repeat):
                        d, pp = timed(client, purl, q, start, end, args.step)
                        tp.append(d)
                        d, pc = timed(client, curl, q, start, end, args.step)
                        tc.append(d)
                        points = (pp, pc)
                    mp, mc = statistics.median(tp), statistics.median(tc)
                    results.append({"query": name, "promql": q, "prometheus_s": mp, "collector_s": mc,
                                    "ratio": mc / mp, "points": points[1], "points_prometheus": points[0]})
                    print(f"{name:30} Prometheus {mp * 1000:8.1f} ms  collector {mc * 1000:8.1f} ms  "
                          f"ratio {mc / mp:5.2f}  ({points[1]} points; Prometheus {points[0]})")
    if args.json:
        Path(args.json).write_text(json.dumps({"chips": args.chips, "hours": args.hours, "samples": samples,
                                               "step_s": args.step, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
