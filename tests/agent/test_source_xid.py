"""XidSource against the recorded kernel log tests/fixtures/kmsg/kmsg.log and procfs tree."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest

from agent.sources.xid import STATE_FILE, XidSource, parse_xid
from tests.support import FIXTURES

KMSG = FIXTURES / "kmsg" / "kmsg.log"
PROCFS = FIXTURES / "procfs"
# (chip, xid) -> count, read off the fixture by hand
EXPECTED = {("0", "13"): 2, ("2", "48"): 1, ("3", "94"): 1, ("3", "13"): 1,
            ("4", "79"): 1, ("4", "154"): 1, ("5", "999"): 1}


def counts(points):
    assert all(p.name == "hw.gpu.xid.errors" for p in points)
    return {(p.attributes["chip"], p.attributes["xid"]): p.value for p in points}


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "kmsg.log"
    shutil.copy(KMSG, path)
    return path


def append(path, *records):
    with open(path, "a") as f:
        for r in records:
            f.write(r + "\n")


def test_counts_per_chip_and_xid_with_labels_from_procfs(tmp_path):
    points = XidSource(KMSG, PROCFS, tmp_path / "state").collect()
    assert counts(points) == EXPECTED
    lost = next(p for p in points if p.attributes["xid"] == "79")
    assert dict(lost.attributes) == {"chip": "4", "uuid": "GPU-2fa91425-cb00-4853-9d2c-67eda13ffe79",
                                     "vendor": "nvidia", "model": "NVIDIA B200", "xid": "79"}


def test_parse_xid_spellings():
    assert parse_xid("NVRM: Xid (PCI:0000:3B:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.") == ("0000:3b:00", 79)
    assert parse_xid("NVRM: Xid (0000:18:00): 13, pid=1, name=x, ...") == ("0000:18:00", 13)
    assert parse_xid("NVRM: GPU at PCI:0000:9d:00: GPU-2fa9") is None


def test_restart_with_the_same_state_never_counts_twice(tmp_path, log):
    state = tmp_path / "state"
    assert counts(XidSource(log, PROCFS, state).collect()) == EXPECTED
    saved = json.loads((state / STATE_FILE).read_text())
    assert saved["last_seq"] == 1215 and saved["boot_id"].startswith("6f1f7c3e")
    # The agent restarts: the whole log is read again, nothing is counted again.
    again = XidSource(log, PROCFS, state)
    assert counts(again.collect()) == EXPECTED
    # Lines appended later are counted exactly once, by the running and by a restarted agent.
    append(log, "4,1216,8000000000,-;NVRM: Xid (PCI:0000:1b:00): 13, pid=9, name=python3, Graphics Exception",
           "6,1217,8000000001,-;NVRM: something else")
    assert counts(again.collect())[("0", "13")] == 3
    assert counts(again.collect())[("0", "13")] == 3
    assert counts(XidSource(log, PROCFS, state).collect()) == {**EXPECTED, ("0", "13"): 3}


def test_a_new_boot_starts_the_counters_over(tmp_path, log):
    state = tmp_path / "state"
    XidSource(log, PROCFS, state).collect()
    procfs = tmp_path / "procfs"
    shutil.copytree(PROCFS, procfs)
    (procfs / "sys/kernel/random/boot_id").write_text("0a9e2b7c-1111-4222-8333-944455556666\n")
    # After the reboot the kernel's sequence numbers start low again: they must not be skipped.
    log.write_text("4,7,2000000,-;NVRM: Xid (PCI:0000:52:00): 48, pid='<unknown>', name=<unknown>, DBE\n")
    assert counts(XidSource(log, procfs, state).collect()) == {("2", "48"): 1}


def test_an_unterminated_line_waits_for_its_end(log):
    src = XidSource(log, PROCFS)
    src.collect()
    with open(log, "a") as f:
        f.write("4,1216,8000000000,-;NVRM: Xid (PCI:0000:d1:00): 4")
    assert ("6", "4") not in counts(src.collect())
    with open(log, "a") as f:
        f.write("5, pid=1, name=x, text\n")
    assert counts(src.collect())[("6", "45")] == 1


def test_corrupt_state_file_does_not_stop_the_source(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_FILE).write_text("{not json")
    assert counts(XidSource(KMSG, PROCFS, state).collect()) == EXPECTED


def test_event_is_pushed_at_once(tmp_path, log):
    src = XidSource(log, PROCFS, tmp_path / "state")
    src.collect()
    got: list = []
    arrived = threading.Event()

    def sink(points):
        got.extend(points)
        arrived.set()

    src.start_events(sink)
    try:
        append(log, "4,1300,9000000000,-;NVRM: Xid (PCI:0000:df:00): 119, pid=1, name=x, Timeout after 6s of waiting for RPC response from GPU7 GSP!")
        assert arrived.wait(10), "no XID event pushed within 10 s"
    finally:
        src.stop_events()
    assert [(p.attributes["chip"], p.attributes["xid"], p.value) for p in got] == [("7", "119", 1.0)]
    # The scrape sees it as well, counted once.
    assert counts(src.collect())[("7", "119")] == 1


def test_stop_events_is_prompt(log):
    src = XidSource(log, PROCFS)
    src.start_events(lambda points: None)
    started = time.monotonic()
    src.stop_events()
    assert time.monotonic() - started < 2


def test_real_kmsg_device_is_read_without_blocking():
    if not os.access("/dev/kmsg", os.R_OK):
        pytest.skip("needs a readable /dev/kmsg")
    src = XidSource("/dev/kmsg", PROCFS)
    src.collect()                       # returns at EAGAIN instead of waiting for new records
    assert src.lines_read > 0


def test_not_supported_without_kernel_log_or_driver(tmp_path):
    ok, why = XidSource(tmp_path / "kmsg", PROCFS).supported()
    assert not ok and "kmsg" in why
    ok, why = XidSource(KMSG, tmp_path).supported()
    assert not ok and "NVIDIA driver" in why
    assert XidSource(KMSG, PROCFS).supported() == (True, "")


def test_nvml_maps_bus_ids_when_given(tmp_path):
    """Without the driver's procfs entries, an injected NVML names the GPUs (by PCI bus id)."""
    from tests.agent.nvml_replay import NvmlReplay

    procfs = tmp_path / "procfs"
    shutil.copytree(PROCFS / "sys", procfs / "sys")
    src = XidSource(KMSG, procfs, nvml=NvmlReplay(FIXTURES / "nvml" / "recorded_b200x8.json"))
    assert src.supported() == (True, "")
    points = src.collect()
    assert counts(points) == EXPECTED
    lost = next(p for p in points if p.attributes["xid"] == "79")
    assert lost.attributes["uuid"] == "GPU-2fa91425-cb00-4853-9d2c-67eda13ffe79"
    # And with neither, the XID is still counted, under an empty chip.
    bare = XidSource(KMSG, procfs).collect()
    assert sum(p.value for p in bare) == sum(EXPECTED.values())
    assert {p.attributes["chip"] for p in bare} == {""}


def test_a_rotated_log_file_is_followed_without_double_counting(tmp_path, log):
    src = XidSource(log, PROCFS, tmp_path / "state")
    src.collect()
    rotated = tmp_path / "kmsg.new"
    shutil.copy(log, rotated)                       # the new file repeats the old records ...
    append(rotated, "4,1216,8000000000,-;NVRM: Xid (PCI:0000:43:00): 31, pid=7, name=python3, MMU Fault")
    os.replace(rotated, log)                        # ... and replaces it
    assert counts(src.collect()) == {**EXPECTED, ("1", "31"): 1}
