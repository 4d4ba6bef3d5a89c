"""The simulator's numbers, in one place, each tagged like ../shared/reference/failure-model.md:
P = published figure, D = derived from published counts, E = our estimate (no source; change it
freely). Tests and docs read these constants; nothing else in the simulator hard-codes a rate.
"""

from __future__ import annotations

from dataclasses import dataclass

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
MINUTE_MS = 60_000


@dataclass(frozen=True)
class FailureMode:
    name: str
    hazard_per_day: float        # per chip-day (per node-day for scope "node")
    scope: str                   # "chip" or "node"
    vendors: tuple[str, ...]     # vendors the mode applies to
    precursor_share: float       # share of failures preceded by an observable precursor
    lead_median_h: float         # precursor lead time: lognormal around this median ...
    lead_min_h: float            # ... truncated to [min, max] (resampled, not clipped)
    lead_max_h: float
    repair_median_h: float       # time out of service until repaired/replaced (E for all)
    replaced: bool               # True: a new chip (new uuid, fresh counters); False: a reset


# Hazards and precursor shares: failure-model.md "Precursors" table. Trainium gets the GPU rates
# (E: no published Trainium fleet numbers); gsp and thermal are NVIDIA-only here because the
# catalog has no Trainium firmware-processor or per-device temperature signal to show them.
FAILURE_MODES: dict[str, FailureMode] = {m.name: m for m in (
    # D 1.5e-4; E share 0.25, median 12 h, 1 h-3 days
    FailureMode("off_bus", 1.5e-4, "chip", ("nvidia", "aws"), 0.25, 12, 1, 72, 48, True),
    # D 8e-5; E share 0.6, median 7 days, 1-30 days
    FailureMode("hbm_uncorrectable", 8e-5, "chip", ("nvidia", "aws"), 0.6, 7 * 24, 24, 30 * 24, 72, True),
    # D 2e-5; E share 0.1, "hours": median 4 h, 1-12 h
    FailureMode("sram_ecc", 2e-5, "chip", ("nvidia", "aws"), 0.1, 4, 1, 12, 48, True),
    # D 2e-5; no precursor; reset, not replaced (E)
    FailureMode("gsp", 2e-5, "chip", ("nvidia",), 0.0, 1, 1, 1, 1, False),
    # D 7e-6; E share 0.7, 3-30 days (median: their geometric mean, ~9.5 days)
    FailureMode("thermal", 7e-6, "chip", ("nvidia",), 0.7, 228, 72, 720, 48, True),
    # D ~3e-4 per node-day; E share 0.5, minutes-hours: median 1 h, 5 min-6 h; cable reseat 4 h
    FailureMode("nic", 3e-4, "node", ("nvidia", "aws"), 0.5, 1, 1 / 12, 6, 4, False),
)}

# Node heterogeneity (failure-model.md: a 1-2 % lemon population with 10-20x the hazard).
LEMON_SHARE = 0.015      # E: middle of 1-2 %
LEMON_FACTOR = 15.0      # E: middle of 10-20x, the same for every mode so ground truth is simple

# Fleet-wide regimes ("a bad driver or a hot month raises rates fleet-wide for a while").
@dataclass(frozen=True)
class RegimeKind:
    mode: str
    per_day: float           # regime starts per day (Poisson), E
    min_days: float          # duration uniform in [min_days, max_days], E
    max_days: float
    factor: float            # hazard multiplier while active, E


REGIMES = (
    RegimeKind("gsp", 1 / 45, 3, 10, 10.0),       # a bad driver rollout
    RegimeKind("thermal", 1 / 120, 10, 30, 3.0),  # a hot month / cooling problem
)

# XID storms: an application or fabric fault logs the same XID on most nodes of one job at once.
STORM_XIDS = (13, 31, 43, 45)
STORM_PER_JOB_DAY = 0.05     # E: storms per job-day, jobs of STORM_MIN_NODES nodes or more
STORM_MIN_NODES = 4
STORM_HIT_SHARE = (0.6, 1.0)  # E: share of the job's nodes that log it
STORM_SPREAD_MS = 60_000     # every hit node logs within a minute

# Jobs (the scheduler model), E.
JOB_SIZES = (1, 2, 4, 8, 16, 32, 64)                  # nodes
JOB_SIZE_WEIGHTS = (0.25, 0.15, 0.2, 0.17, 0.12, 0.07, 0.04)
JOB_MEDIAN_H = 6.0          # lognormal duration
JOB_SIGMA = 1.0
JOB_MAX_H = 72.0
JOB_GAP_MEDIAN_MIN = 10.0   # queueing/setup gap before a job starts on freed nodes


@dataclass(frozen=True)
class Hardware:
    vendor: str
    model: str
    chips: int
    memory_bytes: int
    idle_w: float            # board power at 0 % utilization (E)
    tdp_w: float             # board power at 100 % (B200 1000 W: P, NVIDIA spec; trn2 E)
    temp_ambient_c: float    # die temperature at 0 W (E)
    temp_c_per_w: float      # steady-state die temperature rise per watt (E)
    thermal_tau_s: float     # thermal time constant (E)
    efa_devices: int         # EFA devices per node (p6-b200: 8, trn2.48xlarge: 16 - P, AWS)
    efa_rate_bps: float      # bytes/s per port (400 / 200 Gb/s)
    nvlinks: int             # NVLink links per GPU (B200 NVLink5: 18 - P)
    cores: int               # NeuronCores per device (trn2: 8 - P)
    driver: str
    instance_type: str


HARDWARE = {
    "nvidia": Hardware("nvidia", "NVIDIA B200", 8, 192 * 2**30, 140.0, 1000.0, 28.0, 0.045,
                       90.0, 8, 400e9 / 8, 18, 0, "570.124.06", "p6-b200.48xlarge"),
    "aws": Hardware("aws", "trainium2", 16, 96 * 2**30, 90.0, 500.0, 30.0, 0.08,
                    90.0, 16, 200e9 / 8, 0, 8, "2.19.64.0", "trn2.48xlarge"),
}
# NVML temperature thresholds for the simulated B200, as in the recording the NVML source is tested
# on (tests/fixtures/nvml/recorded_b200x8.json); E: NVIDIA does not publish them.
GPU_TEMP_LIMITS = {"shutdown": 97.0, "slowdown": 94.0, "gpu_max": 92.0, "memory_max": 95.0}
# PCI bus ids of the 8 GPUs of an HGX B200 board (same recording), NVML's 8-digit-domain form.
GPU_PCI_BUS_IDS = ("00000000:1B:00.0", "00000000:43:00.0", "00000000:52:00.0", "00000000:61:00.0",
                   "00000000:9D:00.0", "00000000:C3:00.0", "00000000:D1:00.0", "00000000:DF:00.0")

# Baseline error rates of a healthy chip, per day (E).
CORRECTED_ECC_PER_DAY = 0.3
PCIE_REPLAYS_PER_DAY = 0.5
NVLINK_CRC_PER_DAY = 0.2         # per link
EFA_RETRANS_PER_S_BUSY = 2.0     # per port while the node is busy
EFA_UNRESPONSIVE_PER_DAY = 0.05
NEURON_HW_ERRORS_PER_DAY = 0.01
