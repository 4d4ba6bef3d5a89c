"""PowerSource against tests/fixtures/sysfs/class/{hwmon,powercap} and a recorded ipmitool reading."""

from __future__ import annotations

import shutil
import sys

from agent.sources.power import PowerSource, parse_dcmi
from tests.support import FIXTURES

SYSFS = FIXTURES / "sysfs"
FAKE_IPMITOOL = [str(FIXTURES / "ipmitool" / "fake-ipmitool"), "dcmi", "power", "reading"]


def values(points, name):
    return {tuple(sorted(p.attributes.items())): p.value for p in points if p.name == name}


def sensors(points, name):
    return {p.attributes["sensor"]: p.value for p in points if p.name == name}


def test_hwmon_units_are_converted_to_base_units():
    points = PowerSource(SYSFS, FAKE_IPMITOOL).collect()
    temps = sensors(points, "hw.host.temperature")
    assert temps["coretemp/Package id 0"] == 61.0          # 61000 millidegree
    assert temps["coretemp/Core 3"] == 58.0
    assert temps["nvme/Composite"] == 38.85
    assert temps["nct6798/temp1"] == 33.0                  # unlabelled -> tempN
    assert len(temps) == 5 + 3 + 2
    limits = values(points, "hw.host.temperature.limit")
    assert limits[(("sensor", "coretemp/Package id 0"), ("threshold", "critical"))] == 110.0
    assert limits[(("sensor", "nvme/Composite"), ("threshold", "max"))] == 81.85
    assert (("sensor", "nvme/Sensor 2"), ("threshold", "max")) not in limits
    power = sensors(points, "hw.host.power")
    assert power["power_meter/power1"] == 1484.0           # power1_average, microwatts -> W
    assert power["amd_energy/Psocket0"] == 245.5
    assert sensors(points, "hw.host.energy")["amd_energy/Esocket0"] == 987654.321012  # uJ -> J
    assert sensors(points, "hw.fan.speed") == {"nct6798/fan1": 8160, "nct6798/fan2": 8040,
                                              "nct6798/fan3": 0, "nct6798/fan4": 12120}


def test_rapl_zones_and_ipmi_dcmi():
    points = PowerSource(SYSFS, FAKE_IPMITOOL).collect()
    energy = sensors(points, "hw.host.energy")
    assert energy["rapl/package-0"] == 123456.789012
    assert energy["rapl/package-0/dram"] == 23456.789012
    assert energy["rapl/package-1/dram"] == 22222.222222
    power = sensors(points, "hw.host.power")
    assert power["dcmi_instantaneous"] == 4120.0
    assert power["dcmi_average"] == 4010.0


def test_rapl_wrap_around_keeps_the_counter_monotonic(tmp_path):
    shutil.copytree(SYSFS / "class" / "powercap", tmp_path / "class" / "powercap")
    zone = tmp_path / "class/powercap/intel-rapl:0/energy_uj"
    src = PowerSource(tmp_path, ipmitool_command=None)
    zone.write_text("262143000000\n")                       # just below the wrap point
    first = sensors(src.collect(), "hw.host.energy")["rapl/package-0"]
    assert first == 262143.0
    zone.write_text("1000\n")                               # wrapped at 262143328850
    second = sensors(src.collect(), "hw.host.energy")["rapl/package-0"]
    assert round((second - first) * 1e6) == 328850 + 1000  # the energy actually spent
    zone.write_text("501000\n")
    third = sensors(src.collect(), "hw.host.energy")["rapl/package-0"]
    assert round((third - second) * 1e6) == 500000


def test_duplicate_hwmon_names_get_distinct_sensors(tmp_path):
    shutil.copytree(SYSFS / "class" / "hwmon", tmp_path / "class" / "hwmon")
    shutil.copytree(tmp_path / "class/hwmon/hwmon1", tmp_path / "class/hwmon/hwmon12")
    (tmp_path / "class/hwmon/hwmon12/temp1_input").write_text("50000\n")
    temps = sensors(PowerSource(tmp_path, None).collect(), "hw.host.temperature")
    assert temps["nvme/Composite"] == 38.85 and temps["nvme-2/Composite"] == 50.0


def test_failing_or_missing_ipmitool_leaves_only_dcmi_out(tmp_path):
    for command in ([str(tmp_path / "no-such-ipmitool")], [sys.executable, "-c", "raise SystemExit(1)"],
                    [sys.executable, "-c", "print('Could not open device')"]):
        src = PowerSource(SYSFS, command)
        points = src.collect()
        power = sensors(points, "hw.host.power")
        assert "dcmi_instantaneous" not in power and "dcmi_average" not in power
        assert power["power_meter/power1"] == 1484.0
        assert src.ipmi_error
    slow = PowerSource(SYSFS, [sys.executable, "-c", "import time; time.sleep(30)"], ipmitool_timeout=0.5)
    assert "dcmi_average" not in sensors(slow.collect(), "hw.host.power")
    assert "timed out" in slow.ipmi_error


def test_deactivated_dcmi_reading_is_left_out():
    text = (FIXTURES / "ipmitool" / "dcmi-power-reading.txt").read_text()
    assert parse_dcmi(text) == {"dcmi_instantaneous": 4120.0, "dcmi_average": 4010.0}
    assert parse_dcmi(text.replace("activated", "deactivated")) == {}


def test_not_supported_without_hwmon_rapl_or_ipmitool(tmp_path):
    ok, why = PowerSource(tmp_path, [str(tmp_path / "ipmitool")]).supported()
    assert not ok and "hwmon" in why
    assert PowerSource(SYSFS, None).supported() == (True, "")
    assert PowerSource(tmp_path, FAKE_IPMITOOL).supported() == (True, "")
