"""EfaSource against the recorded sysfs tree tests/fixtures/sysfs/class/infiniband (4 devices)."""

from __future__ import annotations

import shutil

from agent.sources.efa import EfaSource, parse_rate
from tests.support import FIXTURES

SYSFS = FIXTURES / "sysfs"


def by_key(points):
    return {(p.name, tuple(sorted(p.attributes.items()))): p.value for p in points}


def test_every_counter_file_becomes_a_series():
    points = EfaSource(SYSFS).collect()
    # 3 new-driver devices with 22 port counters, 1 older one with 15; 12 device counters each;
    # state and rate per port. The 'lifespan' setting file is not a counter.
    assert len([p for p in points if p.name == "hw.efa.port.stat"]) == 3 * 22 + 15
    assert len([p for p in points if p.name == "hw.efa.device.stat"]) == 4 * 12
    assert len(points) == 3 * 22 + 15 + 4 * 12 + 4 + 4
    assert not any(p.attributes.get("counter") == "lifespan" for p in points)
    values = by_key(points)
    port = lambda dev, c: values[("hw.efa.port.stat", (("counter", c), ("device", dev), ("port", "1")))]
    assert port("rdmap16s27", "tx_bytes") == 7045610009911
    assert port("rdmap16s27", "rx_drops") == 17
    assert port("rdmap16s27", "retrans_pkts") == 247384804
    assert port("rdmap160s27", "tx_bytes") == 1519471687
    assert values[("hw.efa.device.stat", (("counter", "submitted_cmds"), ("device", "rdmap16s27")))] == 313677


def test_older_driver_lacks_rdma_write_and_retrans():
    points = EfaSource(SYSFS).collect()
    old = {p.attributes["counter"] for p in points
           if p.name == "hw.efa.port.stat" and p.attributes["device"] == "rdmap144s27"}
    assert "tx_bytes" in old and "rdma_read_bytes" in old
    assert not {c for c in old if c.startswith(("rdma_write", "retrans"))}


def test_port_state_and_rate():
    points = EfaSource(SYSFS).collect()
    up = {p.attributes["device"]: p.value for p in points if p.name == "hw.network.up"}
    assert up == {"rdmap16s27": 1, "rdmap32s27": 1, "rdmap144s27": 1, "rdmap160s27": 0}
    rates = {p.value for p in points if p.name == "hw.network.bandwidth.limit"}
    assert rates == {12.5e9}  # 100 Gb/sec in bytes per second
    assert parse_rate("400 Gb/sec (4X NDR)") == 50e9
    assert parse_rate("2.5 Gb/sec (1X SDR)") == 2.5e9 / 8
    assert parse_rate("garbage") is None


def test_garbage_counter_file_is_skipped_not_fatal(tmp_path):
    shutil.copytree(SYSFS / "class" / "infiniband", tmp_path / "class" / "infiniband")
    bad = tmp_path / "class/infiniband/rdmap16s27/ports/1/hw_counters/tx_bytes"
    bad.write_text("not a number\n")
    points = EfaSource(tmp_path).collect()
    counters = {(p.attributes["device"], p.attributes["counter"]) for p in points if p.name == "hw.efa.port.stat"}
    assert ("rdmap16s27", "tx_bytes") not in counters
    assert ("rdmap16s27", "rx_bytes") in counters


def test_not_supported_without_infiniband_class(tmp_path):
    ok, why = EfaSource(tmp_path).supported()
    assert not ok and "infiniband" in why
    assert EfaSource(tmp_path).collect() == []
    assert EfaSource(SYSFS).supported() == (True, "")
