"""EFA (and any InfiniBand-class RDMA device) counters from sysfs.

Layout read (root injected, default /sys):
    class/infiniband/<dev>/hw_counters/<counter>              -> hw.efa.device.stat
    class/infiniband/<dev>/ports/<port>/hw_counters/<counter> -> hw.efa.port.stat
    class/infiniband/<dev>/ports/<port>/state   "4: ACTIVE"   -> hw.network.up
    class/infiniband/<dev>/ports/<port>/rate    "100 Gb/sec (4X EDR)" -> hw.network.bandwidth.limit

Every counter file is exported under its own file name, so counters a newer driver adds appear
without a code change and counters an older driver lacks (rdma_write_*, retrans_*) are simply
absent. A file that is not an integer (or vanishes mid-read) is skipped, not fatal.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from agent.sources.base import Point, point
from agent.sources.sysfs import read_small

# hw_counters/lifespan is a setting (how many ms the driver caches counters), not a counter.
_NOT_COUNTERS = frozenset({"lifespan"})

_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*Gb/sec")


def _read(path: Path) -> str | None:
    try:
        return read_small(path).decode("ascii", errors="replace").strip()
    except OSError:
        return None


def _counters(directory: Path) -> list[tuple[str, int]]:
    out = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    for name in names:
        if name in _NOT_COUNTERS:
            continue
        try:
            out.append((name, int(read_small(os.path.join(directory, name)))))
        except (OSError, ValueError):
            continue
    return out


def parse_rate(text: str) -> float | None:
    """'100 Gb/sec (4X EDR)' -> bytes per second (12.5e9), None when unparseable."""
    m = _RATE.match(text)
    return float(m.group(1)) * 1e9 / 8 if m else None


def parse_state(text: str) -> int:
    """'4: ACTIVE' -> 1, anything else ('1: DOWN', '2: INIT', ...) -> 0."""
    return 1 if text.partition(":")[2].strip().upper() == "ACTIVE" else 0


class EfaSource:
    name = "efa"

    def __init__(self, sysfs_root: str | Path = "/sys"):
        self.class_dir = Path(sysfs_root) / "class" / "infiniband"

    def _devices(self) -> list[Path]:
        try:
            return sorted(p for p in self.class_dir.iterdir() if p.is_dir())
        except OSError:
            return []

    def supported(self) -> tuple[bool, str]:
        if not self._devices():
            return False, f"no RDMA devices under {self.class_dir}"
        return True, ""

    def collect(self) -> list[Point]:
        points: list[Point] = []
        for dev in self._devices():
            device = dev.name
            for counter, value in _counters(dev / "hw_counters"):
                points.append(point("hw.efa.device.stat", value, device=device, counter=counter))
            try:
                ports = sorted((dev / "ports").iterdir(), key=lambda p: p.name)
            except OSError:
                ports = []
            for port_dir in ports:
                port = port_dir.name
                for counter, value in _counters(port_dir / "hw_counters"):
                    points.append(point("hw.efa.port.stat", value,
                                        device=device, port=port, counter=counter))
                state = _read(port_dir / "state")
                if state is not None:
                    points.append(point("hw.network.up", parse_state(state), device=device, port=port))
                rate = _read(port_dir / "rate")
                bps = parse_rate(rate) if rate is not None else None
                if bps is not None:
                    points.append(point("hw.network.bandwidth.limit", bps, device=device, port=port))
        return points
