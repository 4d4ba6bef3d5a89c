"""Render a Scenario into metric values, one block of steps at a time, vectorized over chips.

A block is up to a few hours of steps. For every metric family the renderer produces a Group: one
catalog metric, one set of extra attributes, and a (entities x steps) matrix of values where NaN
means "no sample" (a chip that fell off the bus is silent). Nothing loops per sample: loops run
over steps (the thermal filter, vectorized over chips), over families, or over the few ground
truth facts (failures, jobs) that overlap the block.

The values follow the failure model's precursors (params.py, scenario.py):
  hbm_uncorrectable  corrected-ECC rate ramps from 10x to 100x baseline; correctable row remaps
                     (+ XID 63) and row_remap.pending; then uncorrected ECC, XID 48/94/95, an
                     uncorrectable remap and sometimes a remap failure (XID 64)
  off_bus            PCIe replays and NVLink CRC errors on two links rising; then XID 79 and the
                     chip's NVML/DCGM series stop until it is replaced (Trainium: hardware
                     execution errors rising, then the device disappears)
  thermal            die temperature drifting up to +20 C, thermal clock events; then XID 79
  sram_ecc           a few extra corrected errors (weak); then uncorrected ECC and XID 95
  gsp                no precursor; XID 119/120, recovery action "GPU reset" until reset
  nic                EFA retransmits and unresponsive remotes rising on one device; then the
                     port goes down until repaired
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from agent.simulate import params as P
from agent.simulate.scenario import Scenario, remap_failed

METRIC_SETS = ("health", "all")

# EFA hw_counters file names (formats.md). The health set keeps the ones that carry faults.
EFA_PORT_COUNTERS_ALL = (
    "tx_bytes", "tx_pkts", "rx_bytes", "rx_pkts", "rx_drops", "send_bytes", "send_wrs", "recv_bytes",
    "recv_wrs", "rdma_read_wrs", "rdma_read_bytes", "rdma_read_wr_err", "rdma_read_resp_bytes",
    "rdma_write_wrs", "rdma_write_bytes", "rdma_write_wr_err", "rdma_write_recv_bytes",
    "retrans_bytes", "retrans_pkts", "retrans_timeout_events", "unresponsive_remote_events",
    "impaired_remote_conn_events")
EFA_PORT_COUNTERS_HEALTH = ("rx_drops", "retrans_pkts", "retrans_timeout_events",
                            "unresponsive_remote_events", "impaired_remote_conn_events")
EFA_DEVICE_COUNTERS = ("alloc_pd_err", "alloc_ucontext_err", "cmds_err", "completed_cmds",
                       "create_ah_err", "create_cq_err", "create_qp_err", "keep_alive_rcvd",
                       "mmap_err", "no_completion_cmds", "reg_mr_err", "submitted_cmds")
NVLINK_TYPES_ALL = ("replay", "recovery", "crc_flit", "crc_data")
NVLINK_TYPES_HEALTH = ("crc_flit",)
CLOCK_REASONS = ("idle", "applications_clocks", "sw_power_cap", "hw_slowdown", "sync_boost",
                 "sw_thermal", "hw_thermal", "hw_power_brake")
NEURON_ERROR_TYPES = ("generic", "numerical", "transient", "model", "runtime", "hardware")
NEURON_STATUSES = ("completed", "completed_with_err", "completed_with_num_err", "timed_out",
                   "incorrect_input", "failed_to_queue")
LATENCY_PERCENTILES = {"p0": 0.6, "p1": 0.7, "p25": 0.9, "p50": 1.0, "p75": 1.1, "p99": 1.6, "p100": 2.2}
HOST_TEMP_SENSORS = ("coretemp/Package id 0", "coretemp/Package id 1")
FAN_SENSORS = ("nct6798/fan1", "nct6798/fan2", "nct6798/fan3", "nct6798/fan4")
RAPL_ZONES = ("rapl/package-0", "rapl/package-1")
HOST_BASE_W = {"nvidia": 2200.0, "aws": 1800.0}   # E: CPUs, fans, NICs, storage
# The agent's sources (agent/sources FACTORIES) and a typical collection time in seconds (E).
AGENT_SOURCES = {"nvml": 0.04, "dcgm": 0.015, "neuron": 0.001, "efa": 0.004, "power": 0.12, "xid": 0.001}
# Sources that find their hardware on each kind of node (the others report supported = 0).
AWS_SOURCES = {"neuron", "efa", "power"}
NVIDIA_SOURCES = {"nvml", "dcgm", "xid", "efa", "power"}


@dataclass
class Group:
    otel: str                       # catalog (OpenTelemetry) name
    kind: str                       # entity kind: chip (incarnation) | node | dev (EFA device)
    ids: np.ndarray                 # (E,) entity ids
    extra: tuple[tuple[str, str], ...]   # attributes shared by the group (link, type, ...)
    values: np.ndarray              # (E, T) float64; NaN = no sample
    per_row: list[tuple[tuple[str, str], ...]] | None = None   # extra attributes per row (xid)


@dataclass
class Block:
    ts: np.ndarray                  # (T,) int64 ms
    groups: list[Group]


def _interval_slice(ts: np.ndarray, start: int, end: int) -> slice:
    return slice(int(np.searchsorted(ts, start, "left")), int(np.searchsorted(ts, end, "left")))


class Renderer:
    def __init__(self, sc: Scenario, step_s: int, metric_set: str = "all"):
        if metric_set not in METRIC_SETS:
            raise ValueError(f"metric set must be one of {METRIC_SETS}, not {metric_set!r}")
        self.sc = sc
        self.step_ms = int(step_s * 1000)
        self.full = metric_set == "all"
        f = sc.fleet
        self.dev_node = np.array([n for n in range(f.n_nodes) for _ in f.efa_devices[n]], dtype=np.int64)
        self.dev_index = np.array([d for n in range(f.n_nodes) for d in range(len(f.efa_devices[n]))], dtype=np.int64)
        self.dev_of = {(int(n), int(d)): i for i, (n, d) in enumerate(zip(self.dev_node, self.dev_index))}
        self.inc_node = f.slot_node[sc.inc_slot]
        self.inc_chip = f.slot_chip[sc.inc_slot]
        self.inc_aws = np.array([f.vendor[n] == "aws" for n in self.inc_node], dtype=bool)
        self.node_aws = np.array([v == "aws" for v in f.vendor], dtype=bool)
        self._counters: dict[tuple, np.ndarray] = {}
        self._temp = np.full(sc.inc_slot.size, np.nan)
        self._xid_counts: dict[tuple[int, int], int] = {}
        self._remaps: dict[int, int] = {}
        self._ev_pos = 0
        # Per-chip facts drawn once (stable whatever the block size).
        r = np.random.default_rng(np.random.SeedSequence([sc.seed, 7]))
        self.chip_speed = r.uniform(0.92, 1.0, sc.inc_slot.size)        # job intensity per chip
        self.chip_heat = r.normal(0.0, 2.0, sc.inc_slot.size)           # placement in the airflow
        self.node_ambient = r.normal(0.0, 1.5, f.n_nodes)
        # Checkpoints: every job stalls its accelerators for a few minutes every 30-90 minutes (E).
        rj = np.random.default_rng(np.random.SeedSequence([sc.seed, 13]))
        n_jobs = len(sc.job_names)
        self.ckpt_period = (rj.uniform(30, 90, n_jobs) * P.MINUTE_MS).astype(np.int64)
        self.ckpt_len = (rj.uniform(1, 4, n_jobs) * P.MINUTE_MS).astype(np.int64)
        # The two NVLink links whose CRC errors rise before an off-bus failure.
        nvlinks = P.HARDWARE["nvidia"].nvlinks
        self.bad_links = {int(fl.inc): (fl.detail % nvlinks, (fl.detail // 7) % nvlinks)
                          for fl in sc.failures if fl.mode == "off_bus" and fl.slot >= 0}

    # ------------------------------------------------------------------ helpers
    def _counter(self, key: tuple, kind: str, ids: np.ndarray, inc: np.ndarray, init_scale: float) -> np.ndarray:
        """Cumulative totals from per-step increments, carried across blocks per entity."""
        state = self._counters.get(key)
        if state is None:
            n = {"chip": self.sc.inc_slot.size, "node": self.sc.fleet.n_nodes, "dev": self.dev_node.size}[kind]
            r = np.random.default_rng(np.random.SeedSequence([self.sc.seed, 11, zlib.crc32(repr(key).encode())]))
            state = np.floor(r.random(n) * init_scale)
            if kind == "chip":
                state[~self.sc.inc_initial] = 0.0   # a replacement chip starts from zero
            self._counters[key] = state
        out = state[ids][:, None] + np.cumsum(inc, axis=1)
        if out.shape[1]:
            state[ids] = out[:, -1]
        return out

    def _windows(self, ts, ids, items):
        """Boolean (E,T) mask of per-entity [start, end) windows: items = (entity, start, end)."""
        pos = {int(e): i for i, e in enumerate(ids)}
        mask = np.zeros((ids.size, ts.size), dtype=bool)
        for e, s, t in items:
            i = pos.get(int(e))
            if i is not None:
                mask[i, _interval_slice(ts, s, t)] = True
        return mask

    def _progress(self, ts, ids, items):
        """(E,T) precursor progress in [0,1] inside [pre_start, failure), 0 elsewhere."""
        pos = {int(e): i for i, e in enumerate(ids)}
        prog = np.zeros((ids.size, ts.size))
        for e, s, t in items:
            i = pos.get(int(e))
            if i is None:
                continue
            sl = _interval_slice(ts, s, t)
            if sl.stop > sl.start:
                prog[i, sl] = np.maximum(prog[i, sl], (ts[sl] - s) / max(t - s, 1))
        return prog

    def _at_step(self, ts, ids, items):
        """(E,T) counts of events (entity, time, amount) landing in each step (first step >= time)."""
        pos = {int(e): i for i, e in enumerate(ids)}
        out = np.zeros((ids.size, ts.size))
        for e, t, amount in items:
            i = pos.get(int(e))
            k = int(np.searchsorted(ts, t, "left"))
            if i is not None and k < ts.size and ts[k] - t < self.step_ms:
                out[i, k] += amount
        return out

    # ------------------------------------------------------------------ blocks
    def steps(self):
        sc = self.sc
        n = (sc.end_ms - sc.start_ms + self.step_ms - 1) // self.step_ms
        return sc.start_ms + self.step_ms * np.arange(n, dtype=np.int64)

    def blocks(self, ts_all: np.ndarray, block_steps: int, block_seed: int) -> Iterator[Block]:
        for b, i in enumerate(range(0, ts_all.size, block_steps)):
            ts = ts_all[i:i + block_steps]
            rng = np.random.default_rng(np.random.SeedSequence([self.sc.seed, 3, block_seed, b]))
            yield self.render(ts, rng)

    def render(self, ts: np.ndarray, rng: np.random.Generator) -> Block:
        """Values for steps ts (ascending, contiguous with the previous call's steps)."""
        sc, f = self.sc, self.sc.fleet
        T = ts.size
        b0, b1 = int(ts[0]), int(ts[-1]) + 1
        step_days = self.step_ms / P.DAY_MS
        groups: list[Group] = []

        # ---- node activity from the scheduler
        busy_node = np.zeros((f.n_nodes, T), dtype=bool)
        stall_node = np.zeros((f.n_nodes, T), dtype=bool)   # checkpoint: the whole job stalls at once
        for row in np.flatnonzero((sc.job_start < b1) & (sc.job_end > b0)):
            sl = _interval_slice(ts, sc.job_start[row], sc.job_end[row])
            busy_node[sc.job_node[row], sl] = True
            j = sc.job_of_row[row]
            stall_node[sc.job_node[row], sl] = (ts[sl] - sc.job_start[row]) % self.ckpt_period[j] < self.ckpt_len[j]

        # ---- chips in service during the block
        inc = np.flatnonzero((sc.inc_from < b1) & (sc.inc_to > b0))
        C = inc.size
        node = self.inc_node[inc]
        aws = self.inc_aws[inc]
        nv = ~aws
        installed = (ts[None, :] >= sc.inc_from[inc][:, None]) & (ts[None, :] < sc.inc_to[inc][:, None])
        fails = [fl for fl in sc.failures if fl.slot >= 0 and fl.ts < b1 and
                 (fl.repair_ts > b0 or (fl.precursor_start is not None and fl.precursor_start < b1))]
        silent = self._windows(ts, inc, [(fl.inc, fl.ts, fl.repair_ts) for fl in fails
                                         if fl.mode in ("off_bus", "thermal")])
        broken = self._windows(ts, inc, [(fl.inc, fl.ts, fl.repair_ts) for fl in fails
                                         if fl.mode in ("hbm_uncorrectable", "sram_ecc", "gsp")])
        present = installed & ~silent
        prog = {m: self._progress(ts, inc, [(fl.inc, fl.precursor_start, fl.ts) for fl in sc.failures
                                            if fl.slot >= 0 and fl.mode == m and fl.precursor_start is not None
                                            and fl.precursor_start < b1 and fl.ts > b0])
                for m in ("hbm_uncorrectable", "off_bus", "thermal", "sram_ecc")}
        at_fail = {m: self._at_step(ts, inc, [(fl.inc, fl.ts, 1) for fl in fails if fl.mode == m])
                   for m in ("hbm_uncorrectable", "off_bus", "sram_ecc", "gsp")}

        def chip(otel, values, extra=(), rows=None):
            """A chip metric for the chips in `rows`; no sample while a chip is silent."""
            rows = np.ones(C, dtype=bool) if rows is None else rows
            groups.append(Group(otel, "chip", inc[rows], tuple(extra), np.where(present[rows], values[rows], np.nan)))

        def ctr(key, increments, scale):
            return self._counter(key, "chip", inc, increments, scale)

        # ---- utilization, power, temperature
        busy = busy_node[node] & present & ~broken
        level = self.chip_speed[inc][:, None] * rng.uniform(0.85, 1.0, (C, 1))
        level = np.where(stall_node[node], 0.1, level)
        util = np.where(busy, np.clip(level + rng.normal(0, 0.03, (C, T)), 0, 1), 0.0)
        util = np.round(util, 2)
        idle_w = np.where(aws, P.HARDWARE["aws"].idle_w, P.HARDWARE["nvidia"].idle_w)[:, None]
        tdp_w = np.where(aws, P.HARDWARE["aws"].tdp_w, P.HARDWARE["nvidia"].tdp_w)[:, None]
        power = np.clip(idle_w + util * (tdp_w - idle_w) + rng.normal(0, 8, (C, T)), 0.8 * idle_w, 1.02 * tdp_w)
        power = np.round(power, 3)      # NVML reports milliwatts

        # Die temperature (NVML only: neuron-monitor reports none, so only NVIDIA rows are emitted);
        # a thermal precursor adds a drift of up to +20 C before the failure.
        hw = P.HARDWARE["nvidia"]
        drift = 20.0 * prog["thermal"] ** 1.5
        target = (hw.temp_ambient_c + self.node_ambient[node][:, None] + self.chip_heat[inc][:, None]
                  + hw.temp_c_per_w * power + drift)
        alpha = 1.0 - np.exp(-self.step_ms / 1000 / hw.thermal_tau_s)
        temp = np.empty((C, T))
        prev = self._temp[inc]
        prev = np.where(np.isnan(prev), target[:, 0], prev)
        # First-order thermal inertia. scipy.signal.lfilter computes the same recursion, but scipy
        # is not a dependency of ours; a loop over steps, vectorized over chips, is cheap enough.
        for t in range(T):
            prev = prev + alpha * (target[:, t] - prev)
            temp[:, t] = prev
        self._temp[inc] = prev
        gpu_temp = np.round(temp)
        mem_temp = np.round(temp + 4 + 0.01 * self.chip_heat[inc][:, None])
        L = P.GPU_TEMP_LIMITS

        chip("hw.gpu.utilization", util)
        chip("hw.power", power, rows=nv)
        chip("hw.temperature", gpu_temp, (("sensor", "gpu"),), rows=nv)
        chip("hw.temperature", mem_temp, (("sensor", "memory"),), rows=nv)
        # the slowdown threshold is in the health set too: thermal margin = limit - temperature
        chip("hw.temperature.limit", np.full((C, T), L["slowdown"]), (("sensor", "gpu"), ("threshold", "slowdown")), rows=nv)
        hw_thermal = (gpu_temp >= L["slowdown"]).astype(float)
        sw_thermal = (gpu_temp >= L["gpu_max"]).astype(float)
        reasons = {"hw_thermal": hw_thermal, "sw_thermal": sw_thermal}
        if self.full:
            reasons.update(idle=(util == 0).astype(float), applications_clocks=np.zeros((C, T)),
                           sw_power_cap=(power >= 0.97 * tdp_w).astype(float), hw_slowdown=hw_thermal,
                           sync_boost=np.zeros((C, T)), hw_power_brake=np.zeros((C, T)))
        for reason in CLOCK_REASONS:
            if reason in reasons:
                chip("hw.gpu.clock.event.active", reasons[reason], (("reason", reason),), rows=nv)

        # ---- ECC
        base = P.CORRECTED_ECC_PER_DAY * step_days
        hbm_rate = base * (1 + np.where(prog["hbm_uncorrectable"] > 0, 10 ** (1 + prog["hbm_uncorrectable"]), 0))
        sram_rate = 0.2 * base * (1 + np.where(prog["sram_ecc"] > 0, 3.0, 0))
        hbm_corr = rng.poisson(np.where(present, hbm_rate, 0))
        sram_corr = rng.poisson(np.where(present, sram_rate, 0))
        hbm_unc = at_fail["hbm_uncorrectable"] * (1 + rng.poisson(0.5, (C, T)))
        sram_unc = at_fail["sram_ecc"]
        # NVIDIA: NVML's totals (HBM and SRAM together), lifetime ("aggregate", with errors from
        # before the trace, E) and, in the full set, since the driver loaded ("volatile")
        for scope in (("aggregate", "volatile") if self.full else ("aggregate",)):
            for typ, inc_v in (("corrected", hbm_corr + sram_corr), ("uncorrected", hbm_unc + sram_unc)):
                scale = 400.0 if (scope, typ) == ("aggregate", "corrected") else 0.0
                vals = ctr(("ecc", "device", typ, scope), np.where(nv[:, None], inc_v, 0), scale)
                chip("hw.gpu.ecc.errors", vals, (("memory", "device"), ("scope", scope), ("type", typ)), rows=nv)
        # Trainium: neuron-monitor splits HBM and SRAM; the agent counts since it started ("volatile")
        for memory, corr, unc in (("hbm", hbm_corr, hbm_unc), ("sram", sram_corr, sram_unc)):
            for typ, inc_v in (("corrected", corr), ("uncorrected", unc)):
                vals = ctr(("ecc", memory, typ), np.where(aws[:, None], inc_v, 0), 0.0)
                chip("hw.gpu.ecc.errors", vals, (("memory", memory), ("scope", "volatile"), ("type", typ)), rows=aws)

        # ---- row remapping (NVIDIA)
        remap_ev, xid_ev = [], []
        events = sc.chip_events
        while self._ev_pos < len(events) and events[self._ev_pos][0] < b1:
            t, i, kind, value = events[self._ev_pos]
            self._ev_pos += 1
            if t < sc.start_ms:
                continue   # before the agent ran: the kernel-log source never saw it
            (remap_ev if kind == "remap" else xid_ev).append((i, t, value))
        remap_inc = self._at_step(ts, inc, remap_ev)
        rows_corr = ctr(("remap", "correctable"), remap_inc, 0.0)
        rows_unc = ctr(("remap", "uncorrectable"), at_fail["hbm_uncorrectable"], 0.0)
        chip("hw.gpu.row_remap.rows", rows_corr, (("type", "correctable"),), rows=nv)
        chip("hw.gpu.row_remap.rows", rows_unc, (("type", "uncorrectable"),), rows=nv)
        hbm_fails = [fl for fl in fails if fl.mode == "hbm_uncorrectable"]
        pending = (rows_corr > 0) | self._windows(ts, inc, [(fl.inc, fl.ts, fl.repair_ts) for fl in hbm_fails])
        failed_remap = self._windows(ts, inc, [(fl.inc, fl.ts, fl.repair_ts) for fl in hbm_fails if remap_failed(fl)])
        chip("hw.gpu.row_remap.pending", pending.astype(float), rows=nv)
        chip("hw.gpu.row_remap.failure", failed_remap.astype(float), rows=nv)
        action = np.where(broken, np.where(failed_remap, 4.0, 1.0), 0.0)
        chip("hw.gpu.recovery_action", action, rows=nv)

        # ---- PCIe / NVLink (off-bus precursor)
        ob = prog["off_bus"]
        replays = rng.poisson(np.where(present, (P.PCIE_REPLAYS_PER_DAY + 5000 * ob ** 2) * step_days, 0))
        chip("hw.gpu.pcie.replays", ctr(("pcie",), replays, 50.0), rows=nv)
        link_ramp = np.zeros((C, hw.nvlinks))
        pos = {int(e): r for r, e in enumerate(inc)}
        for i, links in self.bad_links.items():
            if i in pos:
                link_ramp[pos[i], list(links)] = 1.0
        for link in range(hw.nvlinks):
            ramp = link_ramp[:, link][:, None] * ob ** 2 * 2000
            for typ in (NVLINK_TYPES_ALL if self.full else NVLINK_TYPES_HEALTH):
                scale = {"replay": 0.5, "recovery": 0.05, "crc_flit": 1.0, "crc_data": 0.2}[typ]
                n = rng.poisson(np.where(present & nv[:, None], (P.NVLINK_CRC_PER_DAY + ramp) * scale * step_days, 0))
                chip("hw.gpu.nvlink.errors", ctr(("nvlink", link, typ), n, 20.0 * scale),
                     (("link", str(link)), ("type", typ)), rows=nv)

        # ---- Trainium runtime errors (off-bus precursor shows as hardware errors)
        hw_err = rng.poisson(np.where(present, (P.NEURON_HW_ERRORS_PER_DAY + 2000 * ob ** 2) * step_days, 0))
        hw_err = hw_err + at_fail["off_bus"] * 3 + at_fail["hbm_uncorrectable"] + at_fail["sram_ecc"]
        for typ in (NEURON_ERROR_TYPES if self.full else ("hardware",)):
            if typ == "hardware":
                n = hw_err
            else:
                n = rng.poisson(np.where(busy, {"generic": 0.5, "numerical": 0.2, "transient": 1.0,
                                                "model": 0.05, "runtime": 0.1}[typ] * step_days, 0))
            chip("hw.neuron.execution.errors", ctr(("neuron_err", typ), n, 0.0), (("type", typ),), rows=aws)

        # ---- XID counters (kernel log: present from the first XID until the chip is replaced)
        self._xid_groups(ts, inc, installed, xid_ev, groups)

        if self.full:
            self._full_chip(ts, rng, inc, nv, aws, util, power, busy, present, groups, chip, ctr)

        # ---- node level: EFA, host power and thermals
        self._node_groups(ts, rng, busy_node, util, node, groups)
        return Block(ts, groups)

    def _xid_groups(self, ts, inc, installed, xid_ev, groups):
        pos = {int(e): r for r, e in enumerate(inc)}
        new: dict[tuple[int, int], np.ndarray] = {}
        for i, t, xid in xid_ev:
            k = int(np.searchsorted(ts, t, "left"))
            if k >= ts.size:
                continue
            new.setdefault((int(i), int(xid)), np.zeros(ts.size))[k] += 1
        keys = sorted(set(self._xid_counts) | set(new))
        rows, vals, extras = [], [], []
        for i, xid in keys:
            r = pos.get(i)
            if r is None:
                continue
            before = self._xid_counts.get((i, xid), 0)
            add = new.get((i, xid))
            cum = before + (np.cumsum(add) if add is not None else np.zeros(ts.size))
            v = np.where(installed[r] & (cum > 0), cum, np.nan)
            self._xid_counts[(i, xid)] = int(cum[-1])
            rows.append(i), vals.append(v), extras.append((("xid", str(xid)),))
        if rows:
            groups.append(Group("hw.gpu.xid.errors", "chip", np.array(rows), (), np.vstack(vals), extras))

    def _full_chip(self, ts, rng, inc, nv, aws, util, power, busy, present, groups, chip, ctr):
        """Metrics the health set leaves out: memory, clocks, energy, info, DCGM, Neuron details."""
        C, T = util.shape
        step_s = self.step_ms / 1000
        mem_limit = np.where(aws, P.HARDWARE["aws"].memory_bytes, P.HARDWARE["nvidia"].memory_bytes)[:, None]
        mem_used = np.where(busy, np.round(mem_limit * np.clip(0.85 + rng.normal(0, 0.02, (C, 1)), 0, 0.98) / 2**20) * 2**20,
                            512 * 2**20) + 0.0 * util
        chip("hw.gpu.memory.usage", mem_used)
        chip("hw.gpu.memory.limit", np.broadcast_to(mem_limit.astype(float), (C, T)).copy())
        for vendor, rows in (("nvidia", nv), ("aws", aws)):
            hw = P.HARDWARE[vendor]
            for k in np.unique(self.inc_chip[inc][rows]):
                k = int(k)
                if vendor == "nvidia":
                    # NVML's device info carries no instance type
                    bus = P.GPU_PCI_BUS_IDS[k] if k < len(P.GPU_PCI_BUS_IDS) else f"00000000:{0x10 + k:02X}:00.0"
                    extra = (("driver_version", hw.driver), ("pci_bus_id", bus))
                else:
                    # neuron-monitor's hw.gpu.info carries the instance type only
                    extra = (("instance_type", hw.instance_type),)
                chip("hw.gpu.info", np.ones((C, T)), extra, rows=rows & (self.inc_chip[inc] == k))
        chip("hw.gpu.memory_controller.utilization", np.round(util * 0.6, 2), rows=nv)
        chip("hw.power.limit", np.full((C, T), P.HARDWARE["nvidia"].tdp_w), rows=nv)
        chip("hw.energy", np.round(ctr(("energy",), np.where(present, power * step_s, 0), 5e9), 3), rows=nv)
        L = P.GPU_TEMP_LIMITS
        for sensor, threshold in (("gpu", "shutdown"), ("gpu", "gpu_max"), ("memory", "memory_max")):
            chip("hw.temperature.limit", np.full((C, T), L[threshold]), (("sensor", sensor), ("threshold", threshold)), rows=nv)
        sm = np.where(util > 0, 1965e6 - 300e6 * (power > 950), 345e6)
        chip("hw.gpu.clock", sm, (("clock", "sm"),), rows=nv)
        chip("hw.gpu.clock", np.full((C, T), 3996e6), (("clock", "memory"),), rows=nv)
        for link in range(P.HARDWARE["nvidia"].nvlinks):
            chip("hw.gpu.nvlink.up", np.ones((C, T)), (("link", str(link)),), rows=nv)
        # DCGM profiling
        for engine, share in (("graphics", 0.98), ("tensor", 0.55), ("dram", 0.45)):
            chip("hw.gpu.engine.active", np.round(util * share, 4), (("engine", engine),), rows=nv)
        for direction in ("transmit", "receive"):
            chip("hw.gpu.pcie.throughput", np.round(util * 2.5e9 + 1e6), (("direction", direction),), rows=nv)
        chip("hw.gpu.nvlink.throughput", np.round(util * 4.0e11), rows=nv)
        # Neuron: per-core utilization, executions, latency (absent when no model ran)
        cores = P.HARDWARE["aws"].cores
        # core labels are node-wide NeuronCore indices (device d has cores d*cores ... d*cores+cores-1)
        chip_idx = self.inc_chip[inc]
        for k in range(cores):
            core_util = np.round(np.clip(util + rng.normal(0, 0.02, (C, T)) * (util > 0), 0, 1), 2)
            for d in np.unique(chip_idx[aws]).tolist():
                chip("hw.neuroncore.utilization", core_util, (("core", str(d * cores + k)),), rows=aws & (chip_idx == d))
        for status in NEURON_STATUSES:
            rate = {"completed": 40.0 * step_s}.get(status, 0.0005 * step_s)
            n = rng.poisson(np.where(busy, rate, 0))
            chip("hw.neuron.executions", ctr(("neuron_exec", status), n, 0.0), (("status", status),), rows=aws)
        lat = 0.05 * np.exp(rng.normal(0, 0.05, (C, T)))
        for pct, mult in LATENCY_PERCENTILES.items():
            chip("hw.neuron.execution.latency", np.where(busy, np.round(lat * mult, 6), np.nan), (("percentile", pct),), rows=aws)

    def _node_groups(self, ts, rng, busy_node, chip_util, chip_node, groups):
        sc, f = self.sc, self.sc.fleet
        T = ts.size
        b0, b1 = int(ts[0]), int(ts[-1]) + 1
        step_s = self.step_ms / 1000
        step_days = self.step_ms / P.DAY_MS
        nodes = np.arange(f.n_nodes)
        devs = np.arange(self.dev_node.size)
        D = devs.size
        dnode = self.dev_node
        nic = [fl for fl in sc.failures if fl.mode == "nic" and fl.ts < b1
               and (fl.repair_ts > b0 or (fl.precursor_start is not None and fl.precursor_start < b1))]
        down = self._windows(ts, devs, [(self.dev_of[(fl.node, fl.device)], fl.ts, fl.repair_ts) for fl in nic])
        prog = self._progress(ts, devs, [(self.dev_of[(fl.node, fl.device)], fl.precursor_start, fl.ts)
                                         for fl in nic if fl.precursor_start is not None])
        up = ~down
        busy = busy_node[dnode] & up
        rate_bps = np.where(self.node_aws[dnode], P.HARDWARE["aws"].efa_rate_bps, P.HARDWARE["nvidia"].efa_rate_bps)[:, None]
        load = np.where(busy, rng.uniform(0.2, 0.5, (D, T)), 0.0)
        tx = np.floor(load * rate_bps * step_s)
        rx = np.floor(load * rate_bps * step_s * rng.uniform(0.95, 1.05, (D, 1)))
        # retransmits and unresponsive remotes rise before a NIC/cable failure
        retrans = rng.poisson(np.where(busy, P.EFA_RETRANS_PER_S_BUSY * step_s, 0) * (1 + 1000 * prog ** 2))
        unresp = rng.poisson((P.EFA_UNRESPONSIVE_PER_DAY + 500 * prog ** 2) * step_days * up)
        impaired = rng.poisson((0.01 + 100 * prog ** 2) * step_days * up)
        drops = rng.poisson(np.where(busy, 0.01 * step_s, 0) * (1 + 50 * prog ** 2))
        incs = {
            "tx_bytes": tx, "rx_bytes": rx, "tx_pkts": np.floor(tx / 8192), "rx_pkts": np.floor(rx / 8192),
            "rx_drops": drops, "send_bytes": np.floor(tx * 0.1), "send_wrs": np.floor(tx * 0.1 / 8192),
            "recv_bytes": np.floor(rx * 0.1), "recv_wrs": np.floor(rx * 0.1 / 8192),
            "rdma_read_wrs": np.floor(rx * 0.3 / 65536), "rdma_read_bytes": np.floor(rx * 0.3),
            "rdma_read_wr_err": np.zeros((D, T)), "rdma_read_resp_bytes": np.floor(tx * 0.3),
            "rdma_write_wrs": np.floor(tx * 0.6 / 65536), "rdma_write_bytes": np.floor(tx * 0.6),
            "rdma_write_wr_err": np.zeros((D, T)), "rdma_write_recv_bytes": np.floor(rx * 0.6),
            "retrans_bytes": retrans * 4096.0, "retrans_pkts": retrans,
            "retrans_timeout_events": rng.poisson(retrans * 0.001),
            "unresponsive_remote_events": unresp, "impaired_remote_conn_events": impaired,
        }
        names = EFA_PORT_COUNTERS_ALL if self.full else EFA_PORT_COUNTERS_HEALTH
        for counter in names:
            # counts since the driver loaded: traffic is large, retransmits and errors are rare
            scale = (1e5 if counter.startswith("retrans") else 1e13 if "bytes" in counter
                     else 1e9 if ("pkts" in counter or "wrs" in counter) else 5.0)
            vals = self._counter(("efa", counter), "dev", devs, incs[counter], scale)
            groups.append(Group("hw.efa.port.stat", "dev", devs, (("counter", counter), ("port", "1")), vals))
        groups.append(Group("hw.network.up", "dev", devs, (("port", "1"),), up.astype(float)))
        if self.full:
            groups.append(Group("hw.network.bandwidth.limit", "dev", devs, (("port", "1"),),
                                np.broadcast_to(rate_bps, (D, T)).astype(float)))
            for counter in EFA_DEVICE_COUNTERS:
                if counter in ("submitted_cmds", "completed_cmds"):
                    inc_v = np.floor(busy * 2.0 * step_s)
                elif counter == "keep_alive_rcvd":
                    inc_v = np.full((D, T), step_s)
                else:
                    inc_v = np.zeros((D, T))
                vals = self._counter(("efa_dev", counter), "dev", devs, inc_v, 1e6 if counter != "cmds_err" else 0)
                groups.append(Group("hw.efa.device.stat", "dev", devs, (("counter", counter),), vals))

        # host power = base + accelerators (IPMI DCMI prints whole watts)
        N = f.n_nodes
        idle = np.where(self.node_aws, P.HARDWARE["aws"].idle_w, P.HARDWARE["nvidia"].idle_w)
        tdp = np.where(self.node_aws, P.HARDWARE["aws"].tdp_w, P.HARDWARE["nvidia"].tdp_w)
        util_sum = np.zeros((N, T))
        np.add.at(util_sum, chip_node, chip_util)
        accel = f.chips[:, None] * idle[:, None] + util_sum * (tdp - idle)[:, None]
        base = np.array([HOST_BASE_W[v] for v in f.vendor])[:, None]
        node_util = util_sum / np.maximum(f.chips, 1)[:, None]
        host = np.round(base + 300 * node_util + accel + rng.normal(0, 15, (N, T)))
        groups.append(Group("hw.host.power", "node", nodes, (("sensor", "dcmi_instantaneous"),), host))
        if self.full:
            groups.append(Group("hw.host.power", "node", nodes, (("sensor", "dcmi_average"),),
                                np.round(base + 300 * node_util + accel)))
            for s_i, sensor in enumerate(HOST_TEMP_SENSORS):
                temp = np.round(42 + 25 * node_util + self.node_ambient[:, None] + rng.normal(0, 0.7, (N, T)) + s_i)
                groups.append(Group("hw.host.temperature", "node", nodes, (("sensor", sensor),), temp))
                for threshold, v in (("max", 90.0), ("critical", 100.0)):
                    groups.append(Group("hw.host.temperature.limit", "node", nodes,
                                        (("sensor", sensor), ("threshold", threshold)), np.full((N, T), v)))
            for sensor in FAN_SENSORS:
                rpm = np.round(7000 + 6000 * node_util + rng.normal(0, 60, (N, T)))
                groups.append(Group("hw.fan.speed", "node", nodes, (("sensor", sensor),), rpm))
            for zone in RAPL_ZONES:
                watts = 120 + 180 * node_util + rng.normal(0, 5, (N, T))
                vals = self._counter(("rapl", zone), "node", nodes, watts * step_s, 1e9)
                groups.append(Group("hw.host.energy", "node", nodes, (("sensor", zone),), np.round(vals, 6)))
            self._agent_groups(ts, rng, nodes, groups)

    def _agent_groups(self, ts, rng, nodes, groups):
        """The agent's self-metrics, as agent/runner.py adds them to every batch."""
        N, T = nodes.size, ts.size
        for source, seconds in AGENT_SOURCES.items():
            supported = np.where(self.node_aws, source in AWS_SOURCES, source in NVIDIA_SOURCES)
            groups.append(Group("shopfloor.agent.source.supported", "node", nodes, (("source", source),),
                                np.broadcast_to(supported[:, None].astype(float), (N, T)).copy()))
            rows = np.flatnonzero(supported)
            groups.append(Group("shopfloor.agent.scrape.success", "node", nodes[rows], (("source", source),),
                                np.ones((rows.size, T))))
            groups.append(Group("shopfloor.agent.scrape.duration", "node", nodes[rows], (("source", source),),
                                np.round(seconds * rng.lognormal(0, 0.2, (rows.size, T)), 6)))
        for outcome in ("success", "retry", "rejected", "spooled"):
            inc = np.ones((N, T)) if outcome == "success" else np.zeros((N, T))
            groups.append(Group("shopfloor.agent.export.requests", "node", nodes, (("outcome", outcome),),
                                self._counter(("export", outcome), "node", nodes, inc, 0.0)))
        for name in ("shopfloor.agent.spool.usage", "shopfloor.agent.spool.batches", "shopfloor.agent.spool.dropped"):
            groups.append(Group(name, "node", nodes, (), np.zeros((N, T))))


class Labeler:
    """Series labels for groups, computed once per series and cached (never per sample)."""

    def __init__(self, renderer: Renderer):
        self.r = renderer
        sc, f = renderer.sc, renderer.sc.fleet
        self._base = {
            "chip": lambda i: {"chip": str(int(renderer.inc_chip[i])), "uuid": sc.inc_uuid[i],
                               "vendor": f.vendor[renderer.inc_node[i]], "model": f.model[renderer.inc_node[i]]},
            "node": lambda n: {},
            "dev": lambda d: {"device": f.efa_devices[renderer.dev_node[d]][renderer.dev_index[d]]},
        }
        self._node_of = {"chip": lambda i: int(renderer.inc_node[i]), "node": lambda n: int(n),
                         "dev": lambda d: int(renderer.dev_node[d])}
        self._json: dict[tuple, str] = {}
        self._attrs: dict[tuple, dict[str, str]] = {}

    def resource(self, n: int) -> dict[str, str]:
        f = self.r.sc.fleet
        return {"cluster": f.cluster[n], "node": f.node[n], "rack": f.rack[n]}

    def node_of(self, kind: str, e: int) -> int:
        return self._node_of[kind](e)

    def attrs(self, kind: str, e: int, extra) -> dict[str, str]:
        """Data-point attributes (what a source puts on a Point), without resource labels."""
        key = (kind, e, extra)
        a = self._attrs.get(key)
        if a is None:
            a = self._attrs[key] = {**self._base[kind](e), **dict(extra)}
        return a

    def label_json(self, otel_key: str, kind: str, e: int, extra) -> str:
        key = (kind, e, extra)
        s = self._json.get(key)
        if s is None:
            labels = {**self.resource(self.node_of(kind, e)), **self.attrs(kind, e, extra)}
            s = self._json[key] = json.dumps(labels, sort_keys=True, separators=(",", ":"))
        return s
