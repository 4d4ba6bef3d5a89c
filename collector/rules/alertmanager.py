"""Alertmanager API v2 client: POST /api/v2/alerts with the alerts of one evaluation.

httpx (a collector dependency already) does the HTTP; the payload is Alertmanager's
postableAlerts, a JSON list of {labels, annotations, startsAt, endsAt, generatorURL}. Like
Prometheus' notifier, every configured Alertmanager gets every batch (they deduplicate among
themselves), and a batch counts as delivered when at least one of them accepted it.
"""

from __future__ import annotations

import logging

import httpx

log = logging.getLogger("shopfloor.rules.alertmanager")


class AlertmanagerError(RuntimeError):
    pass


class AlertmanagerClient:
    def __init__(self, urls: list[str], *, timeout_s: float = 10.0, bearer_token: str | None = None):
        if not urls:
            raise ValueError("at least one Alertmanager URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        headers = {"User-Agent": "shopfloor-collector"}
        if bearer_token:
            headers["Authorization"] = f"Bearer {bearer_token}"
        self.client = httpx.Client(timeout=timeout_s, headers=headers)

    def send(self, alerts: list[dict]) -> None:
        """Deliver one batch; raises AlertmanagerError when no Alertmanager accepted it."""
        errors = []
        for url in self.urls:
            try:
                resp = self.client.post(f"{url}/api/v2/alerts", json=alerts)
            except httpx.HTTPError as exc:
                errors.append(f"{url}: {exc!r}")
                continue
            if resp.status_code // 100 == 2:
                continue
            errors.append(f"{url}: HTTP {resp.status_code} {resp.text[:200]}")
        if errors:
            for e in errors:
                log.warning("alertmanager: %s", e)
            if len(errors) == len(self.urls):
                raise AlertmanagerError("; ".join(errors))

    def close(self) -> None:
        self.client.close()
