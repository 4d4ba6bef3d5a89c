"""Webhook backend against a real local HTTP server that checks the signature itself."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from collector.health.verdict import ChipRef
from collector.remediate.base import BackendError, Result
from collector.remediate.webhook import WebhookBackend, verify
from tests.remediate.helpers import NOW, failing, make

SECRET = b"s3cret-shared-with-the-receiver"


class Receiver:
    """Verifies each request the way a receiver must (independently of webhook.py)."""

    def __init__(self):
        self.accepted: list[dict] = []
        self.rejected: list[str] = []
        self.fail_next = 0            # answer 503 this many times first
        self.answer: dict = {}
        self.seen_deliveries: set[str] = set()
        recv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if recv.fail_next:
                    recv.fail_next -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                ts = self.headers.get("X-Shopfloor-Timestamp", "")
                expected = "sha256=" + hmac.new(SECRET, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(expected, self.headers.get("X-Shopfloor-Signature", ""))
                fresh = ts.isdigit() and abs(time.time() - int(ts)) < 300
                if not (ok and fresh):
                    recv.rejected.append("bad signature" if not ok else "stale timestamp")
                    self.send_response(401)
                    self.end_headers()
                    return
                doc = json.loads(body)
                assert doc["delivery"] == self.headers["X-Shopfloor-Delivery"]
                recv.accepted.append(doc)
                data = json.dumps(recv.answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks/shopfloor"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


CHIP = ChipRef("c1", "gpu-001", "3", uuid="GPU-abc", rack="r1", vendor="nvidia", model="H100")


def test_signed_cordon_and_uncordon_are_accepted(receiver):
    hook = WebhookBackend(receiver.url, SECRET, backoff_s=0.01)
    assert hook.cordon(CHIP, "shopfloor: chip 3 (GPU-abc): XID 79") == Result.DONE
    assert hook.status("gpu-001") == (True, "shopfloor: chip 3 (GPU-abc): XID 79", True)
    assert hook.uncordon(CHIP) == Result.DONE
    assert receiver.rejected == []
    assert [(d["event"], d["node"], d["chip"], d["uuid"], d["reason"]) for d in receiver.accepted] == [
        ("cordon", "gpu-001", "3", "GPU-abc", "shopfloor: chip 3 (GPU-abc): XID 79"),
        ("uncordon", "gpu-001", "3", "GPU-abc", "")]
    assert hook.status("gpu-001") == (False, "", False)


def test_wrong_secret_is_rejected_by_the_receiver(receiver):
    hook = WebhookBackend(receiver.url, b"not-the-secret", backoff_s=0.01)
    with pytest.raises(BackendError, match="401"):
        hook.cordon(CHIP, "shopfloor: x")
    assert receiver.rejected == ["bad signature"] and receiver.accepted == []


def test_retries_503_with_the_same_delivery_id(receiver):
    receiver.fail_next = 2
    hook = WebhookBackend(receiver.url, SECRET, retries=3, backoff_s=0.01)
    assert hook.cordon(CHIP, "shopfloor: x") == Result.DONE
    assert len(receiver.accepted) == 1
    receiver.fail_next = 5
    with pytest.raises(BackendError, match="gave up after 2 attempts"):
        WebhookBackend(receiver.url, SECRET, retries=1, backoff_s=0.01).cordon(CHIP, "shopfloor: x")


def test_unreachable_receiver_times_out_into_a_failed_decision():
    hook = WebhookBackend("http://127.0.0.1:9/none", SECRET, timeout=0.5, retries=1, backoff_s=0.01)
    rem = make(hook)
    [d] = rem.apply([failing("gpu-001")], now=NOW)
    assert d.outcome == "failed" and "gave up" in " ".join(d.reasons)
    assert rem.audit.cordons() == []


def test_receiver_can_say_someone_else_holds_the_node(receiver):
    receiver.answer = {"result": "held_by_other"}
    rem = make(WebhookBackend(receiver.url, SECRET))
    [d] = rem.apply([failing("gpu-001")], now=NOW)
    assert d.outcome == "held_by_other"


def test_verify_helper_rejects_replays_and_tampering():
    body = b'{"event":"cordon"}'
    ts = str(int(NOW))
    from collector.remediate.webhook import sign
    headers = {"X-Shopfloor-Timestamp": ts, "X-Shopfloor-Signature": sign(SECRET, ts, body)}
    assert verify(SECRET, headers, body, now=NOW + 10)
    assert not verify(SECRET, headers, body, now=NOW + 3600)          # replayed an hour later
    assert not verify(SECRET, headers, body + b" ", now=NOW + 10)     # body changed
    assert not verify(b"other", headers, body, now=NOW + 10)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError):
        WebhookBackend("ftp://x", SECRET)
    with pytest.raises(ValueError):
        WebhookBackend("http://127.0.0.1:1/", b"")
