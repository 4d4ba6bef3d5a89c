"""The simulated fleet and its ground truth, drawn once for the whole span from the seed.

Everything discrete is decided here, before a single sample is generated: which nodes and chips
exist, which nodes are lemons, when a bad-driver regime runs, which job runs where, every
failure with its precursor window and repair, every XID storm. The telemetry generator
(signals.py) then renders these facts into metric values block by block, so the ground truth
written to failures.parquet is exactly what shaped the data.

Failures are Poisson processes per chip (per node for NIC faults) with the hazards of
params.FAILURE_MODES, multiplied by the lemon factor and by any active regime (drawn by
thinning). A chip that is out of service (failed, waiting for repair) cannot fail again.
"""

from __future__ import annotations

import math
import uuid as uuidlib
from dataclasses import dataclass, field

import numpy as np

from agent.simulate import params as P

FAR_FUTURE = np.iinfo(np.int64).max // 4


@dataclass
class Fleet:
    node: list[str]
    cluster: list[str]
    rack: list[str]
    vendor: list[str]
    model: list[str]
    chips: np.ndarray          # (N,) chips per node
    lemon: np.ndarray          # (N,) bool
    slot_node: np.ndarray      # (S,) node index of each chip slot
    slot_chip: np.ndarray      # (S,) chip index within the node
    efa_devices: list[list[str]]

    @property
    def n_nodes(self) -> int:
        return len(self.node)

    def node_slots(self, n: int) -> np.ndarray:
        return np.flatnonzero(self.slot_node == n)


def build_fleet(rng: np.random.Generator, nodes: int, chips: int | None, trainium_share: float,
                nodes_per_rack: int = 16, nodes_per_cluster: int = 256) -> Fleet:
    """NVIDIA nodes first, then Trainium; clusters per vendor, racks of nodes_per_rack."""
    n_aws = int(round(nodes * trainium_share))
    vendors = ["nvidia"] * (nodes - n_aws) + ["aws"] * n_aws
    prefix = {"nvidia": "nv", "aws": "trn"}
    names, clusters, racks, models, counts, efa = [], [], [], [], [], []
    per_vendor_index = {"nvidia": 0, "aws": 0}
    for v in vendors:
        i = per_vendor_index[v]
        per_vendor_index[v] += 1
        hw = P.HARDWARE[v]
        cluster = f"{prefix[v]}-{i // nodes_per_cluster}"
        j = i % nodes_per_cluster
        clusters.append(cluster)
        racks.append(f"{cluster}-r{j // nodes_per_rack:02d}")
        names.append(f"{cluster}-n{j:04d}")
        models.append(hw.model)
        counts.append(chips or hw.chips)
        # EFA device names as the kernel spells them (rdmap<bus>s<slot>), one per PCIe bus.
        efa.append([f"rdmap{16 + 16 * d}s27" for d in range(hw.efa_devices)])
    lemon = rng.random(nodes) < P.LEMON_SHARE
    counts_arr = np.array(counts, dtype=np.int64)
    slot_node = np.repeat(np.arange(nodes), counts_arr)
    slot_chip = np.concatenate([np.arange(c) for c in counts_arr]) if nodes else np.zeros(0, np.int64)
    return Fleet(names, clusters, racks, vendors, models, counts_arr, lemon, slot_node, slot_chip, efa)


def new_uuid(rng: np.random.Generator, vendor: str, chip: int) -> str:
    """NVML's "GPU-<uuid>"; for Trainium the agent's "<instance id>-nd<device index>" (neuron-monitor
    has no device UUID). A replaced Trainium device comes back in a serviced host, i.e. a new
    instance id (E)."""
    if vendor == "nvidia":
        return f"GPU-{uuidlib.UUID(bytes=rng.bytes(16), version=4)}"
    return f"i-0{rng.bytes(8).hex()}-nd{chip}"


@dataclass
class Regime:
    mode: str
    start_ms: int
    end_ms: int
    factor: float


@dataclass
class Failure:
    ts: int
    mode: str
    node: int
    slot: int                  # chip slot; -1 for node-level (nic)
    inc: int                   # chip incarnation; -1 for nic
    device: int                # EFA device index for nic; -1 otherwise
    precursor_start: int | None
    repair_ts: int
    detail: int = 0            # mode-specific choice (e.g. which XID), drawn here


@dataclass
class Scenario:
    seed: int
    start_ms: int
    end_ms: int
    fleet: Fleet
    regimes: list[Regime]
    # chip incarnations (a replaced chip is a new incarnation with a new uuid)
    inc_slot: np.ndarray
    inc_uuid: list[str]
    inc_from: np.ndarray
    inc_to: np.ndarray
    inc_initial: np.ndarray    # bool: in service at the start (has lifetime counters)
    failures: list[Failure]
    # jobs: one row per (job, node)
    job_names: list[str]
    job_node: np.ndarray
    job_start: np.ndarray
    job_end: np.ndarray
    job_of_row: np.ndarray     # row -> job index
    # storms: (ts, job index, xid, hit node indices)
    storms: list[tuple[int, int, int, list[int]]]
    # discrete chip events: (ts, inc, kind, value); kinds: "xid", "remap"
    chip_events: list[tuple[int, int, str, int]] = field(default_factory=list)
    chips_override: int | None = None
    trainium_share: float = 0.0

    def regime_factor(self, mode: str, ts: np.ndarray) -> np.ndarray:
        f = np.ones(ts.shape, dtype=np.float64)
        for r in self.regimes:
            if r.mode == mode:
                inside = (ts >= r.start_ms) & (ts < r.end_ms)
                f[inside] = np.maximum(f[inside], r.factor)
        return f


def _draw_regimes(rng, start, end) -> list[Regime]:
    out = []
    days = (end - start) / P.DAY_MS
    for kind in P.REGIMES:
        n = rng.poisson(kind.per_day * days)
        starts = np.sort(rng.integers(start, end, size=n)) if n else []
        for s in starts:
            length = rng.uniform(kind.min_days, kind.max_days) * P.DAY_MS
            out.append(Regime(kind.mode, int(s), int(s + length), kind.factor))
    return out


def _lead_times_ms(rng, mode: P.FailureMode, n: int) -> np.ndarray:
    """Lognormal around the median, truncated to [min, max] by resampling."""
    if mode.lead_max_h <= mode.lead_min_h:
        return np.full(n, mode.lead_median_h * P.HOUR_MS, dtype=np.int64)
    sigma = math.log(mode.lead_max_h / mode.lead_min_h) / 4
    out = np.empty(n)
    todo = np.arange(n)
    while todo.size:
        draw = mode.lead_median_h * np.exp(sigma * rng.standard_normal(todo.size))
        ok = (draw >= mode.lead_min_h) & (draw <= mode.lead_max_h)
        out[todo[ok]] = draw[ok]
        todo = todo[~ok]
    return (out * P.HOUR_MS).astype(np.int64)


def _candidate_events(rng, sc_regimes, mode: P.FailureMode, entity_vendor: np.ndarray,
                      entity_lemon: np.ndarray, start: int, end: int):
    """(entity, ts) of a thinned Poisson process with the mode's hazard on every entity."""
    days = (end - start) / P.DAY_MS
    fmax = max([1.0] + [r.factor for r in sc_regimes if r.mode == mode.name])
    rate = np.where(np.isin(entity_vendor, mode.vendors), mode.hazard_per_day, 0.0)
    rate = rate * np.where(entity_lemon, P.LEMON_FACTOR, 1.0)
    counts = rng.poisson(rate * fmax * days)
    entity = np.repeat(np.arange(len(counts)), counts)
    ts = rng.integers(start, end, size=entity.size)
    factor = np.ones(ts.size)
    for r in sc_regimes:
        if r.mode == mode.name:
            inside = (ts >= r.start_ms) & (ts < r.end_ms)
            factor[inside] = np.maximum(factor[inside], r.factor)
    keep = rng.random(ts.size) < factor / fmax
    return entity[keep], ts[keep]


def build_scenario(seed: int, start_ms: int, duration_s: int, nodes: int, chips: int | None,
                   trainium_share: float, schedule: bool = True) -> Scenario:
    """Draw the whole ground truth. Separate child generators per concern keep each part stable
    when another part's parameters change (the failures do not depend on the jobs, so a
    statistical check of the fault processes may skip the scheduler with schedule=False)."""
    ss = np.random.SeedSequence(seed)
    r_fleet, r_regime, r_fail, r_jobs, r_ids = (np.random.default_rng(s) for s in ss.spawn(5))
    end_ms = start_ms + duration_s * 1000
    fleet = build_fleet(r_fleet, nodes, chips, trainium_share)
    # Failures are drawn past the end so that precursors running at the end are in the data.
    horizon = end_ms + 30 * P.DAY_MS
    regimes = _draw_regimes(r_regime, start_ms, horizon)

    slot_vendor = np.array([fleet.vendor[n] for n in fleet.slot_node]) if fleet.slot_node.size else np.zeros(0, str)
    slot_lemon = fleet.lemon[fleet.slot_node]
    node_vendor = np.array(fleet.vendor)

    # --- chip failures: candidates of every mode, then walk each slot in time order
    cands = []  # (slot, ts, mode)
    for mode in P.FAILURE_MODES.values():
        if mode.scope != "chip":
            continue
        ent, ts = _candidate_events(r_fail, regimes, mode, slot_vendor, slot_lemon, start_ms, horizon)
        cands.extend(zip(ent.tolist(), ts.tolist(), [mode.name] * ent.size))
    cands.sort(key=lambda c: (c[0], c[1], c[2]))

    inc_slot, inc_from, inc_to, inc_initial = [], [], [], []
    slot_current = {}
    for s in range(fleet.slot_node.size):
        slot_current[s] = len(inc_slot)
        inc_slot.append(s), inc_from.append(-FAR_FUTURE), inc_to.append(FAR_FUTURE), inc_initial.append(True)
    failures: list[Failure] = []
    down_until: dict[int, int] = {}
    for slot, ts, mname in cands:
        if ts < down_until.get(slot, -FAR_FUTURE):
            continue  # out of service: not at risk
        mode = P.FAILURE_MODES[mname]
        inc = slot_current[slot]
        repair = ts + int(mode.repair_median_h * P.HOUR_MS * math.exp(0.5 * r_fail.standard_normal()))
        pre = None
        if r_fail.random() < mode.precursor_share:
            lead = int(_lead_times_ms(r_fail, mode, 1)[0])
            pre = max(ts - lead, inc_from[inc])   # not before this chip was installed
        failures.append(Failure(ts, mname, int(fleet.slot_node[slot]), slot, inc, -1, pre, repair,
                                int(r_fail.integers(0, 1 << 30))))
        down_until[slot] = repair
        if mode.replaced:
            inc_to[inc] = repair
            slot_current[slot] = len(inc_slot)
            inc_slot.append(slot), inc_from.append(repair), inc_to.append(FAR_FUTURE), inc_initial.append(False)

    # --- node-level failures (NIC / cable / switch port)
    nic = P.FAILURE_MODES["nic"]
    ent, ts = _candidate_events(r_fail, regimes, nic, node_vendor, fleet.lemon, start_ms, horizon)
    order = np.lexsort((ts, ent))
    node_down: dict[int, int] = {}
    for n, t in zip(ent[order].tolist(), ts[order].tolist()):
        if t < node_down.get(n, -FAR_FUTURE):
            continue
        repair = t + int(nic.repair_median_h * P.HOUR_MS * math.exp(0.5 * r_fail.standard_normal()))
        pre = None
        if r_fail.random() < nic.precursor_share:
            pre = t - int(_lead_times_ms(r_fail, nic, 1)[0])
        device = int(r_fail.integers(0, len(fleet.efa_devices[n])))
        failures.append(Failure(t, "nic", n, -1, -1, device, pre, repair, int(r_fail.integers(0, 1 << 30))))
        node_down[n] = repair
    failures.sort(key=lambda f: (f.ts, f.node, f.slot, f.mode))

    instance = {}   # Trainium: one instance id per host, shared by its devices
    inc_uuid = []
    for s, initial in zip(inc_slot, inc_initial):
        n, chip = int(fleet.slot_node[s]), int(fleet.slot_chip[s])
        if fleet.vendor[n] == "aws" and initial:
            if n not in instance:
                instance[n] = new_uuid(r_ids, "aws", 0).rsplit("-nd", 1)[0]
            inc_uuid.append(f"{instance[n]}-nd{chip}")
        else:
            inc_uuid.append(new_uuid(r_ids, fleet.vendor[n], chip))
    sc = Scenario(seed, start_ms, end_ms, fleet, regimes,
                  np.array(inc_slot, dtype=np.int64), inc_uuid,
                  np.array(inc_from, dtype=np.int64), np.array(inc_to, dtype=np.int64),
                  np.array(inc_initial, dtype=bool), failures,
                  *(_build_jobs(r_jobs, fleet, start_ms, end_ms) if schedule else _no_jobs()),
                  chips_override=chips, trainium_share=trainium_share)
    _chip_events(sc, r_fail)
    return sc


def _no_jobs():
    empty = np.zeros(0, dtype=np.int64)
    return [], empty, empty, empty, empty, []


def _build_jobs(rng, fleet: Fleet, start: int, end: int):
    """Greedy scheduler per cluster: each job takes the nodes that free up first."""
    names, rows_node, rows_start, rows_end, rows_job = [], [], [], [], []
    storms = []
    sizes = np.array(P.JOB_SIZES)
    weights = np.array(P.JOB_SIZE_WEIGHTS) / sum(P.JOB_SIZE_WEIGHTS)
    for cluster in sorted(set(fleet.cluster)):
        members = np.array([i for i, c in enumerate(fleet.cluster) if c == cluster])
        # Jobs already running at the start: nodes become free during the first half day.
        free = start - rng.integers(0, 12 * P.HOUR_MS, size=members.size)
        while free.min() < end:
            size = int(min(rng.choice(sizes, p=weights), members.size))
            dur = min(P.JOB_MEDIAN_H * math.exp(P.JOB_SIGMA * rng.standard_normal()), P.JOB_MAX_H)
            pick = np.argsort(free, kind="stable")[:size]
            gap = rng.exponential(P.JOB_GAP_MEDIAN_MIN / math.log(2)) * P.MINUTE_MS
            j_start = int(free[pick].max() + gap)
            j_end = int(j_start + dur * P.HOUR_MS)
            job = len(names)
            # Storms are XIDs, which only NVIDIA drivers log.
            if size >= P.STORM_MIN_NODES and fleet.vendor[members[0]] == "nvidia":
                # An application/fabric fault: XID on most of the job's nodes within a minute,
                # the job dies shortly after. No chip is bad.
                lo = j_start + 10 * P.MINUTE_MS
                if j_end > lo and rng.random() < 1 - math.exp(-P.STORM_PER_JOB_DAY * dur / 24):
                    ts = int(rng.integers(lo, j_end))
                    xid = int(rng.choice(P.STORM_XIDS))
                    share = rng.uniform(*P.STORM_HIT_SHARE)
                    k = max(3, int(round(share * size)))
                    hit = sorted(members[rng.choice(pick, size=k, replace=False)].tolist())
                    storms.append((ts, job, xid, hit))
                    j_end = ts + int(rng.integers(60_000, 300_000))
            names.append(f"{cluster}-job{job:06d}")
            for i in pick:
                rows_node.append(int(members[i]))
                rows_start.append(j_start)
                rows_end.append(j_end)
                rows_job.append(job)
            free[pick] = j_end
    return (names, np.array(rows_node, dtype=np.int64), np.array(rows_start, dtype=np.int64),
            np.array(rows_end, dtype=np.int64), np.array(rows_job, dtype=np.int64), storms)


# XIDs a failure logs (NVIDIA only): xid.md and NVIDIA's XID catalog.
HBM_XIDS = (48, 94, 95)           # double-bit ECC / contained / uncontained uncorrectable
GSP_XIDS = (119, 120)
OFF_BUS_XID = 79
SRAM_XID = 95
REMAP_XID = 63                    # row remap recorded
REMAP_FAIL_XID = 64               # row remap failure
REMAP_FAILURE_SHARE = 0.3         # E: share of HBM failures where the row remap itself fails
HBM_REMAPS_PER_DAY = 0.5          # E: correctable row remaps during an HBM precursor


def inc_at(sc: Scenario, slot: int, ts: int) -> int:
    """The incarnation in a slot at time ts."""
    cands = np.flatnonzero(sc.inc_slot == slot)
    for i in cands:
        if sc.inc_from[i] <= ts < sc.inc_to[i]:
            return int(i)
    return int(cands[-1])


def _chip_events(sc: Scenario, rng) -> None:
    ev = sc.chip_events
    for f in sc.failures:
        if f.slot < 0:
            continue
        nvidia = sc.fleet.vendor[f.node] == "nvidia"
        if f.mode == "hbm_uncorrectable":
            if f.precursor_start is not None:
                # Correctable row remaps, denser towards the failure.
                span = f.ts - f.precursor_start
                n = 1 + rng.poisson(HBM_REMAPS_PER_DAY * span / P.DAY_MS)
                for u in np.sort(rng.random(n)):
                    t = int(f.ts - span * (1 - math.sqrt(u)))
                    ev.append((t, f.inc, "remap", 1))
                    if nvidia:
                        ev.append((t, f.inc, "xid", REMAP_XID))
            if nvidia:
                ev.append((f.ts, f.inc, "xid", HBM_XIDS[f.detail % 3]))
                if (f.detail >> 2) % 10 < REMAP_FAILURE_SHARE * 10:
                    ev.append((f.ts, f.inc, "xid", REMAP_FAIL_XID))
        elif nvidia and f.mode in ("off_bus", "thermal"):
            ev.append((f.ts, f.inc, "xid", OFF_BUS_XID))   # a thermal shutdown drops off the bus too
        elif nvidia and f.mode == "sram_ecc":
            ev.append((f.ts, f.inc, "xid", SRAM_XID))
        elif nvidia and f.mode == "gsp":
            ev.append((f.ts, f.inc, "xid", GSP_XIDS[f.detail % 2]))
    for ts, job, xid, hit in sc.storms:
        for n in hit:
            if sc.fleet.vendor[n] != "nvidia":
                continue
            slots = sc.fleet.node_slots(n)
            k = int(rng.integers(1, slots.size + 1))
            t = ts + int(rng.integers(0, P.STORM_SPREAD_MS))
            for s in sorted(rng.choice(slots, size=k, replace=False).tolist()):
                ev.append((t, inc_at(sc, s, t), "xid", xid))
    ev.sort()


def remap_failed(f: Failure) -> bool:
    return f.mode == "hbm_uncorrectable" and (f.detail >> 2) % 10 < REMAP_FAILURE_SHARE * 10
