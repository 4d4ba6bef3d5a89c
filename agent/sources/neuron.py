"""AWS Trainium (and Inferentia) through neuron-monitor's JSON stream.

neuron-monitor prints one complete JSON report per line each period. We run it (the command is
injected) as a long-lived child process, read its lines in a supervisor thread, and keep the
latest report plus cumulative counters; collect() returns that state.

Mapping (vendor "aws", model = neuron_device_type, uuid = "<instance_id>-nd<device index>",
chip = device index, NeuronCore n on device n // neuroncore_per_device_count):
  neuroncore_counters ... neuroncore_utilization (%)    -> hw.neuroncore.utilization{core} (ratio),
                                                           hw.gpu.utilization = mean of the device's
                                                           cores (a core no runtime uses counts 0)
  memory_used ... neuroncore_memory_usage (per core)    -> hw.gpu.memory.usage per device
  neuron_hardware_info.neuron_device_memory_size        -> hw.gpu.memory.limit
  neuron_hw_counters mem_ecc_* / sram_ecc_* (per period) -> hw.gpu.ecc.errors{memory=hbm|sram,
                                                           type, scope="volatile"}, summed
  execution_stats.error_summary / execution_summary     -> hw.neuron.execution.errors{type},
                                                           hw.neuron.executions{status}, summed
  execution_stats.latency_stats.total_latency           -> hw.neuron.execution.latency{percentile}
                                                           (absent while null)
  instance_info.instance_type                            -> hw.gpu.info{instance_type}
Runtime-level numbers (errors, executions, latency) are not broken down by device in
neuron-monitor; they are attributed to the lowest-indexed device the runtime uses.

Period counts become counters only once per period: neuron-monitor repeats a group whose own
period has not elapsed yet in the next report, so a group identical to the one seen before
(same measured `period` float and content) is not counted again. A group with a non-empty
"error" is skipped. Counters live for the agent's lifetime (a restart is a counter reset).

Robustness: a line that is not a JSON object (truncated, garbage, a log line) is skipped and
counted in `bad_lines`; a runtime may appear or vanish; null latency is absent. If the process
exits or cannot start it is restarted after a backoff that doubles up to backoff_max (and resets
after a good report); if it prints nothing for hang_timeout seconds, or for hang_periods of its
own reporting periods when that is longer (a site may run neuron-monitor at a 60 s period), it is
killed and restarted.
Nothing here raises into the agent except collect() when there is no report to give.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import threading
import time
import weakref
from typing import Any, Sequence

from agent.sources.base import Point, point

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 16 * 1024 * 1024   # a trn2 report is ~50 KB; anything this long is garbage
ECC_FIELDS = {"mem_ecc_corrected": ("hbm", "corrected"), "mem_ecc_uncorrected": ("hbm", "uncorrected"),
              "sram_ecc_corrected": ("sram", "corrected"), "sram_ecc_uncorrected": ("sram", "uncorrected")}
PERCENTILES = ("p0", "p1", "p25", "p50", "p75", "p99", "p100")

_live: "weakref.WeakSet[NeuronSource]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for src in list(_live):
        src.close()


class NeuronMonitorError(RuntimeError):
    pass


def _group(parent: Any, name: str) -> dict | None:
    """A metric group that is present and reports no error, else None."""
    group = parent.get(name) if isinstance(parent, dict) else None
    if not isinstance(group, dict) or group.get("error"):
        return None
    return group


class _State:
    """What the reports have told us: the latest gauges and the cumulative counters."""

    def __init__(self) -> None:
        self.report: dict | None = None
        self.received_at = 0.0
        self.ecc: dict[tuple[int, str, str], int] = {}           # (device, memory, type)
        self.exec_errors: dict[tuple[int, str], int] = {}        # (device, type)
        self.executions: dict[tuple[int, str], int] = {}         # (device, status)
        self.seen_groups: dict[tuple, str] = {}                  # (owner, group) -> canonical JSON

    def fresh(self, key: tuple, group: dict) -> bool:
        """True the first time this exact group is seen (a repeat is not a new period)."""
        canon = json.dumps(group, sort_keys=True, separators=(",", ":"))
        if self.seen_groups.get(key) == canon:
            return False
        self.seen_groups[key] = canon
        return True


def _cores_per_device(report: dict) -> int:
    hw = report.get("neuron_hardware_info") or {}
    n = hw.get("neuroncore_per_device_count")
    return n if isinstance(n, int) and n > 0 else 1


def _runtime_cores(runtime: dict) -> list[int]:
    report = runtime.get("report") or {}
    cores: set[int] = set()
    nc = report.get("neuroncore_counters") or {}
    cores.update(int(c) for c in (nc.get("neuroncores_in_use") or {}) if str(c).isdigit())
    mem = (((report.get("memory_used") or {}).get("neuron_runtime_used_bytes") or {})
           .get("usage_breakdown") or {}).get("neuroncore_memory_usage") or {}
    cores.update(int(c) for c in mem if str(c).isdigit())
    return sorted(cores)


def report_period(report: dict | None) -> float:
    """The longest metric-group period in a report (seconds), 0 when there is none."""
    if not report:
        return 0.0
    groups = list((report.get("system_data") or {}).values())
    for runtime in report.get("neuron_runtime_data") or []:
        if isinstance(runtime, dict):
            groups.extend((runtime.get("report") or {}).values())
    periods = [g["period"] for g in groups if isinstance(g, dict) and isinstance(g.get("period"), (int, float))]
    return float(max(periods, default=0.0))


def accumulate(state: _State, report: dict) -> None:
    """Add one report's period counts to the cumulative counters."""
    system = report.get("system_data") or {}
    hw = _group(system, "neuron_hw_counters")
    if hw is not None and state.fresh(("system", "neuron_hw_counters"), hw):
        for dev in hw.get("neuron_devices") or []:
            index = dev.get("neuron_device_index")
            if not isinstance(index, int):
                continue
            for field, (memory, etype) in ECC_FIELDS.items():
                count = dev.get(field)
                if isinstance(count, (int, float)) and count >= 0:
                    key = (index, memory, etype)
                    state.ecc[key] = state.ecc.get(key, 0) + int(count)
    per_device = _cores_per_device(report)
    runtimes = [r for r in report.get("neuron_runtime_data") or [] if isinstance(r, dict)]
    # Forget runtimes that are gone, so a node running thousands of jobs keeps no history.
    pids = {r.get("pid") for r in runtimes}
    for key in [k for k in state.seen_groups if k[0] != "system" and k[0] not in pids]:
        del state.seen_groups[key]
    for runtime in runtimes:
        if runtime.get("error"):
            continue
        stats = _group(runtime.get("report") or {}, "execution_stats")
        cores = _runtime_cores(runtime)
        if stats is None or not cores or not state.fresh((runtime.get("pid"), "execution_stats"), stats):
            continue
        device = cores[0] // per_device
        for table, summary in ((state.exec_errors, stats.get("error_summary")),
                               (state.executions, stats.get("execution_summary"))):
            for kind, count in (summary or {}).items():
                if isinstance(count, (int, float)) and count >= 0:
                    table[(device, kind)] = table.get((device, kind), 0) + int(count)


def points_from(state: _State) -> list[Point]:
    report = state.report or {}
    hw = report.get("neuron_hardware_info") or {}
    inst = report.get("instance_info") or {}
    count = hw.get("neuron_device_count") if isinstance(hw.get("neuron_device_count"), int) else 0
    per_device = _cores_per_device(report)
    model = str(hw.get("neuron_device_type") or "")
    instance_id = str(inst.get("instance_id") or "")

    def ids(device: int) -> dict[str, str]:
        return {"chip": str(device), "uuid": f"{instance_id}-nd{device}", "vendor": "aws", "model": model}

    util: dict[int, float] = {}
    mem: dict[int, float] = {}
    latency: dict[int, dict] = {}
    for runtime in report.get("neuron_runtime_data") or []:
        if not isinstance(runtime, dict) or runtime.get("error"):
            continue
        rreport = runtime.get("report") or {}
        nc = _group(rreport, "neuroncore_counters")
        for core, data in ((nc or {}).get("neuroncores_in_use") or {}).items():
            value = (data or {}).get("neuroncore_utilization")
            if str(core).isdigit() and isinstance(value, (int, float)):
                util[int(core)] = value / 100
        used = _group(rreport, "memory_used")
        breakdown = (((used or {}).get("neuron_runtime_used_bytes") or {}).get("usage_breakdown") or {})
        for core, parts in (breakdown.get("neuroncore_memory_usage") or {}).items():
            if str(core).isdigit() and isinstance(parts, dict):
                device = int(core) // per_device
                mem[device] = mem.get(device, 0) + sum(v for v in parts.values() if isinstance(v, (int, float)))
        stats = _group(rreport, "execution_stats")
        total = ((stats or {}).get("latency_stats") or {}).get("total_latency")
        cores = _runtime_cores(runtime)
        if isinstance(total, dict) and cores:
            latency[cores[0] // per_device] = total

    out: list[Point] = []
    devices = range(count) if count else sorted({c // per_device for c in util} | set(mem))
    for device in devices:
        labels = ids(device)
        out.append(point("hw.gpu.info", 1, instance_type=str(inst.get("instance_type") or ""), **labels))
        cores = range(device * per_device, (device + 1) * per_device)
        for core in cores:
            out.append(point("hw.neuroncore.utilization", util.get(core, 0.0), core=core, **labels))
        out.append(point("hw.gpu.utilization", sum(util.get(c, 0.0) for c in cores) / per_device, **labels))
        out.append(point("hw.gpu.memory.usage", mem.get(device, 0), **labels))
        if isinstance(hw.get("neuron_device_memory_size"), int):
            out.append(point("hw.gpu.memory.limit", hw["neuron_device_memory_size"], **labels))
        for memory, etype in ECC_FIELDS.values():
            out.append(point("hw.gpu.ecc.errors", state.ecc.get((device, memory, etype), 0),
                             memory=memory, type=etype, scope="volatile", **labels))
        for p in PERCENTILES:
            value = latency.get(device, {}).get(p)
            if isinstance(value, (int, float)):
                out.append(point("hw.neuron.execution.latency", value, percentile=p, **labels))
    for (device, kind), n in sorted(state.exec_errors.items()):
        out.append(point("hw.neuron.execution.errors", n, type=kind, **ids(device)))
    for (device, kind), n in sorted(state.executions.items()):
        out.append(point("hw.neuron.executions", n, status=kind, **ids(device)))
    return out


class NeuronSource:
    name = "neuron"

    def __init__(self, command: Sequence[str], hang_timeout: float = 30.0, backoff_initial: float = 1.0,
                 backoff_max: float = 60.0, first_report_timeout: float = 10.0, hang_periods: float = 3.0):
        self.command = list(command)
        self.hang_timeout = hang_timeout
        self.hang_periods = hang_periods
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.first_report_timeout = first_report_timeout
        self.bad_lines = 0
        self.restarts = 0
        self.hangs = 0
        self.last_error = ""
        self.backoff = 0.0            # the wait before the latest restart
        self._state = _State()
        self._lock = threading.RLock()  # collect() holds it while asking silence_limit()
        self._got_report = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        _live.add(self)

    # ------------------------------------------------------------------ protocol
    def supported(self) -> tuple[bool, str]:
        if not self.command:
            return False, "neuron_monitor_command is empty"
        exe = self.command[0]
        if shutil.which(exe) is None:
            return False, f"{exe} not found (aws-neuronx-tools not installed?)"
        return True, ""

    def collect(self) -> list[Point]:
        self.start()
        with self._got_report:
            if self._state.report is None:
                self._got_report.wait_for(lambda: self._state.report is not None, self.first_report_timeout)
            if self._state.report is None:
                raise NeuronMonitorError(f"no report from {' '.join(self.command)} yet"
                                         + (f": {self.last_error}" if self.last_error else ""))
            age = time.monotonic() - self._state.received_at
            if age > self.silence_limit() * 2:
                raise NeuronMonitorError(f"last neuron-monitor report is {age:.0f}s old: {self.last_error}")
            return points_from(self._state)

    def current(self) -> list[Point]:
        """The state the reports so far describe, as points (starts nothing)."""
        with self._lock:
            return points_from(self._state)

    def silence_limit(self) -> float:
        """Seconds without a line after which neuron-monitor counts as hung."""
        with self._lock:
            period = report_period(self._state.report)
        return max(self.hang_timeout, self.hang_periods * period)

    # ------------------------------------------------------------------ the child process
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._supervise, name="neuron-monitor", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._kill()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _supervise(self) -> None:
        backoff = self.backoff_initial
        while not self._stop.is_set():
            good = self._run_once()
            if self._stop.is_set():
                break
            self.restarts += 1
            if good:
                backoff = self.backoff_initial
            self.backoff = backoff
            log.warning("neuron-monitor: %s; restarting in %.1fs", self.last_error, backoff)
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.backoff_max)

    def _run_once(self) -> bool:
        """Run neuron-monitor until it exits or hangs; True if it gave at least one report."""
        try:
            proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            self.last_error = f"cannot start {self.command[0]}: {exc.strerror or exc}"
            return False
        self._proc = proc
        fd = proc.stdout.fileno()
        buffer = b""
        good = False
        last_line = time.monotonic()
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready:
                    limit = self.silence_limit()
                    if time.monotonic() - last_line > limit:
                        self.hangs += 1
                        self.last_error = f"no output for {limit:g}s (hung)"
                        return good
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    self.last_error = f"exited with status {proc.wait()}"
                    return good
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > MAX_LINE_BYTES:
                    self.bad_lines += 1
                    buffer = b""
                for line in lines:
                    last_line = time.monotonic()
                    good |= self.feed_line(line)
            return good
        finally:
            self._kill()
            proc.wait()
            proc.stdout.close()
            self._proc = None

    def feed_line(self, line: bytes) -> bool:
        """Take one line of neuron-monitor output (the reader thread calls this for each line).
        Returns True for a report, False for a skipped line (counted in bad_lines)."""
        if not line.strip():
            return False
        try:
            report = json.loads(line)
        except ValueError:
            report = None
        if not isinstance(report, dict) or "neuron_hardware_info" not in report and "neuron_runtime_data" not in report:
            self.bad_lines += 1
            return False
        with self._got_report:
            accumulate(self._state, report)
            self._state.report = report
            self._state.received_at = time.monotonic()
            self._got_report.notify_all()
        return True
