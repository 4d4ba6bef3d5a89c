"""Webhook backend: a signed JSON POST per cordon/uncordon, for any other system.

Request (Content-Type: application/json):
    {"version": 1, "event": "cordon" | "uncordon", "delivery": "<uuid>",
     "cluster": .., "node": .., "chip": .., "uuid": .., "rack": .., "vendor": .., "model": ..,
     "reason": "shopfloor: chip 3 (GPU-..): XID 79: ...", "still_held_reason": "" }
Headers:
    X-Shopfloor-Timestamp: <unix seconds>
    X-Shopfloor-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>
    X-Shopfloor-Delivery:  <the same uuid as in the body; retries reuse it>
A receiver recomputes the HMAC over the timestamp and the raw body, compares in constant time,
and rejects timestamps more than a few minutes old (replay); the delivery id lets it drop a
retry it already handled. A 2xx answer means done; the receiver may answer
{"result": "held_by_other"} when the node is held by somebody else (then nothing is assumed
held by Shopfloor). 429 and 5xx are retried with backoff; other 4xx are not.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid as uuidlib
from typing import Mapping

import httpx

from collector.health.verdict import ChipRef
from collector.remediate.base import BackendError, NodeStatus, Result, clean_reason, validate_node

SIGNATURE_HEADER = "X-Shopfloor-Signature"
TIMESTAMP_HEADER = "X-Shopfloor-Timestamp"
DELIVERY_HEADER = "X-Shopfloor-Delivery"
RETRY_STATUS = {429, 500, 502, 503, 504}


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, headers: Mapping[str, str], body: bytes, *, now: float | None = None,
           max_skew_s: float = 300.0) -> bool:
    """For receivers written in Python: is this request from us, and fresh?"""
    lower = {k.lower(): v for k, v in headers.items()}
    ts, sig = lower.get(TIMESTAMP_HEADER.lower(), ""), lower.get(SIGNATURE_HEADER.lower(), "")
    try:
        age = abs((time.time() if now is None else now) - int(ts))
    except ValueError:
        return False
    return age <= max_skew_s and hmac.compare_digest(sign(secret, ts, body), sig)


class WebhookBackend:
    name = "webhook"

    def __init__(self, url: str, secret: bytes | str, *, timeout: float = 5.0, retries: int = 3,
                 backoff_s: float = 0.5, headers: Mapping[str, str] | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url must be http(s): {url!r}")
        if not secret:
            raise ValueError("webhook secret must not be empty (it signs every request)")
        self.url = url
        self.secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        self.retries = retries
        self.backoff_s = backoff_s
        self.client = httpx.Client(timeout=timeout, headers=dict(headers or {}))
        self._last: dict[str, NodeStatus] = {}   # what we last told the receiver, per node

    def _post(self, event: str, chip: ChipRef, reason: str, still_held_reason: str = "") -> Result:
        delivery = str(uuidlib.uuid4())
        body = json.dumps({"version": 1, "event": event, "delivery": delivery, "cluster": chip.cluster,
                           "node": chip.node, "chip": chip.chip, "uuid": chip.uuid, "rack": chip.rack,
                           "vendor": chip.vendor, "model": chip.model, "reason": reason,
                           "still_held_reason": still_held_reason}, sort_keys=True).encode()
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            ts = str(int(time.time()))   # re-signed per attempt so a slow retry is still fresh
            headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: ts,
                       SIGNATURE_HEADER: sign(self.secret, ts, body), DELIVERY_HEADER: delivery}
            try:
                resp = self.client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code in RETRY_STATUS:
                last_error = f"HTTP {resp.status_code}"
                continue
            if not 200 <= resp.status_code < 300:
                raise BackendError(f"webhook {event} {chip.node}: HTTP {resp.status_code} {resp.text[:200]}")
            try:
                answer = resp.json() if resp.content else {}
            except ValueError:
                answer = {}
            result = answer.get("result") if isinstance(answer, dict) else None
            return Result(result) if result in {r.value for r in Result} else Result.DONE
        raise BackendError(f"webhook {event} {chip.node}: gave up after {self.retries + 1} attempts ({last_error})")

    def status(self, node: str) -> NodeStatus:
        return self._last.get(validate_node(node), NodeStatus(False, "", False))

    def cordon(self, chip: ChipRef, reason: str) -> Result:
        node, reason = validate_node(chip.node), clean_reason(reason)
        result = self._post("cordon", chip, reason)
        if result != Result.HELD_BY_OTHER:
            self._last[node] = NodeStatus(True, reason, True)
        return result

    def uncordon(self, chip: ChipRef, still_held_reason: str = "") -> Result:
        node = validate_node(chip.node)
        still = clean_reason(still_held_reason) if still_held_reason else ""
        result = self._post("uncordon", chip, "", still)
        if result != Result.HELD_BY_OTHER:
            self._last[node] = NodeStatus(True, still, True) if still else NodeStatus(False, "", False)
        return result
