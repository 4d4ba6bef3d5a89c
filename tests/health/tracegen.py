"""A tiny trace writer for the health unit tests ONLY (the backtest and training use the real
simulator, `shopfloor simulate --out`). It writes the trace directory format of
docs/trace-format.md with exactly the samples a test asks for, so each rule can be exercised on
crafted data."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from agent.catalog import catalog

START_MS = 1_767_225_600_000   # 2026-01-01T00:00Z
HOUR = 3_600_000


def labels_json(labels: dict) -> str:
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


@dataclass
class Trace:
    nodes: int = 2
    chips: int = 2
    hours: int = 48
    step_s: int = 300
    cluster: str = "c1"
    vendor: str = "nvidia"
    rows: list = field(default_factory=list)          # (ts, name, labels_json, value)
    failures: list = field(default_factory=list)
    jobs: list = field(default_factory=list)
    storms: list = field(default_factory=list)
    silent: dict = field(default_factory=dict)        # (node, chip) -> silent from ts

    def node(self, n: int) -> str:
        return f"n{n:03d}"

    def rack(self, n: int) -> str:
        return f"r{n // 4}"

    def chip_labels(self, n: int, c: int, **extra) -> dict:
        model = "NVIDIA B200" if self.vendor == "nvidia" else "trainium2"
        return {"cluster": self.cluster, "node": self.node(n), "rack": self.rack(n), "chip": str(c),
                "uuid": f"GPU-{n:03d}-{c}", "vendor": self.vendor, "model": model, **extra}

    def steps(self):
        return range(START_MS, START_MS + self.hours * HOUR, self.step_s * 1000)

    def baseline(self, temp: float = 55.0):
        """Every chip reports temperature, slowdown limit, ECC and PCIe counters each step."""
        prom = catalog().prom
        for n in range(self.nodes):
            for c in range(self.chips):
                for ts in self.steps():
                    if ts >= self.silent.get((n, c), 1 << 62):
                        continue
                    self.add(ts, prom("hw.temperature"), self.chip_labels(n, c, sensor="gpu"), temp)
                    self.add(ts, prom("hw.temperature.limit"),
                             self.chip_labels(n, c, sensor="gpu", threshold="slowdown"), 87.0)
                    self.add(ts, prom("hw.gpu.pcie.replays"), self.chip_labels(n, c), 0.0)
            for ts in self.steps():
                self.add(ts, prom("hw.network.up"),
                         {"cluster": self.cluster, "node": self.node(n), "rack": self.rack(n),
                          "device": "rdmap0", "port": "1"}, 1.0)
        return self

    def add(self, ts: int, name: str, labels: dict, value: float):
        self.rows.append((int(ts), name, labels_json(labels), float(value)))

    def counter(self, n: int, c: int, otel: str, increments: dict[int, float], from_ts: int | None = None, **extra):
        """A cumulative counter on chip (n, c): increments {ts: amount}; reported every step from
        `from_ts` (default: the start)."""
        name = catalog().prom(otel)
        total, pending = 0.0, sorted(increments.items())
        for ts in self.steps():
            while pending and pending[0][0] <= ts:
                total += pending.pop(0)[1]
            if from_ts is not None and ts < from_ts:
                continue
            if ts >= self.silent.get((n, c), 1 << 62):
                continue
            self.add(ts, name, self.chip_labels(n, c, **extra), total)

    def gauge(self, n: int, c: int, otel: str, values: dict[int, float], **extra):
        """A gauge that holds each value from its ts until the next one."""
        name = catalog().prom(otel)
        pts = sorted(values.items())
        for ts in self.steps():
            cur = None
            for t0, v in pts:
                if t0 <= ts:
                    cur = v
            if cur is not None and ts < self.silent.get((n, c), 1 << 62):
                self.add(ts, name, self.chip_labels(n, c, **extra), cur)

    def efa(self, n: int, per_step: dict[int, float], counter: str = "retrans_pkts"):
        """An EFA port counter on node n: `per_step` {from ts: increment per step}, each held
        until the next (none before the first)."""
        name = catalog().prom("hw.efa.port.stat")
        labels = {"cluster": self.cluster, "node": self.node(n), "rack": self.rack(n), "device": "rdmap0",
                  "port": "1", "counter": counter}
        total, pts = 0.0, sorted(per_step.items())
        for ts in self.steps():
            rates = [v for t0, v in pts if t0 <= ts]
            total += rates[-1] if rates else 0.0
            self.add(ts, name, labels, total)

    def write(self, out: str) -> str:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        meta = {"version": 1, "seed": 0, "start_ms": START_MS, "duration_s": self.hours * 3600,
                "step_s": self.step_s, "nodes": self.nodes, "chips_per_node": self.chips}
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump(meta, f)
        ts, name, labels, value = zip(*self.rows) if self.rows else ((), (), (), ())
        table = pa.table({"ts": pa.array(ts, pa.int64()), "name": pa.array(name, pa.string()),
                          "labels": pa.array(labels, pa.string()), "value": pa.array(value, pa.float64())})
        # one file per day, as the simulator writes
        import pyarrow.compute as pc
        day = pc.divide(table["ts"], 86_400_000)
        for d in sorted(set(day.to_pylist())):
            pq.write_table(table.filter(pc.equal(day, d)), os.path.join(out, "samples", f"d{d}.parquet"))
        model = "NVIDIA B200" if self.vendor == "nvidia" else "trainium2"
        pq.write_table(pa.table({
            "node": [self.node(n) for n in range(self.nodes)], "cluster": [self.cluster] * self.nodes,
            "rack": [self.rack(n) for n in range(self.nodes)], "vendor": [self.vendor] * self.nodes,
            "model": [model] * self.nodes, "chips": [self.chips] * self.nodes, "lemon": [False] * self.nodes,
        }), os.path.join(out, "nodes.parquet"))
        f = self.failures
        pq.write_table(pa.table({
            "ts": pa.array([x["ts"] for x in f], pa.int64()), "cluster": pa.array([x.get("cluster", self.cluster) for x in f], pa.string()),
            "rack": pa.array([x["rack"] for x in f], pa.string()), "node": pa.array([x["node"] for x in f], pa.string()),
            "chip": pa.array([x["chip"] for x in f], pa.string()), "uuid": pa.array([x.get("uuid", "") for x in f], pa.string()),
            "mode": pa.array([x["mode"] for x in f], pa.string()),
            "precursor_start": pa.array([x.get("precursor_start") for x in f], pa.int64()),
            "lemon": pa.array([False for _ in f], pa.bool_()),
        }), os.path.join(out, "failures.parquet"))
        j = self.jobs
        pq.write_table(pa.table({
            "job": pa.array([x[0] for x in j], pa.string()), "node": pa.array([x[1] for x in j], pa.string()),
            "start": pa.array([x[2] for x in j], pa.int64()), "end": pa.array([x[3] for x in j], pa.int64()),
        }), os.path.join(out, "jobs.parquet"))
        s = self.storms
        pq.write_table(pa.table({
            "ts": pa.array([x[0] for x in s], pa.int64()), "job": pa.array([x[1] for x in s], pa.string()),
            "xid": pa.array([x[2] for x in s], pa.int64()), "nodes": pa.array([x[3] for x in s], pa.list_(pa.string())),
        }), os.path.join(out, "storms.parquet"))
        return out
