"""NvmlSource against the real pynvml on a real NVIDIA GPU (run with `pytest -m gpu`).

Skipped with "needs an NVIDIA GPU and driver (libnvidia-ml)" where nvmlInit fails. These assert
invariants that hold on any healthy GPU, not recorded values.
"""

from __future__ import annotations

import threading

import pytest

from agent.sources.nvml import NvmlSource

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def nvml():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        pytest.skip(f"needs an NVIDIA GPU and driver (libnvidia-ml): {exc}")
    yield pynvml
    pynvml.nvmlShutdown()


@pytest.fixture(scope="module")
def collected(nvml):
    src = NvmlSource()          # imports the real pynvml itself
    assert src.supported() == (True, "")
    points = src.collect()      # NotSupported paths must not raise
    yield src, points
    src.close()


def per_chip(points, name, **attrs):
    return {p.attributes["chip"]: p.value for p in points if p.name == name
            and all(p.attributes.get(k) == v for k, v in attrs.items())}


def test_one_info_series_per_gpu(nvml, collected):
    src, points = collected
    count = nvml.nvmlDeviceGetCount()
    info = [p for p in points if p.name == "hw.gpu.info"]
    assert len(info) == count
    assert {p.attributes["chip"] for p in info} == {str(i) for i in range(count)}
    for p in info:
        assert p.attributes["uuid"].startswith("GPU-")
        assert p.attributes["vendor"] == "nvidia" and p.attributes["model"]
        assert p.attributes["driver_version"]
    assert src.lost == {}


def test_invariants_of_a_healthy_gpu(collected):
    _, points = collected
    for chip, util in per_chip(points, "hw.gpu.utilization").items():
        assert 0.0 <= util <= 1.0, chip
    limits = per_chip(points, "hw.gpu.memory.limit")
    for chip, used in per_chip(points, "hw.gpu.memory.usage").items():
        assert 0 <= used <= limits[chip]
    power_limit = per_chip(points, "hw.power.limit")
    for chip, watts in per_chip(points, "hw.power").items():
        assert watts > 0
        if chip in power_limit:
            assert watts <= power_limit[chip] * 1.5
    temps = per_chip(points, "hw.temperature", sensor="gpu")
    assert temps, "no GPU temperature"
    for chip, celsius in temps.items():
        assert 10 <= celsius <= 110, (chip, celsius)
    for chip, hz in per_chip(points, "hw.gpu.clock", clock="sm").items():
        assert 1e6 <= hz <= 5e9
    for p in points:
        if p.name == "hw.gpu.clock.event.active":
            assert p.value in (0.0, 1.0)
        if p.name in ("hw.gpu.ecc.errors", "hw.gpu.pcie.replays", "hw.gpu.nvlink.errors", "hw.energy"):
            assert p.value >= 0


def test_a_second_collection_has_the_same_series(collected):
    src, points = collected
    again = src.collect()
    key = lambda ps: {(p.name, tuple(sorted(p.attributes.items()))) for p in ps}
    assert key(again) == key(points)


def test_event_thread_starts_and_stops(collected):
    src, _ = collected
    src.start_events(lambda points: None)   # registers for XID events; none expected
    stopped = threading.Event()
    threading.Thread(target=lambda: (src.stop_events(), stopped.set()), daemon=True).start()
    assert stopped.wait(5)
