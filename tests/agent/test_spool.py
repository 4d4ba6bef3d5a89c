"""The on-disk spool (limit, drop-oldest counted, order, restart, crash leftovers) and the shipper
that drains it (order kept, 400 dropped and counted, Retry-After honoured) against a real HTTP
receiver on loopback."""

from __future__ import annotations

import os
import time

import pytest

from agent.export.otlp import OtlpSender, encode_request
from agent.export.spool import Shipper, Spool
from agent.sources.base import point
from tests.agent.otlp_server import serve_in_thread
from tests.support import free_port

RESOURCE = {"cluster": "c1", "node": "n1", "rack": "r1"}


def test_order_and_remove(tmp_path):
    sp = Spool(tmp_path, 1000)
    seqs = [sp.append(bytes([i]) * 10) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5] and len(sp) == 5 and sp.bytes == 50
    got = []
    while (item := sp.oldest()) is not None:
        got.append(item[1][0])
        sp.remove(item[0])
    assert got == [0, 1, 2, 3, 4] and sp.bytes == 0 and os.listdir(tmp_path) == []


def test_limit_drops_oldest_and_counts(tmp_path):
    sp = Spool(tmp_path, 100)
    for i in range(12):
        sp.append(bytes([i]) * 20)   # 5 fit
    assert len(sp) == 5 and sp.bytes == 100 and sp.dropped == 7
    assert sp.oldest()[1][0] == 7    # the newest five are kept
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) == 100
    assert sp.append(b"x" * 101) is None and sp.dropped == 8 and len(sp) == 5  # can never fit


def test_survives_restart_and_continues_sequence(tmp_path):
    sp = Spool(tmp_path, 10_000)
    for i in range(3):
        sp.append(f"batch-{i}".encode())
    sp.remove(sp.oldest()[0])
    (tmp_path / ".tmp-99").write_bytes(b"half-written")   # a crash between write and rename
    again = Spool(tmp_path, 10_000)
    assert len(again) == 2 and again.bytes == len(b"batch-1") * 2
    assert not (tmp_path / ".tmp-99").exists()
    assert again.append(b"batch-3") == 4                  # sequence continues after the highest
    order = []
    while (item := again.oldest()) is not None:
        order.append(item[1].decode())
        again.remove(item[0])
    assert order == ["batch-1", "batch-2", "batch-3"]
    names = sorted(os.listdir(tmp_path))
    assert names == []


def test_file_names_sort_in_send_order(tmp_path):
    sp = Spool(tmp_path, 10**6)
    for i in range(11):
        sp.append(b"x")
    assert sorted(os.listdir(tmp_path)) == [f"{i:020d}.otlp.gz" for i in range(1, 12)]


def _batch(i: int) -> bytes:
    return encode_request([point("shopfloor.agent.spool.batches", i)], RESOURCE, 1, 1_000 + i)


@pytest.fixture
def receiver():
    srv = serve_in_thread()
    yield srv
    srv.shutdown()
    srv.server_close()


def _values(srv) -> list[float]:
    return [p[3] for r in srv.requests for p in r["points"]]


def test_shipper_spools_through_503s_and_keeps_order(tmp_path, receiver):
    url = f"http://127.0.0.1:{receiver.server_address[1]}/v1/metrics"
    receiver.answers += [(503, {"Retry-After": "0.2"})] * 3
    sh = Shipper(OtlpSender(url, timeout=2).send, Spool(tmp_path, 10**6), max_backoff=0.2)
    sh.start()
    try:
        for i in range(10):
            sh.submit(_batch(i))
        assert sh.wait_idle(10)
    finally:
        sh.stop()
    assert _values(receiver) == [float(i) for i in range(10)]
    assert sh.counts["success"] == 10 and sh.counts["retry"] == 3 and sh.counts["spooled"] >= 1
    assert len(sh.spool) == 0


def test_shipper_drops_400_and_counts_it(tmp_path, receiver):
    url = f"http://127.0.0.1:{receiver.server_address[1]}/v1/metrics"
    sh = Shipper(OtlpSender(url, timeout=2).send, Spool(tmp_path, 10**6), max_backoff=0.2)
    sh.start()
    try:
        sh.submit(_batch(1))
        sh.submit(b"\x0a\xff garbage that is not protobuf")
        sh.submit(_batch(2))
        assert sh.wait_idle(10)
    finally:
        sh.stop()
    assert _values(receiver) == [1.0, 2.0]
    assert sh.counts["rejected"] == 1 and sh.counts["success"] == 2
    assert "HTTP 400" in sh.last_error and len(sh.spool) == 0


def test_shipper_stop_spools_unsent_batches_for_next_start(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1/metrics"   # nobody listens
    sh = Shipper(OtlpSender(url, timeout=1).send, Spool(tmp_path, 10**6), max_backoff=60)
    sh.start()
    for i in range(4):
        sh.submit(_batch(i))
    time.sleep(0.3)
    sh.stop()
    assert len(Spool(tmp_path, 10**6)) == 4 and sh.counts["retry"] >= 1


def test_shipper_spools_compressed_and_skips_a_damaged_file(tmp_path, receiver):
    import gzip
    url = f"http://127.0.0.1:{free_port()}/v1/metrics"   # nobody listens: everything is spooled
    sh = Shipper(OtlpSender(url, timeout=1).send, Spool(tmp_path, 10**6), max_backoff=60)
    sh.start()
    for i in range(3):
        sh.submit(_batch(i))
    sh.stop()
    files = sorted(tmp_path.iterdir())
    assert [gzip.decompress(f.read_bytes()) for f in files] == [_batch(i) for i in range(3)]
    assert sum(f.stat().st_size for f in files) < sum(len(_batch(i)) for i in range(3))
    files[1].write_bytes(b"\x1f\x8b truncated")        # damaged on disk
    url = f"http://127.0.0.1:{receiver.server_address[1]}/v1/metrics"
    sh = Shipper(OtlpSender(url, timeout=2).send, Spool(tmp_path, 10**6), max_backoff=0.2)
    sh.start()
    try:
        assert sh.wait_idle(10)
    finally:
        sh.stop()
    assert _values(receiver) == [0.0, 2.0] and sh.spool.dropped == 1
