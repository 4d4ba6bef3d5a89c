"""A small simulated fleet covering every metric the agent and the health layer emit.

Two clusters: c1 with NVIDIA nodes (4 GPUs each), c2 with Trainium nodes (2 chips each), two racks
each. Label values are the ones the real sources produce (agent/sources/*.py: sensors, thresholds,
clock-event reasons, EFA counter file names, neuron error types ...); values move over time the
way the hardware's do (gauges wander within realistic ranges, counters only grow). Every node's
history is encoded with the agent's own OTLP encoder (agent.export.otlp.encode_request), so it
enters the collector through the real ingest path.

The simulator (agent/simulate) models failures for the health layer; this generator instead
guarantees that every catalog metric and label used by a dashboard panel exists, which is what
the dashboard query test needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.catalog import catalog
from agent.export.otlp import encode_request
from agent.sources.base import Point

NVIDIA_NODES = [("c1", "r1", "gpu-001"), ("c1", "r1", "gpu-002"), ("c1", "r2", "gpu-003")]
TRAINIUM_NODES = [("c2", "r7", "trn-001"), ("c2", "r8", "trn-002")]

CLOCK_REASONS = ["idle", "applications_clocks", "sw_power_cap", "hw_slowdown", "sync_boost",
                 "sw_thermal", "hw_thermal", "hw_power_brake"]
NVLINK_TYPES = ["replay", "recovery", "crc_flit", "crc_data"]
NEURON_ERRORS = ["generic", "numerical", "transient", "model", "runtime", "hardware"]
NEURON_STATUS = ["completed", "completed_with_err", "completed_with_num_err", "timed_out",
                 "incorrect_input", "failed_to_queue"]
PERCENTILES = ["p0", "p1", "p25", "p50", "p75", "p99", "p100"]
EFA_PORT_COUNTERS = {"tx_bytes": 2.0e9, "rx_bytes": 1.9e9, "tx_pkts": 2.5e5, "rx_pkts": 2.4e5, "rx_drops": 3.0,
                     "retrans_pkts": 40.0, "retrans_timeout_events": 0.05, "unresponsive_remote_events": 0.01,
                     "impaired_remote_conn_events": 0.01}
EFA_DEVICE_COUNTERS = {"submitted_cmds": 5.0, "completed_cmds": 5.0, "cmds_err": 0.02, "keep_alive_rcvd": 1.0}
SOURCES = ["nvml", "dcgm", "neuron", "efa", "power", "xid"]
HEALTH_STATES = ["healthy", "watch", "degraded", "failing", "unknown"]


@dataclass(frozen=True)
class Chip:
    cluster: str
    rack: str
    node: str
    index: int
    vendor: str

    @property
    def attrs(self) -> dict[str, str]:
        model = "NVIDIA B200" if self.vendor == "nvidia" else "trainium2"
        prefix = "GPU" if self.vendor == "nvidia" else "TRN"
        return {"chip": str(self.index), "uuid": f"{prefix}-{self.node}-{self.index:02d}",
                "vendor": self.vendor, "model": model}


def chips() -> list[Chip]:
    out = [Chip(c, r, n, i, "nvidia") for c, r, n in NVIDIA_NODES for i in range(4)]
    out += [Chip(c, r, n, i, "aws") for c, r, n in TRAINIUM_NODES for i in range(2)]
    return out


def _wave(k: int, seed: int, period: float = 37.0) -> float:
    """A deterministic value in [0, 1] that wanders over steps."""
    return 0.5 + 0.5 * math.sin(k / period * 2 * math.pi + seed * 1.7)


def node_points(cluster: str, rack: str, node: str, k: int, t_s: float, step_s: int) -> list[Point]:
    """Everything one node reports at step k (t_s seconds since the start of the history)."""
    pts: list[Point] = []

    def add(name: str, value: float, **attrs: str) -> None:
        pts.append(Point(name, float(value), {a: str(v) for a, v in attrs.items()}))

    node_chips = [c for c in chips() if c.node == node]
    for c in node_chips:
        a, s = c.attrs, c.index + 10 * len(node)
        util = 0.35 + 0.6 * _wave(k, s)
        add("hw.gpu.utilization", util, **a)
        limit_b = 192e9 if c.vendor == "nvidia" else 96e9
        add("hw.gpu.memory.usage", limit_b * (0.2 + 0.7 * _wave(k, s + 1)), **a)
        add("hw.gpu.memory.limit", limit_b, **a)
        add("hw.gpu.info", 1, **a, driver_version="570.86.15" if c.vendor == "nvidia" else "2.21.18",
            pci_bus_id=f"0000:{0x18 + c.index:02x}:00.0", instance_type="" if c.vendor == "nvidia" else "trn2.48xlarge")
        memories = ["device"] if c.vendor == "nvidia" else ["hbm", "sram"]
        for mem in memories:
            for typ, per_s in (("corrected", 0.02 * (1 + c.index)), ("uncorrected", 0.0005 if c.index == 1 else 0.0)):
                add("hw.gpu.ecc.errors", math.floor(per_s * t_s), **a, memory=mem, type=typ, scope="volatile")
                add("hw.gpu.ecc.errors", 40 + math.floor(per_s * t_s), **a, memory=mem, type=typ, scope="aggregate")
        if c.vendor == "nvidia":
            add("hw.gpu.memory_controller.utilization", 0.2 + 0.5 * _wave(k, s + 2), **a)
            power = 400 + 550 * util * 0.55
            add("hw.power", power, **a)
            add("hw.power.limit", 1000, **a)
            add("hw.energy", 5e6 + 700 * t_s, **a)
            add("hw.temperature", 50 + 30 * util, **a, sensor="gpu")
            add("hw.temperature", 55 + 25 * util, **a, sensor="memory")
            for sensor, threshold, v in (("gpu", "shutdown", 92), ("gpu", "slowdown", 87), ("memory", "memory_max", 95),
                                         ("gpu", "gpu_max", 85)):
                add("hw.temperature.limit", v, **a, sensor=sensor, threshold=threshold)
            add("hw.gpu.clock", 1.965e9 - 3e8 * _wave(k, s + 3), **a, clock="sm")
            add("hw.gpu.clock", 3.996e9, **a, clock="memory")
            for r in CLOCK_REASONS:
                active = (r == "sw_power_cap" and util > 0.8) or (r == "hw_thermal" and c.index == 3 and k % 20 < 12) \
                    or (r == "idle" and util < 0.4) or (r == "hw_power_brake" and c.index == 2 and k % 30 < 3)
                add("hw.gpu.clock.event.active", 1 if active else 0, **a, reason=r)
            add("hw.gpu.retired_pages", 0, **a, cause="single_bit")
            add("hw.gpu.retired_pages", 0, **a, cause="double_bit")
            add("hw.gpu.retired_pages.pending", 0, **a)
            add("hw.gpu.row_remap.rows", 2 + math.floor(t_s / 3600) if c.index == 1 else 0, **a, type="correctable")
            add("hw.gpu.row_remap.rows", 0, **a, type="uncorrectable")
            add("hw.gpu.row_remap.pending", 1 if c.index == 1 and node == "gpu-002" else 0, **a)
            add("hw.gpu.row_remap.failure", 0, **a)
            add("hw.gpu.pcie.replays", math.floor(0.01 * t_s * (1 + c.index)), **a)
            for link in range(4):
                add("hw.gpu.nvlink.up", 1, **a, link=link)
                for i, typ in enumerate(NVLINK_TYPES):
                    add("hw.gpu.nvlink.errors", math.floor(0.002 * t_s * (i + 1)), **a, link=link, type=typ)
            add("hw.gpu.recovery_action", 0, **a)
            add("hw.gpu.xid.errors", math.floor(t_s / 1800), **a, xid="13")
            add("hw.gpu.xid.errors", 1 if (c.index == 2 and node == "gpu-003" and t_s > 3600) else 0, **a, xid="79")
            for engine, base in (("graphics", 0.9), ("tensor", 0.6), ("dram", 0.4)):
                add("hw.gpu.engine.active", base * util, **a, engine=engine)
            add("hw.gpu.pcie.throughput", 2e9 * util, **a, direction="transmit")
            add("hw.gpu.pcie.throughput", 2.5e9 * util, **a, direction="receive")
            add("hw.gpu.nvlink.throughput", 4e11 * util, **a)
        else:
            for core in range(4):
                add("hw.neuroncore.utilization", min(1.0, util + 0.05 * core), **a, core=core)
            for i, typ in enumerate(NEURON_ERRORS):
                add("hw.neuron.execution.errors", math.floor(t_s * 0.001 * (i + 1)), **a, type=typ)
            for i, st in enumerate(NEURON_STATUS):
                add("hw.neuron.executions", math.floor(t_s * (20.0 if i == 0 else 0.01)), **a, status=st)
            for i, pct in enumerate(PERCENTILES):
                add("hw.neuron.execution.latency", 0.004 * (1 + i) * (1 + 0.3 * _wave(k, s)), **a, percentile=pct)
        # health layer outputs (one chip per cluster is degraded/failing and cordoned)
        bad = c.index == 1 and node in ("gpu-002", "trn-001")
        add("shopfloor.health.risk", 0.62 if bad else 0.01 + 0.02 * _wave(k, s), **a)
        for st in HEALTH_STATES:
            add("shopfloor.health.state", 1 if st == ("failing" if bad else "healthy") else 0, **a, state=st)
        # as collector/remediate writes it: chip identity without vendor/model, plus the backend
        add("shopfloor.remediation.cordoned", 1 if bad else 0, chip=a["chip"], uuid=a["uuid"],
            backend="slurm" if c.vendor == "nvidia" else "kubernetes")

    # host power and thermals
    add("hw.host.temperature", 55 + 20 * _wave(k, len(node)), sensor="coretemp/Package id 0")
    add("hw.host.temperature.limit", 100, sensor="coretemp/Package id 0", threshold="max")
    add("hw.host.temperature.limit", 105, sensor="coretemp/Package id 0", threshold="critical")
    host_w = 1800 + 3000 * _wave(k, len(node) + 5)
    add("hw.host.power", host_w, sensor="dcmi_instantaneous")
    add("hw.host.power", host_w * 0.98, sensor="dcmi_average")
    add("hw.host.energy", 1e6 + 350 * t_s, sensor="rapl/package-0")
    add("hw.fan.speed", 9000 + 3000 * _wave(k, len(node) + 6), sensor="nct6775/fan1")
    # EFA
    for dev in ("rdmap16s27", "rdmap32s27"):
        for counter, per_s in EFA_PORT_COUNTERS.items():
            add("hw.efa.port.stat", math.floor(per_s * t_s), device=dev, port="1", counter=counter)
        for counter, per_s in EFA_DEVICE_COUNTERS.items():
            add("hw.efa.device.stat", math.floor(per_s * t_s), device=dev, counter=counter)
        add("hw.network.up", 0 if (dev == "rdmap32s27" and node == "trn-002") else 1, device=dev, port="1")
        add("hw.network.bandwidth.limit", 12.5e9, device=dev, port="1")
    # the agent itself
    present = {"nvml", "dcgm", "efa", "power", "xid"} if node.startswith("gpu") else {"neuron", "efa", "power"}
    for src in SOURCES:
        add("shopfloor.agent.source.supported", 1 if src in present else 0, source=src)
        add("shopfloor.agent.scrape.success", 0 if (src == "dcgm" and node == "gpu-003") else 1, source=src)
        add("shopfloor.agent.scrape.duration", 0.004 + 0.02 * _wave(k, len(src)), source=src)
    add("shopfloor.agent.export.requests", k, outcome="success")
    add("shopfloor.agent.export.requests", k // 50, outcome="retry")
    add("shopfloor.agent.spool.usage", 0 if node != "trn-002" else 4096 * (k % 10))
    add("shopfloor.agent.spool.batches", 0 if node != "trn-002" else k % 10)
    add("shopfloor.agent.spool.dropped", 0)
    # remediation budget and decisions (reported once per cluster, on its first node)
    if node in ("gpu-001", "trn-001"):
        add("shopfloor.remediation.budget.tripped", 0, scope=f"cluster/{cluster}")
        add("shopfloor.remediation.budget.tripped", 1 if cluster == "c2" and k > 100 else 0, scope="rate")
        add("shopfloor.remediation.decisions", 1, action="cordon", outcome="done")
        add("shopfloor.remediation.decisions", math.floor(t_s / 2400), action="cordon", outcome="refused")
    return pts


def otlp_batches(start_ms: int, steps: int, step_s: int) -> list[bytes]:
    """One OTLP request per node holding its whole history (points carry their own timestamps)."""
    nodes = NVIDIA_NODES + TRAINIUM_NODES
    out = []
    for cluster, rack, node in nodes:
        pts = []
        for k in range(steps):
            t_ms = start_ms + k * step_s * 1000
            pts += [Point(p.name, p.value, p.attributes, t_ms * 1_000_000)
                    for p in node_points(cluster, rack, node, k, k * step_s, step_s)]
        out.append(encode_request(pts, {"cluster": cluster, "rack": rack, "node": node},
                                  start_time_ns=(start_ms - 1000) * 1_000_000, default_time_ns=0))
    return out


def covered_metrics() -> set[str]:
    names = {p.name for p in node_points("c1", "r1", "gpu-001", 0, 0.0, 60)}
    names |= {p.name for p in node_points("c2", "r7", "trn-001", 0, 0.0, 60)}
    return names


def uncovered() -> list[str]:
    return [m.name for m in catalog() if "collector" not in m.sources and m.name not in covered_metrics()]
