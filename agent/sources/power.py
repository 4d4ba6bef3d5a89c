"""Host power and thermals: hwmon, RAPL (powercap) and IPMI DCMI.

Read (sysfs root and ipmitool command injected):
  class/hwmon/hwmonN/name, temp*_input/_label/_max/_crit (millidegree C), power*_input or
      power*_average (microwatt), energy*_input (microjoule), fan*_input (rpm)
  class/powercap/intel-rapl:N[:M]/{name,energy_uj,max_energy_range_uj}
  `ipmitool dcmi power reading` (the BMC's whole-node power)

Sensor names: "<hwmon name>/<label>" or "<hwmon name>/<tempN|powerN|...>" when unlabelled. When
two hwmon devices share a name (two NVMe drives are both "nvme"), the second and later get
"-2", "-3" ... in hwmonN order, so series never collide. RAPL zones are "rapl/<zone name>",
subzones "rapl/<parent zone name>/<zone name>" (every package has its own "dram").

RAPL's energy_uj wraps to 0 at max_energy_range_uj. The source keeps, per zone, the last raw
reading and a running total, so hw.host.energy is a true cumulative counter across wraps (it
starts at the first raw reading, so a restarted agent looks like a counter reset, which
Prometheus' rate() handles). Zones the agent may not read (energy_uj is root-only on patched
kernels) are left out.

IPMI: a missing, failing, slow (timeout) or unparseable ipmitool leaves only the two DCMI
series out; the hwmon and RAPL data are still returned and collect() does not raise. The
reason is kept in `ipmi_error` for logs. A reading whose state is "deactivated" is left out too,
because the BMC then reports stale numbers.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Sequence

from agent.sources.base import Point, point
from agent.sources.sysfs import read_small

_TEMP = re.compile(r"^temp(\d+)_input$")
_POWER = re.compile(r"^power(\d+)_(input|average)$")
_ENERGY = re.compile(r"^energy(\d+)_input$")
_FAN = re.compile(r"^fan(\d+)_input$")
_RAPL = re.compile(r"^intel-rapl:\d+(:\d+)?$")
_DCMI = {
    "Instantaneous power reading": "dcmi_instantaneous",
    "Average power reading over sample period": "dcmi_average",
}
_WATTS = re.compile(r"^\s*([^:]+?)\s*:\s*([0-9]+(?:\.[0-9]+)?)\s*Watts", re.MULTILINE)


def _read(path: Path) -> str | None:
    try:
        return read_small(path).decode("utf-8", errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _hwmon_number(p: Path) -> int:
    digits = p.name[len("hwmon"):]
    return int(digits) if digits.isdigit() else 1 << 30


def parse_dcmi(text: str) -> dict[str, float]:
    """ipmitool dcmi power reading output -> {sensor: watts}; {} when deactivated."""
    if re.search(r"Power reading state is:\s*deactivated", text):
        return {}
    out = {}
    for m in _WATTS.finditer(text):
        sensor = _DCMI.get(m.group(1))
        if sensor:
            out[sensor] = float(m.group(2))
    return out


class PowerSource:
    name = "power"

    def __init__(self, sysfs_root: str | Path = "/sys",
                 ipmitool_command: Sequence[str] | None = ("ipmitool", "dcmi", "power", "reading"),
                 ipmitool_timeout: float = 5.0):
        self.hwmon_dir = Path(sysfs_root) / "class" / "hwmon"
        self.powercap_dir = Path(sysfs_root) / "class" / "powercap"
        self.ipmitool_command = list(ipmitool_command) if ipmitool_command else []
        self.ipmitool_timeout = ipmitool_timeout
        self.ipmi_error = ""
        # zone dir name -> (last raw uJ, cumulative uJ); guarded because the agent may call
        # collect() from its scrape loop and from /metrics at the same time.
        self._rapl: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ discovery
    def _hwmons(self) -> list[Path]:
        try:
            return sorted((p for p in self.hwmon_dir.iterdir() if p.name.startswith("hwmon")),
                          key=_hwmon_number)
        except OSError:
            return []

    def _rapl_zones(self) -> list[Path]:
        try:
            return sorted(p for p in self.powercap_dir.iterdir() if _RAPL.match(p.name))
        except OSError:
            return []

    def _ipmitool_present(self) -> bool:
        return bool(self.ipmitool_command) and shutil.which(self.ipmitool_command[0]) is not None

    def supported(self) -> tuple[bool, str]:
        if self._hwmons() or self._rapl_zones() or self._ipmitool_present():
            return True, ""
        return False, (f"no hwmon devices under {self.hwmon_dir}, no RAPL zones under "
                       f"{self.powercap_dir}, and {self.ipmitool_command[:1] or 'no ipmitool'} not found")

    # ------------------------------------------------------------------ collection
    def collect(self) -> list[Point]:
        points = self._collect_hwmon()
        points += self._collect_rapl()
        points += self._collect_ipmi()
        return points

    def _collect_hwmon(self) -> list[Point]:
        points: list[Point] = []
        seen: dict[str, int] = {}
        for hw in self._hwmons():
            base = _read(hw / "name") or hw.name
            seen[base] = seen.get(base, 0) + 1
            chip = base if seen[base] == 1 else f"{base}-{seen[base]}"
            try:
                files = sorted(f.name for f in hw.iterdir())
            except OSError:
                continue

            def sensor(prefix: str, n: str) -> str:
                return f"{chip}/{_read(hw / f'{prefix}{n}_label') or f'{prefix}{n}'}"

            powers_done: set[str] = set()
            for f in files:
                if m := _TEMP.match(f):
                    n = m.group(1)
                    milli = _read_int(hw / f)
                    if milli is None:
                        continue
                    name = sensor("temp", n)
                    points.append(point("hw.host.temperature", milli / 1000, sensor=name))
                    for suffix, threshold in (("max", "max"), ("crit", "critical")):
                        limit = _read_int(hw / f"temp{n}_{suffix}")
                        if limit is not None:
                            points.append(point("hw.host.temperature.limit", limit / 1000,
                                                sensor=name, threshold=threshold))
                elif m := _POWER.match(f):
                    n = m.group(1)
                    # Prefer the instantaneous input; fall back to the average (ACPI power meters
                    # have only power1_average).
                    if n in powers_done:
                        continue
                    micro = _read_int(hw / f"power{n}_input")
                    if micro is None:
                        micro = _read_int(hw / f"power{n}_average")
                    if micro is None:
                        continue
                    powers_done.add(n)
                    points.append(point("hw.host.power", micro / 1e6, sensor=sensor("power", n)))
                elif m := _ENERGY.match(f):
                    micro = _read_int(hw / f)
                    if micro is not None:
                        points.append(point("hw.host.energy", micro / 1e6, sensor=sensor("energy", m.group(1))))
                elif m := _FAN.match(f):
                    rpm = _read_int(hw / f)
                    if rpm is not None:
                        points.append(point("hw.fan.speed", rpm, sensor=sensor("fan", m.group(1))))
        return points

    def _collect_rapl(self) -> list[Point]:
        points: list[Point] = []
        zones = self._rapl_zones()
        names = {z.name: _read(z / "name") or z.name for z in zones}
        with self._lock:
            for zone in zones:
                raw = _read_int(zone / "energy_uj")
                if raw is None:  # unreadable (root only) or gone
                    continue
                parts = zone.name.split(":")
                label = names[zone.name]
                if len(parts) == 3:  # subzone: qualify by its package
                    label = f"{names.get(':'.join(parts[:2]), ':'.join(parts[:2]))}/{label}"
                last = self._rapl.get(zone.name)
                if last is None:
                    total = raw
                else:
                    delta = raw - last[0]
                    if delta < 0:  # wrapped past max_energy_range_uj
                        span = _read_int(zone / "max_energy_range_uj")
                        delta = delta + span if span else 0
                        delta = max(delta, 0)
                    total = last[1] + delta
                self._rapl[zone.name] = (raw, total)
                points.append(point("hw.host.energy", total / 1e6, sensor=f"rapl/{label}"))
        return points

    def _collect_ipmi(self) -> list[Point]:
        if not self.ipmitool_command:
            return []
        try:
            done = subprocess.run(self.ipmitool_command, capture_output=True, text=True,
                                  timeout=self.ipmitool_timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.ipmi_error = f"{self.ipmitool_command[0]}: {exc}"
            return []
        if done.returncode != 0:
            self.ipmi_error = (f"{' '.join(self.ipmitool_command)} exited {done.returncode}: "
                               f"{done.stderr.strip()[:200]}")
            return []
        readings = parse_dcmi(done.stdout)
        self.ipmi_error = "" if readings else "no DCMI power reading in ipmitool output"
        return [point("hw.host.power", watts, sensor=s) for s, watts in sorted(readings.items())]
