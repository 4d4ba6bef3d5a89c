"""NVIDIA GPUs through NVML (the `pynvml` module of nvidia-ml-py, or any object with its API).

Per GPU: utilization, memory, power and enforced limit, energy, GPU and HBM temperature and
thresholds, SM/memory clocks, every clock-event (throttle) reason as its own 0/1 series, ECC
(corrected/uncorrected x volatile/aggregate), retired pages and pending retirement, row
remapping, PCIe replays, NVLink state and error counters per link, the GPU recovery action
(field 230) and an info series. Units are converted to the catalog's (mW->W, mJ->J, MHz->Hz,
percent->ratio).

What the GPU or driver does not have is left out: a call raising NVMLError_NotSupported,
_FunctionNotFound or _NoPermission (or any other per-call NVMLError) drops that metric only; a
field whose entry has nvmlReturn != SUCCESS is dropped the same way. A GPU that raises
NVMLError_GpuIsLost drops out of this scrape only: the other GPUs' data is returned, the loss
is logged with the GPU's index, uuid and bus id, and kept in `lost` (the GPU's series go stale,
and the kernel log's XID 79 carries the event to health).

XID events: start_events(sink) registers every GPU for nvmlEventTypeXidCriticalError and waits
in a thread with nvmlEventSetWait (500 ms, NVMLError_Timeout is the normal "nothing happened");
each event bumps a cumulative hw.gpu.xid.errors{chip,xid} that is pushed through the sink at once
and reported by later collect() calls. The xid source (kernel log) counts the same events with
the same labels, so by default (xid_events=None) an NVML event is counted only while no XidSource
in this process is reading the kernel log; True always counts them, False never starts them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.sources.base import EventSink, Point, point
from agent.sources.xid import kernel_log_followed

log = logging.getLogger(__name__)

# Clock-event reason bits (nvmlClocksEventReason*), named as in the catalog.
CLOCK_EVENT_REASONS = {
    "idle": 0x1, "applications_clocks": 0x2, "sw_power_cap": 0x4, "hw_slowdown": 0x8,
    "sync_boost": 0x10, "sw_thermal": 0x20, "hw_thermal": 0x40, "hw_power_brake": 0x80,
}
# nvmlTemperatureThresholds_t -> (sensor, threshold)
THRESHOLDS = {0: ("gpu", "shutdown"), 1: ("gpu", "slowdown"), 2: ("memory", "memory_max"), 3: ("gpu", "gpu_max")}
NVLINK_ERRORS = {0: "replay", 1: "recovery", 2: "crc_flit", 3: "crc_data"}
FIELD_MEMORY_TEMP = 82       # NVML_FI_DEV_MEMORY_TEMP
FIELD_RECOVERY_ACTION = 230  # NVML_FI_DEV_GET_GPU_RECOVERY_ACTION
EVENT_WAIT_MS = 500


@dataclass(frozen=True)
class Gpu:
    index: int
    handle: Any
    uuid: str
    model: str
    pci_bus_id: str
    labels: dict[str, str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # Built once: every one of the GPU's ~100 points carries these.
        object.__setattr__(self, "labels", {"chip": str(self.index), "uuid": self.uuid,
                                            "vendor": "nvidia", "model": self.model})


class GpuLost(Exception):
    """Internal: the GPU raised NVMLError_GpuIsLost; stop reading it this scrape."""


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def field_value(entry: Any) -> float | None:
    """The number in an nvmlFieldValue_t entry, or None when its nvmlReturn is not success."""
    if entry.nvmlReturn != 0:
        return None
    attr = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}.get(entry.valueType)
    return float(getattr(entry.value, attr)) if attr else None


class NvmlSource:
    name = "nvml"

    def __init__(self, nvml: Any = None, xid_events: bool | None = None):
        if nvml is None:
            import pynvml as nvml  # the agent's dependency nvidia-ml-py
        self.nvml = nvml
        self.xid_events = xid_events
        self.lost: dict[int, str] = {}      # index -> why, for the last scrape
        self.errors: list[str] = []         # unexpected per-call NVML errors, last scrape
        self._init_error: str | None = None
        self._initialized = False
        self._gpus: list[Gpu] = []
        self._driver_version = ""
        self._xid_counts: dict[tuple[int, int], int] = {}
        self._xid_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # NotSupported and friends mean "this GPU has no such metric"; they are expected.
        self._absent = tuple(getattr(nvml, n) for n in (
            "NVMLError_NotSupported", "NVMLError_FunctionNotFound", "NVMLError_NoPermission",
            "NVMLError_InvalidArgument") if hasattr(nvml, n))

    # ------------------------------------------------------------------ setup
    def _init(self) -> bool:
        if self._initialized:
            return True
        try:
            self.nvml.nvmlInit()
        except self.nvml.NVMLError as exc:
            self._init_error = f"nvmlInit failed: {exc}"
            return False
        except OSError as exc:  # libnvidia-ml.so not found
            self._init_error = f"NVML library not loadable: {exc}"
            return False
        self._initialized = True
        self._init_error = None
        return True

    def supported(self) -> tuple[bool, str]:
        if not self._init():
            return False, f"needs an NVIDIA GPU and driver (libnvidia-ml): {self._init_error}"
        try:
            if self.nvml.nvmlDeviceGetCount() == 0:
                return False, "NVML reports no GPUs"
        except self.nvml.NVMLError as exc:
            return False, f"nvmlDeviceGetCount failed: {exc}"
        return True, ""

    def _discover(self) -> list[Gpu]:
        """Handles and static identity, read once (and again if the GPU count changes)."""
        nv = self.nvml
        count = nv.nvmlDeviceGetCount()
        if len(self._gpus) == count and all(g.handle is not None for g in self._gpus):
            return self._gpus
        if not self._driver_version:
            try:
                self._driver_version = _text(nv.nvmlSystemGetDriverVersion())
            except nv.NVMLError:
                pass
        gpus = []
        for index in range(count):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nv.nvmlDeviceGetUUID(handle))
                model = _text(nv.nvmlDeviceGetName(handle))
                try:
                    bus = _text(nv.nvmlDeviceGetPciInfo(handle).busId)
                except self._absent:
                    bus = ""
            except nv.NVMLError as exc:
                gpus.append(Gpu(index, None, "", "", ""))
                self.lost[index] = f"GPU {index}: {exc}"
                continue
            gpus.append(Gpu(index, handle, uuid, model, bus))
        self._gpus = gpus
        return gpus

    # ------------------------------------------------------------------ collection
    def collect(self) -> list[Point]:
        if not self._init():
            raise RuntimeError(self._init_error)
        self.lost = {}
        self.errors = []
        gpus = self._discover()
        points: list[Point] = []
        for gpu in gpus:
            if gpu.handle is None:
                continue
            try:
                points.extend(self._collect_gpu(gpu))
            except GpuLost as exc:
                self.lost[gpu.index] = str(exc)
        for why in self.lost.values():
            log.error("nvml: %s", why)
        with self._xid_lock:
            if self._kernel_log_counts_xids():
                return points
            by_index = {g.index: g for g in gpus}
            for (index, xid), count in sorted(self._xid_counts.items()):
                if index in by_index:
                    points.append(point("hw.gpu.xid.errors", count, xid=xid, **by_index[index].labels))
        return points

    def _call(self, gpu: Gpu, fn: Callable, *args: Any) -> Any:
        """fn(handle, *args), or None when the GPU lacks it; GpuIsLost stops this GPU."""
        nv = self.nvml
        try:
            return fn(gpu.handle, *args)
        except self._absent:
            return None
        except nv.NVMLError_GpuIsLost as exc:
            raise GpuLost(f"GPU {gpu.index} ({gpu.uuid}, {gpu.pci_bus_id}) is lost: {exc}") from exc
        except nv.NVMLError as exc:
            self.errors.append(f"GPU {gpu.index} {getattr(fn, '__name__', fn)}{args}: {exc}")
            return None

    def _collect_gpu(self, gpu: Gpu) -> list[Point]:
        nv = self.nvml
        ids = gpu.labels
        out: list[Point] = []

        def add(name: str, value: float | None, **attrs: Any) -> None:
            if value is not None:
                out.append(point(name, value, **ids, **attrs))

        out.append(point("hw.gpu.info", 1, driver_version=self._driver_version,
                         pci_bus_id=gpu.pci_bus_id, **ids))
        util = self._call(gpu, nv.nvmlDeviceGetUtilizationRates)
        if util is not None:
            add("hw.gpu.utilization", util.gpu / 100)
            add("hw.gpu.memory_controller.utilization", util.memory / 100)
        mem = self._call(gpu, nv.nvmlDeviceGetMemoryInfo)
        if mem is not None:
            add("hw.gpu.memory.usage", mem.used)
            add("hw.gpu.memory.limit", mem.total)
        mw = self._call(gpu, nv.nvmlDeviceGetPowerUsage)
        add("hw.power", None if mw is None else mw / 1000)
        mw = self._call(gpu, nv.nvmlDeviceGetEnforcedPowerLimit)
        add("hw.power.limit", None if mw is None else mw / 1000)
        mj = self._call(gpu, nv.nvmlDeviceGetTotalEnergyConsumption)
        add("hw.energy", None if mj is None else mj / 1000)
        add("hw.temperature", self._call(gpu, nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU), sensor="gpu")
        for code, (sensor, threshold) in THRESHOLDS.items():
            add("hw.temperature.limit", self._call(gpu, nv.nvmlDeviceGetTemperatureThreshold, code),
                sensor=sensor, threshold=threshold)
        for clock, kind in (("sm", nv.NVML_CLOCK_SM), ("memory", nv.NVML_CLOCK_MEM)):
            mhz = self._call(gpu, nv.nvmlDeviceGetClockInfo, kind)
            add("hw.gpu.clock", None if mhz is None else mhz * 1e6, clock=clock)
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nv.nvmlDeviceGetCurrentClocksThrottleReasons
        reasons = self._call(gpu, reasons_fn)
        if reasons is not None:
            for reason, bit in CLOCK_EVENT_REASONS.items():
                add("hw.gpu.clock.event.active", 1 if reasons & bit else 0, reason=reason)
        for etype, tname in ((0, "corrected"), (1, "uncorrected")):
            for ctype, scope in ((0, "volatile"), (1, "aggregate")):
                add("hw.gpu.ecc.errors", self._call(gpu, nv.nvmlDeviceGetTotalEccErrors, etype, ctype),
                    memory="device", type=tname, scope=scope)
        for cause, cname in ((0, "single_bit"), (1, "double_bit")):
            pages = self._call(gpu, nv.nvmlDeviceGetRetiredPages, cause)
            add("hw.gpu.retired_pages", None if pages is None else len(pages), cause=cname)
        add("hw.gpu.retired_pages.pending", self._call(gpu, nv.nvmlDeviceGetRetiredPagesPendingStatus))
        rows = self._call(gpu, nv.nvmlDeviceGetRemappedRows)
        if rows is not None:
            correctable, uncorrectable, pending, failure = rows
            add("hw.gpu.row_remap.rows", correctable, type="correctable")
            add("hw.gpu.row_remap.rows", uncorrectable, type="uncorrectable")
            add("hw.gpu.row_remap.pending", 1 if pending else 0)
            add("hw.gpu.row_remap.failure", 1 if failure else 0)
        add("hw.gpu.pcie.replays", self._call(gpu, nv.nvmlDeviceGetPcieReplayCounter))
        out.extend(self._nvlinks(gpu))
        fields = self._call(gpu, nv.nvmlDeviceGetFieldValues, [FIELD_MEMORY_TEMP, FIELD_RECOVERY_ACTION])
        for entry in fields or ():
            value = field_value(entry)
            if entry.fieldId == FIELD_MEMORY_TEMP:
                add("hw.temperature", value, sensor="memory")
            elif entry.fieldId == FIELD_RECOVERY_ACTION:
                add("hw.gpu.recovery_action", value)
        return out

    def _nvlinks(self, gpu: Gpu) -> list[Point]:
        nv = self.nvml
        out: list[Point] = []
        for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                state = nv.nvmlDeviceGetNvLinkState(gpu.handle, link)
            except self._absent:
                break  # no NVLink at all, or past the GPU's last link
            except nv.NVMLError_GpuIsLost as exc:
                raise GpuLost(f"GPU {gpu.index} ({gpu.uuid}, {gpu.pci_bus_id}) is lost: {exc}") from exc
            except nv.NVMLError:
                continue
            out.append(point("hw.gpu.nvlink.up", 1 if state else 0, link=link, **gpu.labels))
            for counter, ename in NVLINK_ERRORS.items():
                value = self._call(gpu, nv.nvmlDeviceGetNvLinkErrorCounter, link, counter)
                if value is not None:
                    out.append(point("hw.gpu.nvlink.errors", value, link=link, type=ename, **gpu.labels))
        return out

    # ------------------------------------------------------------------ XID events
    def start_events(self, sink: EventSink) -> None:
        if self.xid_events is False or self._thread is not None or not self._init():
            return
        nv = self.nvml
        gpus = self._discover()
        event_set = nv.nvmlEventSetCreate()
        registered = 0
        for gpu in gpus:
            if gpu.handle is None:
                continue
            try:
                nv.nvmlDeviceRegisterEvents(gpu.handle, nv.nvmlEventTypeXidCriticalError, event_set)
                registered += 1
            except nv.NVMLError as exc:
                log.warning("nvml: GPU %d cannot deliver XID events: %s", gpu.index, exc)
        if not registered:
            nv.nvmlEventSetFree(event_set)
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._wait_events, args=(event_set, sink, gpus),
                                        name="nvml-xid-events", daemon=True)
        self._thread.start()

    def stop_events(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # at most one EVENT_WAIT_MS wait away
            self._thread = None

    def _wait_events(self, event_set: Any, sink: EventSink, gpus: list[Gpu]) -> None:
        nv = self.nvml
        by_uuid = {g.uuid: g for g in gpus if g.handle is not None}
        try:
            while not self._stop.is_set():
                try:
                    data = nv.nvmlEventSetWait(event_set, EVENT_WAIT_MS)
                except nv.NVMLError_Timeout:
                    continue
                except nv.NVMLError as exc:
                    log.warning("nvml: event wait failed: %s", exc)
                    self._stop.wait(1.0)
                    continue
                if not data.eventType & nv.nvmlEventTypeXidCriticalError:
                    continue
                if self._kernel_log_counts_xids():
                    continue  # the xid source counts (and pushes) this one from the kernel log
                # The event's device handle is a fresh object; its uuid identifies the GPU.
                try:
                    gpu = by_uuid.get(_text(nv.nvmlDeviceGetUUID(data.device)))
                except nv.NVMLError:
                    gpu = None
                if gpu is None:
                    continue
                xid = int(data.eventData)
                with self._xid_lock:
                    key = (gpu.index, xid)
                    self._xid_counts[key] = self._xid_counts.get(key, 0) + 1
                    count = self._xid_counts[key]
                try:
                    sink([point("hw.gpu.xid.errors", count, xid=xid, **gpu.labels)])
                except Exception:  # noqa: BLE001 - the next scrape carries the counter anyway
                    log.exception("nvml: XID event sink failed")
        finally:
            try:
                nv.nvmlEventSetFree(event_set)
            except nv.NVMLError:
                pass

    def _kernel_log_counts_xids(self) -> bool:
        return self.xid_events is None and kernel_log_followed()

    def close(self) -> None:
        self.stop_events()
        if self._initialized:
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError:
                pass
            self._initialized = False
