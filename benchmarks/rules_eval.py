"""Time to evaluate the shipped alert rules (alerts/shopfloor.yaml) once, in the collector and in
Prometheus, on the same simulated fleet.

    .venv/bin/python benchmarks/rules_eval.py [--nodes 40] [--chips 8] [--minutes 60] [--repeat 5]

Data: every series the rules read, for --nodes NVIDIA nodes with --chips GPUs each (XID and ECC
counters, row-remap flags, clock-event reasons, NVLinks, power and limits, EFA counters and port
state, host temperatures, agent and collector self-metrics, health states), one sample a minute
for --minutes, ending now. The same rows go into the collector's DuckDB store through
Writer.write and into Prometheus as a TSDB block (promtool tsdb create-blocks-from openmetrics).

Ours: RuleManager.evaluate() per group at "now" (the real collector code path: PromQL engine over
DuckDB, alert state machine, templating), median of --repeat runs after one warm-up, one thread.
Peer: Prometheus 2.42 (Debian package) loading that block with the same rule file (group
intervals shortened to 2s), reporting prometheus_rule_group_last_duration_seconds per group;
median of --repeat readings one evaluation apart. Prometheus uses all cores for its own work but
evaluates a group's rules sequentially, as we do.
The ratio is ours / Prometheus per group and in total (higher = slower than Prometheus).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.catalog import catalog  # noqa: E402
from collector.promql.engine import Engine  # noqa: E402
from collector.rules.evaluator import RuleManager  # noqa: E402
from collector.rules.loader import load_rule_files  # noqa: E402
from collector.store.core import Store  # noqa: E402
from collector.store.writer import Writer  # noqa: E402
from tests.support import free_port, require_binary, running  # noqa: E402

P = catalog().prom
REASONS = ["idle", "sw_power_cap", "hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake"]


def fleet_rows(nodes: int, chips: int, end_s: int, minutes: int):
    """(metric, labels, ts_ms, value) rows of the fleet, one sample a minute."""
    for n in range(nodes):
        node = {"cluster": f"c{n % 2}", "rack": f"r{n // 8:02d}", "node": f"gpu-{n:04d}"}
        series: list[tuple[str, dict, callable]] = []
        for c in range(chips):
            chip = {**node, "chip": str(c), "uuid": f"GPU-{n:04d}-{c}", "vendor": "nvidia", "model": "NVIDIA B200"}
            series += [
                (P("hw.gpu.xid.errors"), {**chip, "xid": "13"}, lambda k, c=c: k // 20),
                (P("hw.gpu.xid.errors"), {**chip, "xid": "79"}, lambda k, n=n, c=c: int(n == 3 and c == 1 and k > 50)),
                (P("hw.gpu.row_remap.failure"), chip, lambda k: 0),
                (P("hw.gpu.row_remap.pending"), chip, lambda k, n=n, c=c: int(n == 5 and c == 2)),
                (P("hw.power"), chip, lambda k, c=c: 700 + 250 * math.sin(k / 9 + c)),
                (P("hw.power.limit"), chip, lambda k: 1000),
                (P("shopfloor.health.state"), {**chip, "state": "healthy"}, lambda k: 1),
                (P("shopfloor.health.state"), {**chip, "state": "failing"}, lambda k: 0),
            ]
            for scope in ("volatile", "aggregate"):
                for typ in ("corrected", "uncorrected"):
                    series.append((P("hw.gpu.ecc.errors"), {**chip, "memory": "device", "type": typ, "scope": scope},
                                   lambda k, typ=typ: k * 3 if typ == "corrected" else 0))
            for r in REASONS:
                series.append((P("hw.gpu.clock.event.active"), {**chip, "reason": r},
                               lambda k, r=r, c=c: int(r == "sw_power_cap" and (k + c) % 3 == 0)))
            for link in range(4):
                series.append((P("hw.gpu.nvlink.up"), {**chip, "link": str(link)}, lambda k: 1))
        for dev in ("rdmap16s27", "rdmap32s27"):
            port = {**node, "device": dev, "port": "1"}
            series.append((P("hw.network.up"), port, lambda k: 1))
            for counter, per_min in (("tx_pkts", 6e6), ("rx_pkts", 6e6), ("rx_drops", 30), ("retrans_pkts", 900),
                                     ("unresponsive_remote_events", 0)):
                series.append((P("hw.efa.port.stat"), {**port, "counter": counter}, lambda k, r=per_min: k * r))
        series += [
            (P("hw.host.temperature"), {**node, "sensor": "coretemp/Package id 0"}, lambda k: 70 + 5 * math.sin(k / 7)),
            (P("hw.host.temperature.limit"), {**node, "sensor": "coretemp/Package id 0", "threshold": "max"}, lambda k: 100),
            (P("shopfloor.agent.spool.usage"), node, lambda k: 0),
            (P("shopfloor.agent.spool.batches"), node, lambda k: 0),
            (P("shopfloor.agent.spool.dropped"), node, lambda k: 0),
        ]
        for src in ("nvml", "dcgm", "efa", "power", "xid", "neuron"):
            ok = src != "neuron"
            series.append((P("shopfloor.agent.scrape.success"), {**node, "source": src}, lambda k, ok=ok: int(ok)))
            series.append((P("shopfloor.agent.source.supported"), {**node, "source": src}, lambda k, ok=ok: int(ok)))
        for name, labels, fn in series:
            for k in range(minutes):
                yield name, labels, (end_s - (minutes - 1 - k) * 60) * 1000, float(fn(k))


def openmetrics(rows, path: Path) -> int:
    by_name: dict[str, list] = {}
    for name, labels, ts, v in rows:
        by_name.setdefault(name, []).append((labels, ts, v))
    n = 0
    with open(path, "w") as f:
        for name, samples in by_name.items():
            f.write(f"# TYPE {name} unknown\n")
            for labels, ts, v in samples:
                lb = ",".join(f'{k}="{val}"' for k, val in labels.items())
                f.write(f"{name}{{{lb}}} {v} {ts / 1000:.3f}\n")
                n += 1
        f.write("# EOF\n")
    return n


def ours(rule_file: Path, rows, tmp: Path, now_s: float, repeat: int) -> tuple[dict[str, float], int]:
    store = Store(str(tmp / "bench.duckdb"))
    writer = Writer(store)
    batch, n = [], 0
    for row in rows:
        batch.append(row)
        if len(batch) >= 200_000:
            n += writer.write(batch).accepted
            batch = []
    n += writer.write(batch).accepted
    store.con.execute("CHECKPOINT")
    manager = RuleManager(load_rule_files([str(rule_file)]), Engine(store))
    times: dict[str, float] = {}
    for g in manager.groups:
        manager.evaluate(g, now_s)                       # warm-up (and state)
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            manager.evaluate(g, now_s)
            runs.append(time.perf_counter() - t0)
        bad = [r.name for r in g.rules if r.health != "ok"]
        assert not bad, f"rules failed in our evaluation: {bad}"
        times[g.name] = statistics.median(runs)
    firing = {a["labels"]["alertname"] for a in manager.active_alerts()}
    store.close()
    return times, n, firing


def prometheus(rule_file: Path, om: Path, tmp: Path, repeat: int) -> dict[str, float]:
    promtool = require_binary("promtool")
    prom = require_binary("prometheus")
    data = tmp / "prom-data"
    subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(om), str(data)], check=True,
                   capture_output=True, timeout=900)
    rules = yaml.safe_load(rule_file.read_text())
    for g in rules["groups"]:
        g["interval"] = "2s"
    fast = tmp / "rules.yaml"
    fast.write_text(yaml.safe_dump(rules))
    cfg = tmp / "prometheus.yml"
    cfg.write_text(yaml.safe_dump({"global": {"evaluation_interval": "2s"}, "rule_files": [str(fast)]}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    readings: dict[str, list[float]] = {}
    with running([prom, f"--config.file={cfg}", f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{port}",
                  "--storage.tsdb.retention.time=30d"], ready_url=url + "/-/ready", timeout=120,
                 log=tmp / "prometheus.log"):
        time.sleep(5)
        for _ in range(repeat):
            text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
            for m in re.finditer(r'prometheus_rule_group_last_duration_seconds\{rule_group="[^;]*;([^"]+)"\} (\S+)', text):
                readings.setdefault(m.group(1), []).append(float(m.group(2)))
            time.sleep(2.2)
        alerts = json.load(urllib.request.urlopen(url + "/api/v1/alerts", timeout=10))["data"]["alerts"]
    return {g: statistics.median(v) for g, v in readings.items()}, {a["labels"]["alertname"] for a in alerts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=40)
    ap.add_argument("--chips", type=int, default=8)
    ap.add_argument("--minutes", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    rule_file = ROOT / "alerts" / "shopfloor.yaml"
    now_s = int(time.time()) // 60 * 60
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = list(fleet_rows(args.nodes, args.chips, now_s, args.minutes))
        series = len({(r[0], tuple(sorted(r[1].items()))) for r in rows})
        print(f"fleet: {args.nodes} nodes x {args.chips} chips, {series} series, {len(rows)} samples "
              f"({args.minutes} min at 60 s)")
        om = tmp / "fleet.om"
        openmetrics(rows, om)
        peer, peer_firing = prometheus(rule_file, om, tmp, args.repeat)
        mine, n, firing = ours(rule_file, rows, tmp, time.time(), args.repeat)
        assert n == len(rows)
    print(f"{'group':24} {'collector ms':>13} {'prometheus ms':>14} {'ratio':>7}")
    for g in mine:
        p = peer.get(g)
        ratio = f"{mine[g] / p:7.1f}" if p else "    n/a"
        print(f"{g:24} {mine[g] * 1000:13.1f} {(p or float('nan')) * 1000:14.1f} {ratio}")
    total, ptotal = sum(mine.values()), sum(peer.values())
    print(f"{'all groups':24} {total * 1000:13.1f} {ptotal * 1000:14.1f} {total / ptotal:7.1f}")
    print(f"alerts active (pending or firing): collector {sorted(firing)}; prometheus {sorted(peer_firing)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
