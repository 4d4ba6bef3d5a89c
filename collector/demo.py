"""`shopfloor demo`: the collector on an embedded DuckDB file plus a simulated fleet pushing to it.

    shopfloor demo                       # 16 nodes (B200 + Trainium2), 3 h of history, then live
    shopfloor demo --duration 60         # stop by itself after 60 s (tests, CI)
    shopfloor demo --dir var/demo        # keep the DuckDB file (default: a fresh temp dir)

What it does, in order:
1. starts the collector in this process (uvicorn in a thread) on <dir>/shopfloor.duckdb, with the
   repository's alert rules when they are present;
2. backfills --history of fleet telemetry as fast as the collector takes it: `shopfloor simulate`
   (the fleet simulator) pushes through the agent's real OTLP exporter, one request per node per
   step, exactly like real agents;
3. runs the storage maintenance once (rollups, so the capacity views have data at once);
4. starts the live fleet (the same seed, so the same nodes and chips) in real time, and prints a
   few live figures every --every seconds until Ctrl-C or --duration.
Needs nothing else running; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _seconds(text: str) -> int:
    from collector.config import ConfigError, parse_duration

    try:
        return int(parse_duration(text, "duration"))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shopfloor demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="127.0.0.1:9600", help="collector HOST:PORT (default 127.0.0.1:9600)")
    p.add_argument("--dir", help="where the DuckDB file goes (default: a new temp dir)")
    p.add_argument("--nodes", type=int, default=16, help="simulated nodes (default 16)")
    p.add_argument("--trainium-share", type=float, default=0.25, help="share of Trainium2 nodes (default 0.25)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--history", type=_seconds, default=3 * 3600, help="history to backfill first (default 3h; 0 = none)")
    p.add_argument("--history-step", type=_seconds, default=60, help="step of the backfilled history (default 60s)")
    p.add_argument("--step", type=_seconds, default=10, help="live sample interval (default 10s)")
    p.add_argument("--duration", type=_seconds, default=0, help="stop after this long (default: run until Ctrl-C)")
    p.add_argument("--every", type=_seconds, default=10, help="print live figures this often (default 10s)")
    return p


def _simulate(url: str, args, start_s: int, duration_s: int, step_s: int, realtime: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "shopfloor", "simulate", "--nodes", str(args.nodes),
           "--trainium-share", str(args.trainium_share), "--seed", str(args.seed),
           "--start", str(start_s), "--duration", f"{duration_s}s", "--step", f"{step_s}s",
           "--endpoint", url + "/v1/metrics", "--realtime" if realtime else "--fast"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class Figures:
    """Live numbers read from the store (the same data the APIs serve)."""

    def __init__(self, ctx, db: Path):
        self.ctx = ctx
        self.db = db
        self.last = (time.monotonic(), self.samples())

    def samples(self) -> int:
        return int(sum(s.value for m in self.ctx.registry.collect() for s in m.samples
                       if s.name == "shopfloor_collector_ingest_samples_total" and s.labels.get("outcome") == "accepted"))

    def line(self) -> str:
        from agent.catalog import catalog

        now, n = time.monotonic(), self.samples()
        rate = (n - self.last[1]) / max(now - self.last[0], 1e-9)
        self.last = (now, n)
        cur = self.ctx.store.cursor()
        try:
            power = cur.execute(
                "SELECT sum(value) FROM (SELECT arg_max(s.value, s.ts) AS value FROM samples s "
                "JOIN series se ON se.id = s.series_id WHERE se.metric = ? AND s.ts > ? GROUP BY s.series_id)",
                [catalog().prom("hw.power"), int(time.time() * 1000) - 120_000]).fetchall()[0][0]
        finally:
            cur.close()
        size = sum(p.stat().st_size for p in self.db.parent.glob(self.db.name + "*") if p.is_file())
        power_txt = f"{power / 1000:.1f} kW" if power else "-"
        return (f"series {self.ctx.store.series_count():>7,}  samples {n:>11,}  ingest {rate:>9,.0f}/s  "
                f"GPU power now {power_txt:>9}  db {size / 2**20:,.1f} MiB")


def banner(url: str, db: Path, args) -> str:
    q = "sum by (cluster, model) (hw_power_watts)"
    sql = "SELECT * FROM accelerator_hours_daily"
    return f"""
Shopfloor demo
  collector        {url}           (Prometheus data source URL for Grafana)
  DuckDB file      {db}
  OTLP/HTTP        {url}/v1/metrics     remote write {url}/api/v1/write
  PromQL           curl -s '{url}/api/v1/query' --data-urlencode 'query={q}'
  SQL              curl -s {url}/api/v1/sql -d '{{"query": "{sql}"}}'
                   shopfloor sql "SELECT * FROM power_per_rack_hourly ORDER BY hour DESC LIMIT 5" --url {url}
  self-metrics     {url}/metrics
  Grafana          provision dashboards/provisioning (or docker compose -f docker/compose.yaml up grafana)
                   with a Prometheus data source at {url}
  fleet            {args.nodes} simulated nodes, {args.trainium_share:.0%} Trainium2, seed {args.seed}
"""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import duckdb
    import uvicorn

    from collector.app import create_app, make_context
    from collector.config import ConfigError, load
    from collector.store import maintenance

    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="shopfloor-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "shopfloor.duckdb"
    rules = {"rule_files": [str(ROOT / "alerts" / "*.yaml")]} if (ROOT / "alerts").is_dir() else {}
    try:
        config = load(None, env={}, overrides={"listen": args.listen, "db": str(db), "rules": rules,
                                                "storage": {"maintenance_interval_s": 30}})
        ctx = make_context(config)
        app = create_app(config, ctx)
    except (ConfigError, OSError, ValueError, duckdb.IOException) as exc:
        print(f"shopfloor demo: {exc}", file=sys.stderr)
        return 2
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, name="collector", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        print(f"shopfloor demo: the collector did not start on {args.listen} (port in use?)", file=sys.stderr)
        return 1
    url = f"http://{config.host}:{config.port}"
    print(banner(url, db, args), flush=True)

    figures = Figures(ctx, db)
    sim = None
    t_end = time.monotonic() + args.duration if args.duration else None
    code = 0
    try:
        now_s = int(time.time())
        if args.history:
            print(f"backfilling {args.history // 60} min of history at {args.history_step}s steps ...", flush=True)
            sim = _simulate(url, args, now_s - args.history, args.history, args.history_step, realtime=False)
            while sim.poll() is None:
                time.sleep(1)
                if t_end and time.monotonic() > t_end:
                    print("--duration ran out during the backfill: the history is partial and the "
                          "live fleet is skipped (give a longer --duration or a shorter --history)", flush=True)
                    break
            if sim.poll() not in (0, None):
                print(f"shopfloor demo: the backfill failed: {sim.stderr.read()[-2000:]}", file=sys.stderr)
                return 1
            _stop(sim)
            done = maintenance.run_once(ctx)
            print(f"history loaded: {figures.line()}\n  rollups: {done.get('rollup_5m_rows', 0):,} x 5m, "
                  f"{done.get('rollup_1h_rows', 0):,} x 1h", flush=True)
        live_for = args.duration or 7 * 86400
        sim = _simulate(url, args, int(time.time()), live_for + 60, args.step, realtime=True)
        print(f"live: {args.nodes} nodes every {args.step}s (Ctrl-C to stop)", flush=True)
        next_print = time.monotonic() + args.every
        while t_end is None or time.monotonic() < t_end:
            time.sleep(0.2)
            if sim.poll() is not None:
                print(f"shopfloor demo: the simulator stopped: {sim.stderr.read()[-2000:]}", file=sys.stderr)
                code = 1
                break
            if time.monotonic() >= next_print:
                print(figures.line(), flush=True)
                next_print += args.every
        if code == 0:
            print(f"final: {figures.line()}", flush=True)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        _stop(sim)
        server.should_exit = True
        thread.join(30)
    if code == 0 and figures.samples() == 0:
        print("shopfloor demo: no samples arrived", file=sys.stderr)
        code = 1
    print(f"the data stays in {db}", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
