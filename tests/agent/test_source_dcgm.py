"""DcgmSource scraping the recorded dcgm-exporter page from a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import http.server
import threading

import pytest

from agent.sources.dcgm import DcgmError, DcgmSource, parse
from tests.support import FIXTURES, free_port

PAGE = (FIXTURES / "dcgm" / "metrics.txt").read_bytes()
UUID0 = "GPU-db5b5fab-8f4d-4e27-9da1-494c73cf256d"


@contextlib.contextmanager
def serving(body: bytes, status: int = 200):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_profiling_fields_map_into_the_catalog():
    with serving(PAGE) as url:
        points = DcgmSource(url, timeout=5).collect()
    # 8 GPUs x (3 engines + 2 PCIe directions + 1 NVLink total); other DCGM fields are ignored.
    assert len(points) == 8 * 6
    engines = {(p.attributes["chip"], p.attributes["engine"]): p.value
               for p in points if p.name == "hw.gpu.engine.active"}
    assert engines[("0", "graphics")] == 0.912
    assert engines[("7", "tensor")] == pytest.approx(0.501)
    assert engines[("3", "dram")] == pytest.approx(0.47)
    pcie = {(p.attributes["chip"], p.attributes["direction"]): p.value
            for p in points if p.name == "hw.gpu.pcie.throughput"}
    assert pcie[("0", "transmit")] == 1843200 and pcie[("2", "receive")] == 5326800
    nvlink = {p.attributes["chip"]: p.value for p in points if p.name == "hw.gpu.nvlink.throughput"}
    assert nvlink["0"] == 214000 * 1e6 and nvlink["5"] == 219000 * 1e6  # MB/s -> B/s
    first = next(p for p in points if p.attributes["chip"] == "0")
    assert {k: first.attributes[k] for k in ("chip", "uuid", "vendor", "model")} == \
        {"chip": "0", "uuid": UUID0, "vendor": "nvidia", "model": "NVIDIA B200"}
    assert all(set(p.attributes) >= {"chip", "uuid", "vendor", "model"} for p in points)
    assert not any("Hostname" in p.attributes or "hostname" in p.attributes for p in points)


def test_newest_exporter_label_spelling_and_prof_nvlink_preferred():
    text = (PAGE.decode().replace('UUID="', 'uuid="').replace('Hostname="', 'hostname="')
            + "# HELP DCGM_FI_PROF_NVLINK_TX_BYTES tx\n# TYPE DCGM_FI_PROF_NVLINK_TX_BYTES gauge\n"
            + 'DCGM_FI_PROF_NVLINK_TX_BYTES{gpu="1",uuid="GPU-x",modelName="NVIDIA B200",hostname="h"} 1000\n'
            + "# HELP DCGM_FI_PROF_NVLINK_RX_BYTES rx\n# TYPE DCGM_FI_PROF_NVLINK_RX_BYTES gauge\n"
            + 'DCGM_FI_PROF_NVLINK_RX_BYTES{gpu="1",uuid="GPU-x",modelName="NVIDIA B200",hostname="h"} 500\n')
    points = parse(text)
    nvlink = {p.attributes["chip"]: p.value for p in points if p.name == "hw.gpu.nvlink.throughput"}
    assert nvlink["1"] == 1500            # the B/s profiling fields win over the MB/s total
    assert nvlink["0"] == 214000 * 1e6
    assert {p.attributes["uuid"] for p in points if p.attributes["chip"] == "0"} == {UUID0}


def test_mig_rows_and_repeated_pod_rows_do_not_duplicate_series():
    text = ("# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge\n"
            'DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",UUID="GPU-a",modelName="m",pod="a"} 0.5\n'
            'DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",UUID="GPU-a",modelName="m",pod="b"} 0.5\n'
            'DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="1",UUID="GPU-b",modelName="m",GPU_I_ID="3",GPU_I_PROFILE="1g.23gb"} 0.2\n')
    points = parse(text)
    assert [(p.attributes["chip"], p.value) for p in points] == [("0", 0.5)]


def test_unreachable_or_failing_exporter_raises_a_clear_error():
    port = free_port()
    with pytest.raises(DcgmError, match=f"127.0.0.1:{port}.*unreachable"):
        DcgmSource(f"http://127.0.0.1:{port}/metrics", timeout=2).collect()
    with serving(b"oops", status=500) as url, pytest.raises(DcgmError, match="HTTP 500"):
        DcgmSource(url).collect()
    with serving(b"DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu=0} not-a-number\n") as url, \
            pytest.raises(DcgmError, match="not Prometheus text"):
        DcgmSource(url).collect()


def test_not_supported_without_url():
    assert DcgmSource(None).supported() == (False, "dcgm_exporter_url is not set")
    assert DcgmSource("").supported()[0] is False
    assert DcgmSource("http://127.0.0.1:9400/metrics").supported() == (True, "")
