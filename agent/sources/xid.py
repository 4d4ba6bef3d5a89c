"""NVIDIA XID errors from the kernel log, counted once each, also across agent restarts.

The driver logs every XID as a kernel message:
    NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.
We follow /dev/kmsg (path injected), whose records are `priority,sequence,usec,flags;message`
followed by optional " KEY=value" continuation lines. A regular file in the same format (a
recorded fixture) is read the same way.

Which GPU: the PCI bus id is mapped to the GPU's index, uuid and model through
<procfs>/driver/nvidia/gpus/<bus id>/information ("Device Minor:", "GPU UUID:", "Model:"), or
through NVML (index and uuid by PCI bus id) when an NVML handle is given, which is exact where the
minor number and NVML's index differ. A bus id found in neither is counted with empty chip/uuid.

Never twice: every record carries the kernel's sequence number, which only grows within one
boot. We persist {boot_id, last sequence, counters} atomically (write + fsync + rename) in
state_dir after each batch of new records; on start, a matching boot_id means records with a
sequence <= last are skipped, a different one (the host rebooted) starts the counters over
(a counter reset, which rate() handles). Without state_dir the dedupe holds only in memory.

Reading /dev/kmsg: it is opened non-blocking and read one record per read() until EAGAIN; EPIPE
means the ring buffer overwrote records we had not read yet, and reading simply goes on.

Events: start_events(sink) follows the log in a thread (poll() on the device, a short sleep on a
regular file) and pushes the changed XID counters at once.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import stat
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.sources.base import EventSink, Point, point

_XID = re.compile(
    r"NVRM: Xid \((?:PCI:)?([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})(?:\.[0-9a-fA-F])?\): (\d+)")
STATE_FILE = "xid-state.json"

# XidSources of this process that are reading the kernel log. NvmlSource's XID events count the
# same errors under the same labels, so by default it stands aside while one of these reads.
_following: "weakref.WeakSet[XidSource]" = weakref.WeakSet()


def kernel_log_followed() -> bool:
    """True while an XidSource in this process reads the kernel log successfully."""
    return any(src.following for src in list(_following))
_READ_SIZE = 8192  # the kernel's maximum record size is 1 KiB of text plus dictionary lines


def bus_key(domain: int | str, bus: int | str, device: int | str) -> str:
    """Canonical PCI key 'dddd:bb:dd' (lower case) from kmsg, procfs or NVML spellings."""
    as_int = lambda v: v if isinstance(v, int) else int(v, 16)  # noqa: E731
    return f"{as_int(domain):04x}:{as_int(bus):02x}:{as_int(device):02x}"


def bus_key_from_id(bus_id: str) -> str:
    """'00000000:3B:00.0' (NVML) or '0000:3b:00.0' (procfs) -> '0000:3b:00'."""
    domain, bus, rest = bus_id.strip().split(":")
    return bus_key(domain, bus, rest.split(".")[0])


def parse_record(line: str) -> tuple[int, str] | None:
    """'6,1234,5678,-;message' -> (1234, 'message'); None for continuation or garbage lines."""
    prefix, sep, message = line.partition(";")
    if not sep or line.startswith(" "):
        return None
    fields = prefix.split(",")
    if len(fields) < 3 or not fields[1].isdigit():
        return None
    return int(fields[1]), message.rstrip("\n")


def parse_xid(message: str) -> tuple[str, int] | None:
    """'NVRM: Xid (PCI:0000:3b:00): 79, ...' -> ('0000:3b:00', 79)."""
    m = _XID.search(message)
    if not m:
        return None
    return bus_key(m.group(1), m.group(2), m.group(3)), int(m.group(4))


@dataclass(frozen=True)
class Gpu:
    chip: str
    uuid: str
    model: str


def _info_fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def gpus_from_procfs(procfs_root: Path) -> dict[str, Gpu]:
    gpus = {}
    try:
        dirs = sorted((procfs_root / "driver" / "nvidia" / "gpus").iterdir())
    except OSError:
        return gpus
    for d in dirs:
        try:
            info = _info_fields((d / "information").read_text(errors="replace"))
            key = bus_key_from_id(d.name)
        except (OSError, ValueError):
            continue
        gpus[key] = Gpu(info.get("Device Minor", ""), info.get("GPU UUID", ""), info.get("Model", ""))
    return gpus


def gpus_from_nvml(nvml: Any) -> dict[str, Gpu]:
    gpus = {}
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            bus_id = nvml.nvmlDeviceGetPciInfo(handle).busId
            bus_id = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
            uuid = nvml.nvmlDeviceGetUUID(handle)
            model = nvml.nvmlDeviceGetName(handle)
        except nvml.NVMLError:
            continue  # a lost GPU: the procfs mapping still names it
        gpus[bus_key_from_id(bus_id)] = Gpu(str(index), _text(uuid), _text(model))
    return gpus


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class XidSource:
    name = "xid"

    def __init__(self, kmsg_path: str | Path = "/dev/kmsg", procfs_root: str | Path = "/proc",
                 state_dir: str | Path | None = None, nvml: Any = None):
        self.kmsg_path = Path(kmsg_path)
        self.procfs_root = Path(procfs_root)
        self.state_path = Path(state_dir) / STATE_FILE if state_dir else None
        self.nvml = nvml
        self._nvml_initialized = False
        self.lines_read = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._is_device = False
        self._offset = 0          # regular files: where the next read starts
        self._partial = b""       # regular files: an unterminated last line, kept for later
        self._gpus: dict[str, Gpu] = {}
        self._boot_id = self._read_boot_id()
        self._last_seq = -1
        self._counts: dict[tuple[str, int], int] = {}   # (bus key, xid) -> count
        self._load_state()
        self._stop = threading.Event()
        self.following = False          # the last read of the kernel log succeeded
        _following.add(self)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ state
    def _read_boot_id(self) -> str:
        try:
            return (self.procfs_root / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
        except OSError:
            return ""

    def _load_state(self) -> None:
        if not self.state_path:
            return
        try:
            doc = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            # A corrupt state file must not stop the agent; counting restarts from this boot's log.
            return
        if doc.get("boot_id") != self._boot_id:
            return  # the host rebooted: the kernel log and its sequence numbers started over
        self._last_seq = int(doc.get("last_seq", -1))
        for entry in doc.get("counts", []):
            self._counts[(entry["bus"], int(entry["xid"]))] = int(entry["count"])

    def _save_state(self) -> None:
        if not self.state_path:
            return
        doc = {"version": 1, "boot_id": self._boot_id, "last_seq": self._last_seq,
               "counts": [{"bus": b, "xid": x, "count": c} for (b, x), c in sorted(self._counts.items())]}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    # ------------------------------------------------------------------ reading the log
    def supported(self) -> tuple[bool, str]:
        try:
            fd = os.open(self.kmsg_path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            return False, f"cannot read the kernel log {self.kmsg_path}: {exc.strerror}"
        os.close(fd)
        if not (self.procfs_root / "driver" / "nvidia" / "gpus").is_dir() and self.nvml is None:
            return False, f"no NVIDIA driver ({self.procfs_root}/driver/nvidia/gpus is missing)"
        return True, ""

    def _open(self) -> int:
        if self._fd is not None and not self._is_device:
            # A regular file that was rotated (replaced) is reopened; the sequence numbers keep
            # the lines it shares with the old one from being counted twice.
            try:
                replaced = os.stat(self.kmsg_path).st_ino != os.fstat(self._fd).st_ino
            except OSError:
                replaced = False
            if replaced:
                os.close(self._fd)
                self._fd = None
        if self._fd is None:
            self._fd = os.open(self.kmsg_path, os.O_RDONLY | os.O_NONBLOCK)
            self._is_device = stat.S_ISCHR(os.fstat(self._fd).st_mode)
            self._offset, self._partial = 0, b""
        return self._fd

    def _read_lines(self) -> list[str]:
        """Every complete record line not read before (non-blocking)."""
        try:
            lines = self._read_new()
        except OSError:
            self.following = False
            raise
        self.following = True
        return lines

    def _read_new(self) -> list[str]:
        fd = self._open()
        lines: list[str] = []
        if self._is_device:
            while True:
                try:
                    chunk = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EPIPE:  # records overwritten before we read them
                        continue
                    raise
                if not chunk:
                    break
                lines.extend(chunk.decode("utf-8", errors="replace").splitlines())
            return lines
        if os.fstat(fd).st_size < self._offset:  # the file was truncated or replaced
            self._offset, self._partial = 0, b""
        data = b""
        while True:
            chunk = os.pread(fd, 1 << 16, self._offset)
            if not chunk:
                break
            self._offset += len(chunk)
            data += chunk
        data = self._partial + data
        complete, _, self._partial = data.rpartition(b"\n")
        if complete:
            lines.extend(complete.decode("utf-8", errors="replace").split("\n"))
        return lines

    def _ingest(self) -> set[tuple[str, int]]:
        """Read new records, count XIDs once each; return the (bus, xid) keys that changed."""
        changed: set[tuple[str, int]] = set()
        last = self._last_seq
        for line in self._read_lines():
            self.lines_read += 1
            record = parse_record(line)
            if record is None:
                continue
            seq, message = record
            if seq <= self._last_seq:
                continue
            last = max(last, seq)
            xid = parse_xid(message)
            if xid is not None:
                self._counts[xid] = self._counts.get(xid, 0) + 1
                changed.add(xid)
        if last != self._last_seq:
            self._last_seq = last
            self._save_state()
        return changed

    def _gpu(self, bus: str) -> Gpu:
        if bus not in self._gpus:
            # New GPUs (or a first XID) refresh the map; procfs first, NVML over it when given.
            self._gpus = gpus_from_procfs(self.procfs_root)
            if self.nvml is not None:
                try:
                    if not self._nvml_initialized:
                        self.nvml.nvmlInit()  # NVML counts inits, so sharing it with NvmlSource is fine
                        self._nvml_initialized = True
                    self._gpus.update(gpus_from_nvml(self.nvml))
                except self.nvml.NVMLError:
                    pass
        return self._gpus.get(bus, Gpu("", "", ""))

    def _points(self, keys) -> list[Point]:
        out = []
        for bus, xid in sorted(keys):
            gpu = self._gpu(bus)
            out.append(point("hw.gpu.xid.errors", self._counts[(bus, xid)], chip=gpu.chip, uuid=gpu.uuid,
                             vendor="nvidia", model=gpu.model, xid=xid))
        return out

    def collect(self) -> list[Point]:
        with self._lock:
            self._ingest()
            return self._points(self._counts)

    # ------------------------------------------------------------------ events
    def start_events(self, sink: EventSink) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._follow, args=(sink,), name="xid-events", daemon=True)
        self._thread.start()

    def stop_events(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _follow(self, sink: EventSink) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    changed = self._ingest()
                    points = self._points(changed)
                if points:
                    try:
                        sink(points)
                    except Exception:  # noqa: BLE001 - a failing sink must not stop the follower
                        pass  # the counters stay; the next scrape carries them
                self._wait()
            except OSError:
                # The log vanished or is unreadable for now; try again shortly, never die.
                self._close()
                self._stop.wait(1.0)

    def _wait(self) -> None:
        if self._is_device and self._fd is not None:
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            poller.poll(250)  # wakes at once on a new record; 250 ms bounds stop latency
            if self._stop.is_set():
                return
        else:
            self._stop.wait(0.1)

    def _close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def close(self) -> None:
        self.stop_events()
        self._close()
        self.following = False
