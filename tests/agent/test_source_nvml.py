"""NvmlSource through an injected, recorded NVML (tests/agent/nvml_replay.py): 8 B200-like GPUs."""

from __future__ import annotations

import copy
import json
import threading
import time

import pynvml
import pytest

from agent.sources.nvml import NvmlSource
from tests.agent.nvml_replay import NvmlReplay
from tests.support import FIXTURES

RECORDING = json.loads((FIXTURES / "nvml" / "recorded_b200x8.json").read_text())
UUID = [d["uuid"] for d in RECORDING["devices"]]


def collect(doc=RECORDING, **kw):
    src = NvmlSource(nvml=NvmlReplay(copy.deepcopy(doc)), **kw)
    assert src.supported() == (True, "")
    return src, src.collect()


def value(points, name, chip, **attrs):
    found = [p.value for p in points if p.name == name and p.attributes["chip"] == str(chip)
             and all(p.attributes.get(k) == str(v) for k, v in attrs.items())]
    assert len(found) == 1, (name, chip, attrs, found)
    return found[0]


def names(points, chip):
    return {p.name for p in points if p.attributes.get("chip") == str(chip)}


def test_units_are_converted_to_the_catalog():
    _, points = collect()
    assert value(points, "hw.gpu.utilization", 0) == 0.97
    assert value(points, "hw.gpu.memory_controller.utilization", 1) == 0.39
    assert value(points, "hw.gpu.memory.limit", 0) == 183359 * 2**20
    assert value(points, "hw.gpu.memory.usage", 2) == 168000 * 2**20
    assert value(points, "hw.power", 1) == pytest.approx(908.217)            # mW -> W
    assert value(points, "hw.power.limit", 1) == 1000.0
    assert value(points, "hw.energy", 0) == pytest.approx(412345678.901)     # mJ -> J
    assert value(points, "hw.temperature", 4, sensor="gpu") == 56
    assert value(points, "hw.temperature", 4, sensor="memory") == 42         # field 82
    assert value(points, "hw.temperature.limit", 0, sensor="gpu", threshold="slowdown") == 94
    assert value(points, "hw.temperature.limit", 0, sensor="memory", threshold="memory_max") == 95
    assert value(points, "hw.gpu.clock", 0, clock="sm") == 1965e6            # MHz -> Hz
    assert value(points, "hw.gpu.clock", 7, clock="sm") == 345e6
    assert value(points, "hw.gpu.pcie.replays", 5) == 3
    assert value(points, "hw.gpu.recovery_action", 0) == 0


def test_chip_labels_and_info():
    _, points = collect()
    assert {p.attributes["chip"] for p in points} == {str(i) for i in range(8)}
    info = [p for p in points if p.name == "hw.gpu.info" and p.attributes["chip"] == "4"]
    assert [dict(p.attributes) for p in info] == [{
        "chip": "4", "uuid": UUID[4], "vendor": "nvidia", "model": "NVIDIA B200",
        "driver_version": "570.124.06", "pci_bus_id": "00000000:9D:00.0"}]
    assert all(p.attributes["uuid"] == UUID[int(p.attributes["chip"])] for p in points)


def test_each_clock_event_reason_is_its_own_series():
    _, points = collect()
    active = lambda chip: {p.attributes["reason"] for p in points if p.name == "hw.gpu.clock.event.active"
                           and p.attributes["chip"] == str(chip) and p.value == 1}
    assert len([p for p in points if p.name == "hw.gpu.clock.event.active"]) == 8 * 8
    assert active(0) == {"sw_power_cap"}
    assert active(2) == {"sw_power_cap", "sw_thermal"}    # 0x24
    assert active(7) == {"idle"}
    assert active(1) == set()


def test_ecc_row_remap_and_nvlink_errors_of_the_sick_gpu():
    _, points = collect()
    assert value(points, "hw.gpu.ecc.errors", 6, type="uncorrected", scope="aggregate") == 1
    assert value(points, "hw.gpu.ecc.errors", 3, type="corrected", scope="volatile") == 12
    assert value(points, "hw.gpu.ecc.errors", 3, type="corrected", scope="aggregate") == 340
    assert value(points, "hw.gpu.row_remap.rows", 6, type="correctable") == 2
    assert value(points, "hw.gpu.row_remap.rows", 6, type="uncorrectable") == 1
    assert value(points, "hw.gpu.row_remap.pending", 6) == 1
    assert value(points, "hw.gpu.row_remap.pending", 5) == 0
    assert value(points, "hw.gpu.row_remap.failure", 6) == 0
    assert value(points, "hw.gpu.recovery_action", 6) == 1
    assert value(points, "hw.gpu.nvlink.errors", 6, link=5, type="replay") == 1423
    assert value(points, "hw.gpu.nvlink.errors", 6, link=5, type="crc_flit") == 87
    assert value(points, "hw.gpu.nvlink.up", 6, link=11) == 0
    assert value(points, "hw.gpu.nvlink.up", 6, link=10) == 1
    # 18 links per GPU; 3 of the 4 DL counters exist on NVLink5 (crc_data is NotSupported).
    assert len([p for p in points if p.name == "hw.gpu.nvlink.up"]) == 8 * 18
    assert len([p for p in points if p.name == "hw.gpu.nvlink.errors"]) == 8 * 18 * 3


def test_not_supported_calls_leave_only_their_metric_out():
    src, points = collect()
    assert "hw.gpu.retired_pages" not in names(points, 0)
    assert "hw.gpu.retired_pages.pending" not in names(points, 0)
    assert not any(p.attributes.get("type") == "crc_data" for p in points)
    assert src.errors == [] and src.lost == {}
    # A field entry whose nvmlReturn is NotSupported drops that field only.
    doc = copy.deepcopy(RECORDING)
    del doc["devices"][2]["calls"]["nvmlDeviceGetFieldValues"]["230"]
    doc["devices"][2]["calls"]["nvmlDeviceGetPowerUsage"] = {"error": "NoPermission"}
    doc["devices"][2]["calls"]["nvmlDeviceGetTotalEnergyConsumption"] = {"error": "FunctionNotFound"}
    _, points = collect(doc)
    assert {"hw.gpu.recovery_action", "hw.power", "hw.energy"}.isdisjoint(names(points, 2))
    assert value(points, "hw.temperature", 2, sensor="memory") == 43
    assert "hw.gpu.recovery_action" in names(points, 1)


def test_pre_ampere_retired_pages_are_counted():
    doc = copy.deepcopy(RECORDING)
    calls = doc["devices"][0]["calls"]
    calls["nvmlDeviceGetRetiredPages"] = {"0": [4096, 8192, 12288], "1": [65536]}
    calls["nvmlDeviceGetRetiredPagesPendingStatus"] = 1
    _, points = collect(doc)
    assert value(points, "hw.gpu.retired_pages", 0, cause="single_bit") == 3
    assert value(points, "hw.gpu.retired_pages", 0, cause="double_bit") == 1
    assert value(points, "hw.gpu.retired_pages.pending", 0) == 1


def test_a_lost_gpu_keeps_the_other_gpus_data():
    doc = copy.deepcopy(RECORDING)
    doc["devices"][5]["calls"]["nvmlDeviceGetUtilizationRates"] = {"error": "GpuIsLost"}
    src, points = collect(doc)
    assert "5" not in {p.attributes["chip"] for p in points if p.name != "hw.gpu.info"}
    assert {p.attributes["chip"] for p in points} >= {"0", "1", "2", "3", "4", "6", "7"}
    assert list(src.lost) == [5] and UUID[5] in src.lost[5] and "lost" in src.lost[5]
    # Lost before its identity could be read (every call raises): the same, found at discovery.
    doc = copy.deepcopy(RECORDING)
    doc["devices"][2]["error"] = "GpuIsLost"
    src, points = collect(doc)
    assert {p.attributes["chip"] for p in points} == {"0", "1", "3", "4", "5", "6", "7"}
    assert list(src.lost) == [2] and "GPU is lost" in src.lost[2]


def test_an_unexpected_nvml_error_is_recorded_not_raised():
    doc = copy.deepcopy(RECORDING)
    doc["devices"][1]["calls"]["nvmlDeviceGetPcieReplayCounter"] = {"error": "Unknown"}
    src, points = collect(doc)
    assert "hw.gpu.pcie.replays" not in names(points, 1)
    assert len(src.errors) == 1 and "nvmlDeviceGetPcieReplayCounter" in src.errors[0]


def test_xid_events_are_pushed_at_once_and_counted():
    src = NvmlSource(nvml=NvmlReplay(copy.deepcopy(RECORDING)), xid_events=True)
    got, done = [], threading.Event()

    def sink(points):
        got.extend(points)
        if len(got) == 3:
            done.set()

    src.start_events(sink)
    try:
        assert done.wait(10), f"recorded XID events not delivered: {got}"
    finally:
        src.stop_events()
    assert [(p.attributes["chip"], p.attributes["xid"], p.value) for p in got] == \
        [("4", "79", 1.0), ("1", "13", 1.0), ("1", "13", 2.0)]
    assert got[0].attributes["uuid"] == UUID[4]
    xids = {(p.attributes["chip"], p.attributes["xid"]): p.value for p in src.collect() if p.name == "hw.gpu.xid.errors"}
    assert xids == {("4", "79"): 1, ("1", "13"): 2}


def test_stop_events_returns_promptly_and_xid_events_can_be_off():
    replay = NvmlReplay({**copy.deepcopy(RECORDING), "events": []})
    src = NvmlSource(nvml=replay)
    src.start_events(lambda points: None)
    replay.push_event(2, 48)
    t0 = time.monotonic()
    src.stop_events()
    assert time.monotonic() - t0 < 2
    off = NvmlSource(nvml=NvmlReplay(copy.deepcopy(RECORDING)), xid_events=False)
    off.start_events(lambda points: pytest.fail("events are off"))
    off.stop_events()
    assert not any(p.name == "hw.gpu.xid.errors" for p in off.collect())


def test_not_supported_without_a_driver():
    src = NvmlSource(nvml=NvmlReplay(RECORDING, init_error="LibraryNotFound"))
    ok, why = src.supported()
    assert not ok and "needs an NVIDIA GPU and driver" in why
    with pytest.raises(RuntimeError, match="nvmlInit failed"):
        src.collect()
    assert issubclass(pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError)


def test_the_real_pynvml_without_a_driver_says_not_supported():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present: tests/agent/test_source_nvml_gpu.py covers it (-m gpu)")
    ok, why = NvmlSource().supported()          # nvml=None: the source imports pynvml itself
    assert not ok and "needs an NVIDIA GPU and driver (libnvidia-ml)" in why


def test_by_default_nvml_leaves_xids_to_a_kernel_log_source(tmp_path):
    """Both would count the same XIDs under the same labels: one counter per node."""
    from agent.sources.xid import XidSource

    kernel_log = XidSource(FIXTURES / "kmsg" / "kmsg.log", FIXTURES / "procfs", tmp_path)
    kernel_log.collect()                      # reading the kernel log
    replay = NvmlReplay(copy.deepcopy(RECORDING))
    src = NvmlSource(nvml=replay)             # xid_events=None: auto
    got: list = []
    src.start_events(got.extend)
    try:
        deadline = time.monotonic() + 10
        while not replay.events_delivered() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert replay.events_delivered()
        time.sleep(0.1)
    finally:
        src.stop_events()
    assert got == []
    assert not any(p.name == "hw.gpu.xid.errors" for p in src.collect())
    # Once the kernel log is not read any more, NVML's events count.
    kernel_log.close()
    replay.push_event(6, 74)
    src.start_events(got.extend)
    try:
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        src.stop_events()
    assert [(p.attributes["chip"], p.attributes["xid"], p.value) for p in got] == [("6", "74", 1.0)]
