"""Ingest benchmark: the collector against Prometheus 2.42 on the same fleet samples, same run.

    .venv/bin/python benchmarks/ingest.py [--nodes 16] [--minutes 30] [--step 10] [--clients 8]
                                          [--protocol otlp|remote_write]

With --protocol remote_write the collector is fed the very remote-write requests Prometheus gets.

1. Renders a simulated fleet (agent.simulate: mixed B200 / Trainium2 nodes, every catalog metric)
   for --minutes of history ending at the last UTC midnight at least an hour ago (a closed day,
   so the daily merge runs), and encodes each node's collection at each step
   twice: as the agent's OTLP/HTTP request (agent.export.otlp.encode_request, gzip, as agents
   send it) and as a Prometheus remote-write 1.0 request with the same series and samples
   (snappy). Encoding is done before any clock starts.
2. Starts the collector (`shopfloor collector`, its own process, fresh DuckDB file) and pushes the
   OTLP requests with --clients concurrent HTTP clients; each client owns a set of nodes and
   sends them in time order, as agents do. The first step's requests warm the server up (and
   the collector's compiled OTLP decoder is waited for); the clock then runs over the rest:
   rate = accepted samples / wall time from the first request to the last acknowledgement (an
   acknowledgement means committed to DuckDB's WAL). The clients (http.client, one keep-alive
   connection each) run on the same 2 cores as the server.
3. Starts Prometheus 2.42 (--web.enable-remote-write-receiver, temp --storage.tsdb.path) and
   pushes the remote-write requests the same way, warm-up included. (Prometheus acknowledges after appending to
   its head and WAL; it does not fsync per request.)
4. Bytes per sample, on the same data:
   - collector: ingest runs with the maintenance job held off (as in steady state, where an hour
     is compacted once, after it closed, not while its samples arrive); then the collector is
     restarted with a 2 s maintenance interval and runs its passes (rollups, hourly compaction,
     the daily merge) until the day is merged; it is stopped (CHECKPOINT), and the DuckDB file
     size is divided by the samples. Each table is also copied as it lies into a fresh DuckDB
     file (bytes per sample per table), and, for comparison, the samples alone as a plain (series_id, ts, value) table sorted by (series_id, ts).
   - Prometheus: POST /api/v1/admin/tsdb/snapshot writes the head into a persistent block (the
     same compressed format as a head compaction); the snapshot's size / samples.
Prints one JSON document with both figures and the ratios.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cramjam  # noqa: E402
import httpx  # noqa: E402
import yaml  # noqa: E402

from tests.support import free_port, stop, wait_http  # noqa: E402


def render(nodes: int, minutes: int, step_s: int):
    """[(node, step, otlp_gzip_body, remote_write_body, samples)] in time order."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    from agent.export.otlp import encode_request
    from agent.simulate.push import node_batches, step_points
    from agent.simulate.scenario import build_scenario
    from agent.simulate.signals import Labeler, Renderer
    from collector.receive.otlp import Translator
    from collector.receive.remote_write import WriteRequest

    end_ms = (int(time.time()) - 3600) // 86_400 * 86_400 * 1000   # a UTC midnight: a closed day
    start_ms = end_ms - minutes * 60_000
    sc = build_scenario(1, start_ms, minutes * 60, nodes, None, 0.25)
    renderer = Renderer(sc, step_s, "all")
    labeler = Labeler(renderer)
    translator = Translator(None, None)
    out = []
    step = 0
    for block in renderer.blocks(renderer.steps(), 60, block_seed=0):
        batches = node_batches(block, labeler)
        for t, ts in enumerate(block.ts.tolist()):
            for node in sorted(batches):
                points = step_points(batches[node], t, ts * 1_000_000)
                if not points:
                    continue
                body = encode_request(points, labeler.resource(node), sc.start_ms * 1_000_000, ts * 1_000_000)
                # the same samples as remote write: the collector's own OTLP -> Prometheus naming
                req = ExportMetricsServiceRequest.FromString(body)
                rw = WriteRequest()
                for rm in req.resource_metrics:
                    _, base = translator.base_labels(rm.resource)
                    for sm in rm.scope_metrics:
                        for m in sm.metrics:
                            kind = m.WhichOneof("data")
                            container = getattr(m, kind)
                            inst = "gauge" if kind == "gauge" else ("counter" if m.sum.is_monotonic else "updowncounter")
                            name = translator.name(m.name, m.unit, inst)
                            for dp in container.data_points:
                                labels = {"__name__": name, **translator._labels(base, dp.attributes)}
                                series = rw.timeseries.add()
                                for k in sorted(labels):
                                    series.labels.add(name=k, value=labels[k])
                                series.samples.add(value=dp.as_double, timestamp=dp.time_unix_nano // 1_000_000)
                out.append((node, step, gzip.compress(body, 1),
                            bytes(cramjam.snappy.compress_raw(rw.SerializeToString())), len(points)))
            step += 1
    return out, start_ms, end_ms


def push(url: str, batches, clients: int, headers: dict, ok_codes=(200, 204)) -> tuple[float, int]:
    """Send every batch; client k sends the nodes with node % clients == k, in time order.

    The load generator shares the machine's 2 cores with the server it measures, so it is kept
    lean: the standard library's http.client on one keep-alive connection per client costs
    0.18 ms of CPU per request, httpx 0.61 ms (measured; the same client for both servers)."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

    errors: list[str] = []
    accepted = [0] * clients
    target = urllib.parse.urlsplit(url)

    def run(k: int) -> None:
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        try:
            for node, _, body, n in batches:
                if node % clients != k:
                    continue
                for _attempt in range(20):
                    conn.request("POST", target.path, body=body, headers=headers)
                    r = conn.getresponse()
                    content = r.read()
                    if r.status in (429, 503):
                        time.sleep(float(r.getheader("Retry-After", "1")))
                        continue
                    break
                if r.status not in ok_codes:
                    errors.append(f"{r.status} {content[:200]!r}")
                    return
                rejected = 0
                if (r.getheader("Content-Type") or "").startswith("application/x-protobuf") and content:
                    rejected = ExportMetricsServiceResponse.FromString(content).partial_success.rejected_data_points
                accepted[k] += n - rejected
        finally:
            conn.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{url}: {errors[:3]}")
    return elapsed, sum(accepted)


def timed_push(url: str, batches, clients: int, headers: dict, pid: int, ready=None) -> dict:
    """Warm up on the first step's requests (both servers alike), wait for `ready()` if given,
    then push the rest: rate and CPU per sample are of that timed part only."""
    first = [b for b in batches if b[1] == 0]
    rest = [b for b in batches if b[1] != 0]
    _, warm = push(url, first, 1, headers)
    deadline = time.monotonic() + 180
    while ready is not None and not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: not ready 180 s after the warm-up")
        time.sleep(0.5)
    cpu0 = cpu_seconds(pid)
    elapsed, accepted = push(url, rest, clients, headers)
    return {"seconds": round(elapsed, 2), "accepted_samples": warm + accepted, "timed_samples": accepted,
            "samples_per_s": round(accepted / elapsed),
            "cpu_us_per_sample": round((cpu_seconds(pid) - cpu0) / accepted * 1e6, 3)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (/proc): steadier than rates on a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _start_collector(tmp: Path, port: int, db: Path, clients: int, maintenance_s: float, log):
    cfg = tmp / "collector.yaml"
    cfg.write_text(yaml.safe_dump({
        "ingest": {"max_inflight": clients, "queue_timeout_s": 30},
        "storage": {"maintenance_interval_s": maintenance_s, "compact_after_s": 0},
        "rules": {"self_metrics": False}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "shopfloor", "collector", "--config", str(cfg), "--listen", f"127.0.0.1:{port}",
           "--db", str(db), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/-/healthy", 120, proc)
    return proc


def _stop_collector(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)   # graceful: the collector CHECKPOINTs on the way out
    proc.wait(120)


def _sql(url: str, query: str):
    return httpx.post(url + "/api/v1/sql", json={"query": query}, timeout=60).json()["data"]["rows"]


REMOTE_WRITE_HEADERS = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
                        "X-Prometheus-Remote-Write-Version": "0.1.0"}


def bench_collector(tmp: Path, batches, clients: int, end_ms: int, protocol: str = "otlp") -> dict:
    port = free_port()
    db = tmp / "collector.duckdb"
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "collector.log", "wb")
    proc = None
    try:
        proc = _start_collector(tmp, port, db, clients, 86_400, log)   # no maintenance pass while pushing
        # timed once the protocol's compiled decoder is in use (loaded in the background after
        # the first request; see collector/receive/common.py, LoadedInBackground)
        ready = f'shopfloor_collector_ingest_wire_path{{protocol="{protocol}"}} 1.0'
        if protocol == "otlp":
            path, headers = "/v1/metrics", {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}
            bodies = [(n, s, o, k) for n, s, o, _, k in batches]
        else:
            path, headers = "/api/v1/write", REMOTE_WRITE_HEADERS
            bodies = [(n, s, rw, k) for n, s, _, rw, k in batches]
        pushed = timed_push(url + path, bodies, clients, headers, proc.pid,
                            ready=lambda: ready in httpx.get(url + "/metrics").text)
        _stop_collector(proc)
        proc = _start_collector(tmp, port, db, clients, 2, log)
        # wait for the maintenance job to compact every closed hour and merge the closed day
        day_end = ((end_ms - 1) // 86_400_000 + 1) * 86_400_000
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            rows = _sql(url, "SELECT done_until FROM maintenance_state WHERE job = 'merge'")
            if rows and rows[0][0] >= day_end:
                break
            time.sleep(1)
        else:
            raise RuntimeError("the maintenance job did not merge the day in 15 minutes")
        stored = _sql(url, "SELECT count(*) FROM samples")[0][0]
    except Exception:
        log.flush()
        sys.stderr.write((tmp / "collector.log").read_text(errors="replace")[-4000:])
        raise
    finally:
        if proc is not None:
            _stop_collector(proc)
        log.close()
    import duckdb

    con = duckdb.connect(str(db))   # the collector has stopped; nothing is written to it here
    compression = con.execute("SELECT column_name, compression, count(*) FROM pragma_storage_info('samples_cold') "
                              "WHERE segment_type <> 'VALIDITY' GROUP BY ALL ORDER BY ALL").fetchall()
    _, _, block_size, _, used_blocks, free_blocks, *_ = con.execute("PRAGMA database_size").fetchall()[0]
    con.execute(f"ATTACH '{tmp / 'samples-only.duckdb'}' AS samples_copy")
    con.execute("CREATE TABLE samples_copy.samples AS SELECT * FROM samples ORDER BY series_id, ts")
    per_table = {}
    for table in ("samples_cold", "samples_hot", "rollup_5m_data", "rollup_1h_data", "series", "ingest_batches"):
        copy = tmp / f"table-{table}.duckdb"
        con.execute(f"ATTACH '{copy}' AS table_copy")
        # as it lies (same order); samples_cold's virtual ts column is computed, not stored
        columns = "* EXCLUDE (ts)" if table == "samples_cold" else "*"
        con.execute(f"CREATE TABLE table_copy.t AS SELECT {columns} FROM {table}")
        rows = con.execute("SELECT count(*) FROM table_copy.t").fetchall()[0][0]
        con.execute("DETACH table_copy")
        empty = tmp / f"table-{table}-empty.duckdb"   # a file's fixed overhead, left out
        con.execute(f"ATTACH '{empty}' AS table_copy")
        con.execute(f"CREATE TABLE table_copy.t AS SELECT {columns} FROM {table} LIMIT 0")
        con.execute("DETACH table_copy")
        size = copy.stat().st_size - empty.stat().st_size
        per_table[table] = {"rows": rows, "bytes_per_sample": round(size / stored, 3),
                            "bytes_per_row": round(size / max(rows, 1), 2)}
    con.close()
    return {**pushed, "stored_samples": stored,
            "db_file_bytes": db.stat().st_size, "bytes_per_sample_db_file": round(db.stat().st_size / stored, 3),
            "db_used_bytes": used_blocks * block_size, "db_free_blocks": free_blocks,
            "bytes_per_sample_db_used": round(used_blocks * block_size / stored, 3),
            "bytes_per_sample_plain_sorted_copy": round((tmp / "samples-only.duckdb").stat().st_size / stored, 3),
            "bytes_per_sample_per_table_copy": per_table,
            "samples_compression": [list(r) for r in compression]}


def bench_prometheus(tmp: Path, batches, clients: int) -> dict:
    prometheus = shutil.which("prometheus")
    if not prometheus:
        return {"skipped": "prometheus not installed (Debian package prometheus)"}
    port = free_port()
    data = tmp / "prom-data"
    (tmp / "prometheus.yml").write_text("global: {}\n")
    cmd = [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={data}",
           f"--web.listen-address=127.0.0.1:{port}", "--web.enable-remote-write-receiver", "--web.enable-admin-api",
           "--storage.tsdb.retention.time=10y"]
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/-/ready", 60, proc)
        pushed = timed_push(url + "/api/v1/write", [(n, s, rw, k) for n, s, _, rw, k in batches], clients,
                            REMOTE_WRITE_HEADERS, proc.pid)
        head = httpx.get(url + "/api/v1/status/tsdb").json()["data"]["headStats"]
        snap = httpx.post(url + "/api/v1/admin/tsdb/snapshot", timeout=600).json()["data"]["name"]
        snap_bytes = dir_size(data / "snapshots" / snap)
    finally:
        stop(proc, 60)
        log.close()
    return {**pushed, "head_series": head["numSeries"], "snapshot_bytes": snap_bytes,
            "bytes_per_sample_snapshot": round(snap_bytes / pushed["accepted_samples"], 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--minutes", type=int, default=30)
    p.add_argument("--step", type=int, default=10)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--protocol", choices=["otlp", "remote_write"], default="otlp",
                   help="what the collector is fed: the agent's OTLP requests, or the same remote-write "
                        "requests Prometheus gets")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    batches, start_ms, end_ms = render(args.nodes, args.minutes, args.step)
    total = sum(b[4] for b in batches)
    print(f"rendered {len(batches)} requests, {total} samples in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="shopfloor-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "c").mkdir()
        (tmp / "p").mkdir()
        collector = bench_collector(tmp / "c", batches, args.clients, end_ms, args.protocol)
        print(f"collector: {collector['samples_per_s']} samples/s", file=sys.stderr)
        prom = bench_prometheus(tmp / "p", batches, args.clients)
    result = {"command": "benchmarks/ingest.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "protocol": args.protocol, "nodes": args.nodes, "minutes": args.minutes, "step_s": args.step,
              "clients": args.clients,
              "requests": len(batches), "samples": total, "cpus": os.cpu_count(),
              "collector": collector, "prometheus": prom}
    if "samples_per_s" in prom:
        result["rate_ratio_collector_over_prometheus"] = round(collector["samples_per_s"] / prom["samples_per_s"], 3)
        result["cpu_per_sample_ratio_collector_over_prometheus"] = round(
            collector["cpu_us_per_sample"] / prom["cpu_us_per_sample"], 3)
        # samples table: the raw samples as stored (what Prometheus' block holds); DB used: plus
        # series, rollups and batch keys; DB file: plus blocks freed by compaction (reused later)
        peer = prom["bytes_per_sample_snapshot"]
        result["bytes_per_sample_ratio_collector_over_prometheus"] = {
            "samples_table": round(collector["bytes_per_sample_per_table_copy"]["samples_cold"]["bytes_per_sample"]
                                   / peer, 3),
            "db_used": round(collector["bytes_per_sample_db_used"] / peer, 3),
            "db_file": round(collector["bytes_per_sample_db_file"] / peer, 3)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
