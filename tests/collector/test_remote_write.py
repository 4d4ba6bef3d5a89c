"""Prometheus remote-write 1.0 ingest: a real Prometheus 2.42 as the sender, plus hand-built bodies."""

from __future__ import annotations

import time

import cramjam
import httpx
import yaml

from collector.receive.remote_write import WriteRequest, encode, stale_nan
from tests.support import free_port, require_binary, running

RW = {"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf",
      "X-Prometheus-Remote-Write-Version": "0.1.0"}


def test_real_prometheus_remote_writes_to_collector(collector, tmp_path):
    prometheus = require_binary("prometheus")
    port = free_port()
    cfg = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "prom", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
        "remote_write": [{"url": collector.url + "/api/v1/write",
                          "queue_config": {"batch_send_deadline": "1s", "min_backoff": "100ms"}}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    cmd = [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}"]
    with running(cmd, ready_url=f"http://127.0.0.1:{port}/-/ready", log=tmp_path / "prometheus.log"):
        deadline = time.monotonic() + 40
        rows = []
        while time.monotonic() < deadline and len(rows) < 3:
            rows = collector.sql("SELECT epoch_ms(ts), value FROM metrics WHERE name = 'prometheus_tsdb_head_series' "
                                 "AND labels['job'] = 'prom' ORDER BY ts")
            time.sleep(0.5)
        assert len(rows) >= 3, "Prometheus' samples did not arrive by remote write"
        up = collector.sql("SELECT labels, value FROM metrics WHERE name = 'up' LIMIT 1")
        assert up[0][0] == {"job": "prom", "instance": f"127.0.0.1:{port}"} and up[0][1] == 1.0
        # Every sample we stored is the one Prometheus has at that timestamp.
        for ts_ms, value in rows[:3]:
            r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                          params={"query": "prometheus_tsdb_head_series", "time": ts_ms / 1000})
            assert float(r.json()["data"]["result"][0]["value"][1]) == value


def test_staleness_marker_and_refused_series(collector):
    body = encode([({"__name__": "node_load1", "instance": "a"}, [(1000, 0.5), (2000, stale_nan())]),
                   ({"instance": "nameless"}, [(1000, 1.0)])])
    r = httpx.post(collector.url + "/api/v1/write", content=body, headers=RW)
    assert r.status_code == 400 and "without __name__" in r.text and "1 samples refused (2 stored)" in r.text
    rows = collector.sql("SELECT epoch_ms(ts), value FROM metrics WHERE name = 'node_load1' ORDER BY ts")
    assert rows == [[1000, 0.5], [2000, None]]   # the stale NaN is stored as NULL


def test_good_batch_is_204_and_retries_are_not_duplicated(collector):
    body = encode([({"__name__": "dcgm_power_usage", "gpu": str(i)}, [(t * 1000, float(t)) for t in range(10)])
                   for i in range(8)])
    for _ in range(2):
        assert httpx.post(collector.url + "/api/v1/write", content=body, headers=RW).status_code == 204
    assert collector.sql("SELECT count(*), count(DISTINCT labels['gpu']) FROM metrics") == [[80, 8]]


def test_bad_remote_write_bodies(collector):
    good = encode([({"__name__": "x"}, [(1, 1.0)])])
    assert httpx.post(collector.url + "/api/v1/write", content=good, headers=RW).status_code == 204
    for bad in (b"", b"\xff\xff\xff\xff\xff\xff", good[:-3], bytes(cramjam.snappy.compress_raw(b"\x0a\x05\xff")),
                bytes(cramjam.snappy.compress_raw(WriteRequest().SerializeToString() + b"\x12"))):
        r = httpx.post(collector.url + "/api/v1/write", content=bad, headers=RW)
        assert 400 <= r.status_code < 500, (bad, r.status_code, r.text)
    # a snappy header that declares 4 GiB is refused before decoding anything
    r = httpx.post(collector.url + "/api/v1/write", content=b"\x80\x80\x80\x80\x10" + b"\0" * 10, headers=RW)
    assert r.status_code == 413
    assert collector.sql("SELECT count(*) FROM metrics") == [[1]]
