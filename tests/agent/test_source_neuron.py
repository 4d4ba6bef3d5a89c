"""NeuronSource against recorded neuron-monitor output (tests/fixtures/neuron/*.jsonl).

Report mapping is checked by feeding recorded lines (feed_line, what the reader thread calls);
process handling runs the real child process tests/fixtures/neuron/fake-neuron-monitor.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from agent.sources.neuron import NeuronMonitorError, NeuronSource
from tests.support import FIXTURES

NEURON = FIXTURES / "neuron"
FAKE = [sys.executable, str(NEURON / "fake-neuron-monitor")]


def fed(name: str, upto: int | None = None) -> NeuronSource:
    src = NeuronSource(FAKE)
    for line in (NEURON / name).read_bytes().split(b"\n")[:upto]:
        src.feed_line(line)
    return src


def snapshot(src: NeuronSource):
    return src.current()


def get(points, name, chip, **attrs):
    found = [p.value for p in points if p.name == name and p.attributes["chip"] == str(chip)
             and all(p.attributes.get(k) == str(v) for k, v in attrs.items())]
    assert len(found) <= 1
    return found[0] if found else None


def wait_until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_trn1_report_mapping_and_cumulative_counters():
    points = snapshot(fed("trn1.jsonl"))
    assert {p.attributes["chip"] for p in points} == {str(i) for i in range(16)}
    assert get(points, "hw.neuroncore.utilization", 0, core=0) == pytest.approx(0.87)    # 87.0 %
    assert get(points, "hw.neuroncore.utilization", 0, core=1) == pytest.approx(0.881)
    assert get(points, "hw.gpu.utilization", 0) == pytest.approx((0.87 + 0.881) / 2)
    assert get(points, "hw.gpu.memory.usage", 0) == 2 * (193986816 + 176285056 + 20971520)
    assert get(points, "hw.gpu.memory.limit", 15) == 34359738368
    # ECC period counts summed: device 5 saw 2 then 1 corrected HBM errors.
    assert get(points, "hw.gpu.ecc.errors", 5, memory="hbm", type="corrected", scope="volatile") == 3
    assert get(points, "hw.gpu.ecc.errors", 11, memory="sram", type="corrected", scope="volatile") == 4
    assert get(points, "hw.gpu.ecc.errors", 0, memory="hbm", type="uncorrected", scope="volatile") == 0
    assert get(points, "hw.neuron.executions", 0, status="completed") == 120 + 118 + 121
    assert get(points, "hw.neuron.execution.errors", 0, type="numerical") == 1
    assert get(points, "hw.neuron.execution.latency", 0, percentile="p50") == 0.0412
    info = [p for p in points if p.name == "hw.gpu.info" and p.attributes["chip"] == "5"][0]
    assert dict(info.attributes) == {"chip": "5", "uuid": "i-0a1b2c3d4e5f60001-nd5", "vendor": "aws",
                                     "model": "trainium", "instance_type": "trn1.32xlarge"}
    assert len([p for p in points if p.name == "hw.neuroncore.utilization"]) == 32


def test_trn2_runtimes_appear_and_vanish():
    src = fed("trn2.jsonl", upto=1)
    points = snapshot(src)
    assert get(points, "hw.gpu.utilization", 8) == pytest.approx((47.25 + 47.75 + 48.25 + 48.75) / 400)
    assert get(points, "hw.neuron.execution.latency", 8, percentile="p99") == pytest.approx(0.1034 * 1.15)
    src.feed_line((NEURON / "trn2.jsonl").read_bytes().split(b"\n")[1])
    assert get(snapshot(src), "hw.neuron.execution.latency", 8, percentile="p99") is None   # null latency
    src.feed_line((NEURON / "trn2.jsonl").read_bytes().split(b"\n")[2])
    points = snapshot(src)                  # runtime job-b is gone
    assert get(points, "hw.gpu.utilization", 8) == 0
    assert get(points, "hw.gpu.memory.usage", 8) == 0
    assert get(points, "hw.neuron.execution.latency", 8, percentile="p50") is None
    assert get(points, "hw.gpu.utilization", 0) == pytest.approx(0.90375)
    assert get(points, "hw.gpu.memory.usage", 0) == 4 * (4294967296 + 268435456 + 536870912 + 67108864 + 8589934592)
    assert get(points, "hw.gpu.memory.limit", 0) == 103079215104
    # Its counters stay: they are cumulative for the agent's lifetime.
    assert get(points, "hw.neuron.execution.errors", 8, type="hardware") == 1
    assert get(points, "hw.neuron.executions", 8, status="completed") == 160
    assert get(points, "hw.neuron.executions", 8, status="completed_with_err") == 1
    assert get(points, "hw.neuron.executions", 0, status="completed") == 240 + 241 + 242
    assert get(points, "hw.gpu.ecc.errors", 9, memory="sram", type="uncorrected", scope="volatile") == 1
    assert {p.attributes["model"] for p in points} == {"trainium2"}
    assert len([p for p in points if p.name == "hw.neuroncore.utilization"]) == 64


def test_edge_lines_truncated_garbage_errors_and_repeats():
    src = fed("edge.jsonl", upto=4)
    assert src.bad_lines == 2                                   # truncated JSON, a log line
    points = snapshot(src)
    assert get(points, "hw.neuron.execution.latency", 0, percentile="p50") is None   # null latency
    assert get(points, "hw.neuron.execution.errors", 0, type="transient") == 2
    src = fed("edge.jsonl")
    assert src.bad_lines == 3                                   # ... and a JSON array
    points = snapshot(src)
    # Line 5 repeats line 4's groups exactly: not a new period, not counted again.
    assert get(points, "hw.neuron.execution.errors", 0, type="transient") == 2
    # The truncated line (5 errors) and the group reporting an error (7) add nothing.
    assert get(points, "hw.gpu.ecc.errors", 0, memory="hbm", type="uncorrected", scope="volatile") == 1
    assert get(points, "hw.gpu.ecc.errors", 0, memory="hbm", type="corrected", scope="volatile") == 2
    assert get(points, "hw.neuroncore.utilization", 1, core=3) == 0.8                # runtime is back


def test_runs_neuron_monitor_and_restarts_it_when_it_exits():
    src = NeuronSource(FAKE + [str(NEURON / "trn1.jsonl"), "--period", "0.05", "--exit-after", "2"],
                       backoff_initial=0.05, backoff_max=0.2, first_report_timeout=15)
    try:
        assert get(src.collect(), "hw.gpu.memory.limit", 0) == 34359738368
        assert wait_until(lambda: src.restarts >= 2), src.last_error
        assert "exited with status 1" in src.last_error
        # Each run replays the first two periods again: they are new reports, counted as such.
        assert get(src.collect(), "hw.neuron.executions", 0, status="completed") >= 2 * (120 + 118)
    finally:
        src.close()


def test_a_hung_neuron_monitor_is_killed_and_restarted():
    src = NeuronSource(FAKE + [str(NEURON / "trn1.jsonl"), "--period", "0.05", "--hang-after", "1"],
                       hang_timeout=0.5, hang_periods=0, backoff_initial=0.05, first_report_timeout=15)
    try:
        src.collect()
        assert wait_until(lambda: src.hangs >= 1 and src.restarts >= 1)
        assert "hung" in src.last_error
    finally:
        src.close()


def test_the_hang_limit_follows_neuron_monitors_own_period():
    first = (NEURON / "trn1.jsonl").read_bytes().split(b"\n")[0]
    src = NeuronSource(FAKE)                     # hang_timeout 30 s, hang_periods 3
    assert src.silence_limit() == 30.0           # before any report
    src.feed_line(first)                         # its longest group period: 5.030213182 s
    assert src.silence_limit() == 30.0
    slow = NeuronSource(FAKE, hang_timeout=1.0)
    slow.feed_line(first)
    assert slow.silence_limit() == pytest.approx(3 * 5.030213182)


def test_missing_or_garbage_monitor_never_crashes_and_backs_off(tmp_path):
    src = NeuronSource([str(tmp_path / "neuron-monitor")], backoff_initial=0.01, backoff_max=0.08,
                       first_report_timeout=0.5)
    try:
        with pytest.raises(NeuronMonitorError, match="no report.*cannot start"):
            src.collect()
        assert wait_until(lambda: src.restarts >= 6)
        assert src.backoff == 0.08                                # doubled, then capped
    finally:
        src.close()
    noise = NeuronSource([sys.executable, "-c", "import time\nwhile True: print('garbage', flush=True); time.sleep(0.02)"],
                         first_report_timeout=0.5)
    try:
        with pytest.raises(NeuronMonitorError, match="no report"):
            noise.collect()
        assert noise.bad_lines > 3
    finally:
        noise.close()


def test_close_stops_the_child_process():
    src = NeuronSource(FAKE + [str(NEURON / "trn2.jsonl"), "--period", "0.05"], first_report_timeout=15)
    src.collect()
    pid = src._proc.pid
    src.close()
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
                      open(f"/proc/{pid}/stat").read().split()[2] == "Z", timeout=5)


def test_not_supported_without_neuron_monitor(tmp_path):
    ok, why = NeuronSource([str(tmp_path / "neuron-monitor")]).supported()
    assert not ok and "not found" in why
    assert NeuronSource([]).supported()[0] is False
    assert NeuronSource([str(NEURON / "fake-neuron-monitor")]).supported() == (True, "")
