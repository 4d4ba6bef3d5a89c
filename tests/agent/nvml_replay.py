"""A recorded NVML: the pynvml functions NvmlSource uses, answering from a JSON recording.

It is injected as NvmlSource(nvml=NvmlReplay(path)) the way the real `pynvml` module is; nothing
is patched. Errors are the real pynvml exception classes (pynvml.NVMLError_NotSupported, ...), and
pynvml's constants (NVML_CLOCK_SM, nvmlEventTypeXidCriticalError, ...) come from pynvml itself.

Recording format (tests/fixtures/nvml/recorded_b200x8.json):
  devices[i].calls[<function name>] is the return value; a dict keyed by the call's extra
  arguments joined with "," ("1" or "0,1") when the call takes arguments; {"error": "NotSupported"}
  at any level raises pynvml.NVMLError_NotSupported. devices[i].error makes every call on that
  GPU raise (e.g. "GpuIsLost"). events[] are XIDs that nvmlEventSetWait delivers after_ms after the
  first wait; push_event() adds one at run time.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

_VALUE_TYPES = {"double": (0, "dVal"), "uint": (1, "uiVal"), "ulong": (2, "ulVal"),
                "ulonglong": (3, "ullVal"), "slonglong": (4, "sllVal"), "int": (5, "siVal")}


def _raise(name: str):
    raise getattr(pynvml, f"NVMLError_{name}")()


class Handle:
    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"<replay GPU {self.index}>"


class NvmlReplay:
    def __init__(self, recording: Path | str | dict, init_error: str | None = None):
        self.doc = recording if isinstance(recording, dict) else json.loads(Path(recording).read_text())
        self.init_error = init_error
        self.initialized = False
        self.calls = collections.Counter()
        self._events: list[tuple[float, int, int]] = []
        self._first_wait: float | None = None
        self._registered: set[int] = set()
        self._lock = threading.Lock()

    # pynvml's constants and exception classes, so the replay is a drop-in module.
    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML", "nvmlEventType")):
            return getattr(pynvml, name)
        raise AttributeError(name)

    # ---------------------------------------------------------------- helpers
    def _device(self, handle: Handle) -> dict:
        if not self.initialized:
            _raise("Uninitialized")
        dev = self.doc["devices"][handle.index]
        if dev.get("error"):
            _raise(dev["error"])
        return dev

    def _answer(self, fn: str, handle: Handle, *args: Any) -> Any:
        self.calls[fn] += 1
        calls = self._device(handle)["calls"]
        if fn not in calls:
            _raise("FunctionNotFound")
        value = calls[fn]
        if isinstance(value, dict) and "error" in value:
            _raise(value["error"])
        if args:
            key = str(args[0]) if len(args) == 1 else ",".join(map(str, args))
            if key not in value:
                _raise("InvalidArgument")
            value = value[key]
            if isinstance(value, dict) and "error" in value:
                _raise(value["error"])
        return value

    # ---------------------------------------------------------------- setup
    def nvmlInit(self):
        if self.init_error:
            _raise(self.init_error)
        self.initialized = True

    def nvmlShutdown(self):
        self.initialized = False

    def nvmlSystemGetDriverVersion(self):
        return self.doc["driver_version"]

    def nvmlDeviceGetCount(self):
        if not self.initialized:
            _raise("Uninitialized")
        return len(self.doc["devices"])

    def nvmlDeviceGetHandleByIndex(self, index: int):
        if not 0 <= index < self.nvmlDeviceGetCount():
            _raise("InvalidArgument")
        return Handle(index)

    def nvmlDeviceGetName(self, h):
        return self._device(h)["name"]

    def nvmlDeviceGetUUID(self, h):
        return self._device(h)["uuid"]

    def nvmlDeviceGetPciInfo(self, h):
        # pynvml returns the ctypes struct, whose char arrays read as bytes.
        return SimpleNamespace(busId=self._device(h)["pci_bus_id"].encode())

    # ---------------------------------------------------------------- readings
    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(**self._answer("nvmlDeviceGetUtilizationRates", h))

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(**self._answer("nvmlDeviceGetMemoryInfo", h))

    def nvmlDeviceGetPowerUsage(self, h):
        return self._answer("nvmlDeviceGetPowerUsage", h)

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._answer("nvmlDeviceGetEnforcedPowerLimit", h)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self._answer("nvmlDeviceGetTotalEnergyConsumption", h)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self._answer("nvmlDeviceGetTemperature", h, sensor)

    def nvmlDeviceGetTemperatureThreshold(self, h, threshold):
        return self._answer("nvmlDeviceGetTemperatureThreshold", h, threshold)

    def nvmlDeviceGetClockInfo(self, h, clock):
        return self._answer("nvmlDeviceGetClockInfo", h, clock)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._answer("nvmlDeviceGetCurrentClocksEventReasons", h)

    def nvmlDeviceGetTotalEccErrors(self, h, error_type, counter_type):
        return self._answer("nvmlDeviceGetTotalEccErrors", h, error_type, counter_type)

    def nvmlDeviceGetRetiredPages(self, h, cause):
        return self._answer("nvmlDeviceGetRetiredPages", h, cause)

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h):
        return self._answer("nvmlDeviceGetRetiredPagesPendingStatus", h)

    def nvmlDeviceGetRemappedRows(self, h):
        return tuple(self._answer("nvmlDeviceGetRemappedRows", h))

    def nvmlDeviceGetPcieReplayCounter(self, h):
        return self._answer("nvmlDeviceGetPcieReplayCounter", h)

    def nvmlDeviceGetNvLinkState(self, h, link):
        return self._answer("nvmlDeviceGetNvLinkState", h, link)

    def nvmlDeviceGetNvLinkErrorCounter(self, h, link, counter):
        return self._answer("nvmlDeviceGetNvLinkErrorCounter", h, link, counter)

    def nvmlDeviceGetFieldValues(self, h, field_ids):
        recorded = self._answer("nvmlDeviceGetFieldValues", h)
        out = []
        for fid in field_ids:
            entry = recorded.get(str(fid), {"return": "NotSupported"})
            if "return" in entry:
                code = getattr(pynvml, "NVML_ERROR_" + {"NotSupported": "NOT_SUPPORTED"}.get(entry["return"], entry["return"]))
                out.append(SimpleNamespace(fieldId=fid, nvmlReturn=code, valueType=0, value=SimpleNamespace(dVal=0.0)))
                continue
            vtype, attr = _VALUE_TYPES[entry["type"]]
            out.append(SimpleNamespace(fieldId=fid, nvmlReturn=0, valueType=vtype,
                                       value=SimpleNamespace(**{attr: entry["value"]})))
        return out

    # ---------------------------------------------------------------- events
    def nvmlEventSetCreate(self):
        return object()

    def nvmlDeviceRegisterEvents(self, h, event_types, event_set):
        self._device(h)
        if event_types & pynvml.nvmlEventTypeXidCriticalError:
            self._registered.add(h.index)

    def nvmlEventSetFree(self, event_set):
        pass

    def push_event(self, index: int, xid: int) -> None:
        with self._lock:
            self._events.append((time.monotonic(), index, xid))
            self._events.sort()

    def events_delivered(self) -> bool:
        """True once waiting has begun and every recorded/pushed event has been handed out."""
        with self._lock:
            return self._first_wait is not None and not self._events

    def nvmlEventSetWait(self, event_set, timeout_ms):
        now = time.monotonic()
        with self._lock:
            if self._first_wait is None:
                self._first_wait = now
                for e in self.doc.get("events", []):
                    self._events.append((now + e["after_ms"] / 1000, e["index"], e["xid"]))
                self._events.sort()
            due = self._events[0][0] if self._events else None
        deadline = now + timeout_ms / 1000
        if due is None or due > deadline:
            time.sleep(max(0.0, deadline - now))
            _raise("Timeout")
        time.sleep(max(0.0, due - now))
        with self._lock:
            _, index, xid = self._events.pop(0)
        if index not in self._registered:
            _raise("Timeout")
        return SimpleNamespace(device=Handle(index), eventType=pynvml.nvmlEventTypeXidCriticalError,
                               eventData=xid, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
