"""A small OTLP/HTTP metrics receiver for the agent's tests (run in a thread or as a process).

It decodes every POST /v1/metrics body with opentelemetry-proto (so a malformed request is a
400, as a real collector answers) and appends one JSON line per accepted request to a log
file: {"seq": n, "points": [[otel_name, attributes, time_ns, value], ...]}. Scripted answers
(status codes, Retry-After, optionally a body) come from the `answers` list, first in first out.

Used as a process by the outage test until the real collector (`shopfloor collector`) takes
over; the test switches to the collector when it is importable.
"""

from __future__ import annotations

import gzip
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)


def decode(body: bytes) -> list[list]:
    req = ExportMetricsServiceRequest.FromString(body)
    out = []
    for rm in req.resource_metrics:
        res = {kv.key: kv.value.string_value for kv in rm.resource.attributes}
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                dps = m.gauge.data_points if m.HasField("gauge") else m.sum.data_points
                for dp in dps:
                    attrs = {kv.key: kv.value.string_value for kv in dp.attributes}
                    out.append([m.name, {**res, **attrs}, dp.time_unix_nano, dp.as_double])
    return out


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, log_path=None, token=None):
        super().__init__(addr, Handler)
        self.log_path = log_path
        self.token = token
        self.answers: list[tuple[int, dict]] = []
        self.requests: list[dict] = []   # {"headers":..., "points": ...}
        self.lock = threading.Lock()
        self.seq = 0


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        srv = self.server
        if srv.token and self.headers.get("Authorization") != f"Bearer {srv.token}":
            return self._answer(401, b"unauthorized")
        with srv.lock:
            if srv.answers:
                status, headers, *body = srv.answers.pop(0)
                return self._answer(status, body[0] if body else b"scripted", headers)
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        try:
            points = decode(body)
        except Exception as exc:  # noqa: BLE001
            return self._answer(400, f"bad request: {exc}".encode())
        with srv.lock:
            srv.seq += 1
            srv.requests.append({"headers": dict(self.headers), "points": points})
            if srv.log_path:
                with open(srv.log_path, "a") as f:
                    f.write(json.dumps({"seq": srv.seq, "points": points}) + "\n")
        self._answer(200, ExportMetricsServiceResponse().SerializeToString(),
                     {"Content-Type": "application/x-protobuf"})

    def _answer(self, status, body, headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve_in_thread(log_path=None, token=None) -> Receiver:
    srv = Receiver(("127.0.0.1", 0), log_path, token)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


if __name__ == "__main__":
    # python otlp_server.py PORT LOGFILE
    server = Receiver(("127.0.0.1", int(sys.argv[1])), sys.argv[2])
    server.serve_forever()
