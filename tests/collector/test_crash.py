"""kill -9 during sustained ingest: every acknowledged sample survives, none is stored twice."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from tests.collector.conftest import start_collector
from tests.collector.fleet import batch

PB = {"Content-Type": "application/x-protobuf"}
BASE_MS = 1_700_000_000_000
POINTS_PER_BATCH = 16   # fleet.batch: 4 metrics x 4 chips


def body(i: int) -> bytes:
    # every batch has its own timestamp, so samples per timestamp == 16 means "stored exactly once"
    return batch(i % 8, i, BASE_MS + i * 1000)


def test_kill_9_during_ingest_loses_no_acknowledged_sample(tmp_path):
    acked: list[int] = []
    unsure: list[int] = []   # sent, but the answer never came: the client would retry these
    stop = threading.Event()

    def sender(url: str) -> None:
        with httpx.Client(timeout=5) as client:
            i = 0
            while not stop.is_set():
                try:
                    r = client.post(url + "/v1/metrics", content=body(i), headers=PB)
                except httpx.HTTPError:
                    unsure.append(i)
                    return
                resp = ExportMetricsServiceResponse.FromString(r.content)
                assert r.status_code == 200 and resp.partial_success.rejected_data_points == 0
                acked.append(i)
                i += 1

    db = tmp_path / "crash.duckdb"
    with start_collector(tmp_path, db=db) as c:
        t = threading.Thread(target=sender, args=(c.url,))
        t.start()
        time.sleep(2.5)
        os.killpg(c.proc.pid, signal.SIGKILL)   # no shutdown hook, no checkpoint
        c.proc.wait(10)
        t.join(10)
        stop.set()
    assert len(acked) > 20, "the sender should have had time to get batches acknowledged"

    with start_collector(tmp_path, db=db) as c:
        # what a client does after an outage: resend what it is not sure about, and (a spool
        # replaying from an older position) something already acknowledged
        for i in unsure + acked[-3:]:
            r = httpx.post(c.url + "/v1/metrics", content=body(i), headers=PB)
            assert r.status_code == 200
        per_ts = dict(map(tuple, c.sql("SELECT epoch_ms(ts), count(*) FROM metrics GROUP BY 1")))
        for i in acked + unsure:
            assert per_ts.get(BASE_MS + i * 1000) == POINTS_PER_BATCH, f"batch {i}"
        assert max(per_ts.values()) == POINTS_PER_BATCH
        assert len(per_ts) == len(set(acked + unsure))
