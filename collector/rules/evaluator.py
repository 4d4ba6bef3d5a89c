"""Rule evaluation with Prometheus' semantics: alert states, `for`, `keep_firing_for`, resends.

An AlertingRule keeps its active alerts keyed by label set and moves them the way Prometheus'
rules/alerting.go does on every evaluation at time ts:

    expression returns the label set     new alert -> pending (activeAt = ts)
    pending and ts - activeAt >= for     -> firing (firedAt = ts); for: 0 fires at once
    label set no longer returned         pending -> dropped; firing -> resolved (resolvedAt = ts),
                                         unless keep_firing_for holds it firing that much longer
    resolved                             reported to Alertmanager (endsAt = resolvedAt) and kept
                                         for 15 min, as Prometheus does, then forgotten

Which alerts go to Alertmanager after an evaluation is Prometheus' needsSending(): every firing
alert whose last send is older than resend_delay, and every alert resolved since its last send.
A firing alert is sent with endsAt = now + 4 x max(resend_delay, interval) (its "valid until"),
so Alertmanager resolves it by itself if the collector dies and stops re-sending.

Restarts: with a state file, the active alerts (their activeAt, firedAt, last send ...) are saved
after every group evaluation (write, fsync, rename) and restored at start when the file is less
than an hour old (Prometheus' default outage tolerance), so a collector restart neither resets
`for` timers nor lets Alertmanager resolve and re-page alerts that are still true. The downtime
counts toward `for`, which is simpler than Prometheus' ALERTS_FOR_STATE restore and errs on the
side of firing.

Not implemented (unused by our rules): the ALERTS / ALERTS_FOR_STATE series, group `limit` and
`query_offset` (refused when set, see loader.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Callable, Mapping, Protocol
from urllib.parse import quote

from collector.rules.loader import GroupSpec, RuleSpec

log = logging.getLogger("shopfloor.rules")

RESOLVED_RETENTION_S = 15 * 60   # Prometheus' resolvedRetention
OUTAGE_TOLERANCE_S = 3600        # Prometheus' --rules.alert.for-outage-tolerance
NAME = "__name__"


def rfc3339(ts: float | None) -> str:
    if ts is None:
        return "0001-01-01T00:00:00Z"   # Go's zero time, as Prometheus' API shows it
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class QueryEngine(Protocol):
    def instant(self, query: str, time_s: float): ...


@dataclass
class Alert:
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float
    state: str                       # pending | firing | inactive (resolved)
    active_at: float
    fired_at: float | None = None
    resolved_at: float | None = None
    last_sent_at: float | None = None
    valid_until: float | None = None
    keep_firing_since: float | None = None

    def needs_sending(self, ts: float, resend_delay: float) -> bool:
        if self.state == "pending":
            return False
        if self.resolved_at is not None and (self.last_sent_at is None or self.resolved_at > self.last_sent_at):
            return True
        return self.last_sent_at is None or self.last_sent_at + resend_delay < ts

    def api(self) -> dict:
        """The alert as Prometheus' /api/v1/alerts and /api/v1/rules show it."""
        out = {"labels": dict(self.labels), "annotations": dict(self.annotations), "state": self.state,
               "activeAt": rfc3339(self.active_at), "value": _go_e(self.value)}
        if self.keep_firing_since is not None:
            out["keepFiringSince"] = rfc3339(self.keep_firing_since)
        return out


def _go_e(v: float) -> str:
    """strconv.FormatFloat(v, 'e', -1, 64): the value format of Prometheus' alert API."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "0e+00"
    sign, digits, exp = Decimal(repr(float(v))).normalize().as_tuple()
    ds = "".join(map(str, digits))
    x = len(ds) + exp - 1
    mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
    return f"{'-' if sign else ''}{mant}e{'-' if x < 0 else '+'}{abs(x):02d}"


def _fingerprint(labels: Mapping[str, str]) -> tuple:
    return tuple(sorted(labels.items()))


class RuleError(Exception):
    pass


def _vector(result) -> list[tuple[dict[str, str], float]]:
    """An engine Result as (labels, value) samples; a scalar is one sample without labels."""
    if result.type == "vector":
        return [(dict(lb), float(v)) for lb, v in result.value]
    if result.type == "scalar":
        return [({}, float(result.value))]
    raise RuleError(f"rule expression must return a vector or scalar, not a {result.type}")


class AlertingRule:
    def __init__(self, spec: RuleSpec, external_labels: Mapping[str, str] | None = None):
        self.spec = spec
        self.external_labels = dict(external_labels or {})
        self.active: dict[tuple, Alert] = {}
        self.health = "unknown"
        self.last_error = ""
        self.last_evaluation: float | None = None
        self.evaluation_time = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    def apply(self, samples: list[tuple[dict[str, str], float]], ts: float) -> None:
        """Advance the alert state machine with the expression's result at ts."""
        seen: dict[tuple, Alert] = {}
        for labels, value in samples:
            lb = {k: v for k, v in labels.items() if k != NAME}
            tmpl_labels = dict(lb)
            for k, t in self.spec.label_templates.items():
                lb[k] = t.render(tmpl_labels, value, self.external_labels)
            lb = {k: v for k, v in lb.items() if v != ""}   # an empty label is no label
            lb["alertname"] = self.spec.name
            ann = {k: t.render(tmpl_labels, value, self.external_labels)
                   for k, t in self.spec.annotation_templates.items()}
            fp = _fingerprint(lb)
            if fp in seen:
                raise RuleError("vector contains metrics with the same labelset after applying alert labels")
            seen[fp] = Alert(lb, ann, value, "pending", ts)

        for fp, new in seen.items():
            old = self.active.get(fp)
            if old is not None and old.state != "inactive":
                old.value, old.annotations = new.value, new.annotations
                continue
            self.active[fp] = new

        for fp in list(self.active):
            a = self.active[fp]
            if fp not in seen:
                keep_firing = False
                if a.state == "firing" and self.spec.keep_firing_for_s > 0:
                    if a.keep_firing_since is None:
                        a.keep_firing_since = ts
                    keep_firing = ts - a.keep_firing_since < self.spec.keep_firing_for_s
                if a.state == "pending" or (a.resolved_at is not None and ts - a.resolved_at > RESOLVED_RETENTION_S):
                    del self.active[fp]
                if a.state != "inactive" and not keep_firing:
                    a.state, a.resolved_at = "inactive", ts
                if not keep_firing:
                    continue
            else:
                a.keep_firing_since = None
            if a.state == "pending" and ts - a.active_at >= self.spec.for_s:
                a.state, a.fired_at = "firing", ts

    def to_send(self, ts: float, resend_delay: float, interval: float) -> list[Alert]:
        out = []
        for a in self.active.values():
            if a.needs_sending(ts, resend_delay):
                a.last_sent_at = ts
                a.valid_until = ts + 4 * max(resend_delay, interval)
                out.append(Alert(dict(a.labels), dict(a.annotations), a.value, a.state, a.active_at,
                                 a.fired_at, a.resolved_at, a.last_sent_at, a.valid_until))
        return out

    def state(self) -> str:
        states = {a.state for a in self.active.values()}
        return "firing" if "firing" in states else "pending" if "pending" in states else "inactive"

    def api(self) -> dict:
        return {"state": self.state(), "name": self.name, "query": self.spec.expr,
                "duration": self.spec.for_s, "keepFiringFor": self.spec.keep_firing_for_s,
                "labels": dict(self.spec.labels), "annotations": dict(self.spec.annotations),
                "alerts": [a.api() for a in self.active.values() if a.state != "inactive"],
                "health": self.health, "lastError": self.last_error,
                "evaluationTime": self.evaluation_time, "lastEvaluation": rfc3339(self.last_evaluation),
                "type": "alerting"}


class RecordingRule:
    def __init__(self, spec: RuleSpec):
        self.spec = spec
        self.health = "unknown"
        self.last_error = ""
        self.last_evaluation: float | None = None
        self.evaluation_time = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    def rows(self, samples: list[tuple[dict[str, str], float]], ts: float):
        out = []
        seen = set()
        for labels, value in samples:
            lb = {k: v for k, v in labels.items() if k != NAME}
            lb.update(self.spec.labels)
            fp = _fingerprint(lb)
            if fp in seen:
                raise RuleError("vector contains metrics with the same labelset after applying rule labels")
            seen.add(fp)
            out.append((self.spec.name, lb, int(ts * 1000), value))
        return out

    def api(self) -> dict:
        return {"name": self.name, "query": self.spec.expr, "labels": dict(self.spec.labels),
                "health": self.health, "lastError": self.last_error,
                "evaluationTime": self.evaluation_time, "lastEvaluation": rfc3339(self.last_evaluation),
                "type": "recording"}


Notify = Callable[[list[dict]], None]


@dataclass
class RuleGroup:
    spec: GroupSpec
    interval_s: float
    rules: list = field(default_factory=list)
    last_evaluation: float | None = None
    evaluation_time: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def api(self) -> dict:
        with self.lock:
            return {"name": self.name, "file": self.spec.file, "interval": self.interval_s, "limit": 0,
                    "rules": [r.api() for r in self.rules], "evaluationTime": self.evaluation_time,
                    "lastEvaluation": rfc3339(self.last_evaluation)}


class RuleManager:
    """Evaluates groups against a PromQL engine and hands alerts to a notifier.

    engine      anything with .instant(query, time_s) -> Result (collector.promql.engine.Engine)
    notify      called with the Alertmanager API v2 payload (a list of alert dicts); may raise
    write       called with recording-rule rows (collector.store.writer.Writer.write)
    on_failure  called with a group name when one of its rules fails (a self-metric)
    """

    def __init__(self, groups: list[GroupSpec], engine: QueryEngine, *, default_interval_s: float = 60.0,
                 resend_delay_s: float = 60.0, external_labels: Mapping[str, str] | None = None,
                 external_url: str = "", notify: Notify | None = None, write=None,
                 on_failure: Callable[[str], None] | None = None,
                 on_notify_failure: Callable[[int], None] | None = None,
                 state_path: str | os.PathLike | None = None):
        self.engine = engine
        self.state_path = state_path
        self._state_lock = threading.Lock()
        self.resend_delay_s = resend_delay_s
        self.external_labels = dict(external_labels or {})
        self.external_url = external_url.rstrip("/")
        self.notify = notify
        self.write = write
        self.on_failure = on_failure or (lambda group: None)
        self.on_notify_failure = on_notify_failure or (lambda n: None)
        self.groups = [
            RuleGroup(g, g.interval_s or default_interval_s,
                      [AlertingRule(r, self.external_labels) if r.kind == "alerting" else RecordingRule(r)
                       for r in g.rules])
            for g in groups]

    def evaluate(self, group: RuleGroup, ts: float | None = None) -> None:
        """One evaluation of a group at ts (now by default), then the notifications it causes."""
        ts = time.time() if ts is None else ts
        started = time.monotonic()
        payload: list[dict] = []
        failed = False
        with group.lock:
            for rule in group.rules:
                t0 = time.monotonic()
                try:
                    samples = _vector(self.engine.instant(rule.spec.expr, ts))
                    if isinstance(rule, AlertingRule):
                        rule.apply(samples, ts)
                    elif self.write is not None:
                        self.write(rule.rows(samples, ts))
                    rule.health, rule.last_error = "ok", ""
                except Exception as exc:  # noqa: BLE001 - one bad rule must not stop the others
                    failed = True
                    rule.health, rule.last_error = "err", str(exc) or type(exc).__name__
                    log.warning("rule %s in group %s failed: %s", rule.name, group.name, rule.last_error)
                rule.last_evaluation, rule.evaluation_time = ts, time.monotonic() - t0
                if isinstance(rule, AlertingRule):
                    for a in rule.to_send(ts, self.resend_delay_s, group.interval_s):
                        payload.append(self.alertmanager_alert(a, rule.spec.expr))
            group.last_evaluation, group.evaluation_time = ts, time.monotonic() - started
        if self.state_path is not None:
            self.save_state(ts)
        if failed:
            self.on_failure(group.name)
        if payload and self.notify is not None:
            try:
                self.notify(payload)
            except Exception as exc:  # noqa: BLE001 - counted and logged; the next resend retries
                log.warning("sending %d alert(s) to Alertmanager failed: %s", len(payload), exc)
                self.on_notify_failure(len(payload))

    def alertmanager_alert(self, a: Alert, expr: str) -> dict:
        """Alertmanager API v2 postableAlert, built the way Prometheus' notifier builds it."""
        labels = dict(a.labels)
        for k, v in self.external_labels.items():
            labels.setdefault(k, v)
        ends = a.resolved_at if a.resolved_at is not None else a.valid_until
        return {"labels": labels, "annotations": dict(a.annotations),
                "startsAt": rfc3339(a.fired_at), "endsAt": rfc3339(ends),
                "generatorURL": f"{self.external_url}/graph?g0.expr={quote(expr, safe='')}&g0.tab=1"}

    # ------------------------------------------------------------------ state across restarts
    _FIELDS = ("labels", "annotations", "value", "state", "active_at", "fired_at", "resolved_at",
               "last_sent_at", "valid_until", "keep_firing_since")

    def save_state(self, now: float | None = None) -> None:
        doc: dict = {"version": 1, "saved_at": time.time() if now is None else now, "groups": {}}
        for g in self.groups:
            with g.lock:
                rules = {r.name: [{f: getattr(a, f) for f in self._FIELDS} for a in r.active.values()]
                         for r in g.rules if isinstance(r, AlertingRule) and r.active}
            if rules:
                doc["groups"][f"{g.spec.file};{g.name}"] = rules
        tmp = f"{self.state_path}.tmp"
        with self._state_lock:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f, allow_nan=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)

    def restore_state(self, now: float | None = None) -> int:
        """Load saved alerts into their rules; returns how many were restored."""
        now = time.time() if now is None else now
        try:
            with open(self.state_path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.warning("rules: ignoring unreadable state file %s: %s", self.state_path, exc)
            return 0
        if doc.get("version") != 1 or now - float(doc.get("saved_at", 0)) > OUTAGE_TOLERANCE_S:
            log.info("rules: state file %s is too old or from another version; starting fresh", self.state_path)
            return 0
        restored = 0
        for g in self.groups:
            saved = doc["groups"].get(f"{g.spec.file};{g.name}", {})
            for r in g.rules:
                if not isinstance(r, AlertingRule):
                    continue
                for entry in saved.get(r.name, []):
                    a = Alert(**{f: entry.get(f) for f in self._FIELDS})
                    r.active[_fingerprint(a.labels)] = a
                    restored += 1
        log.info("rules: restored %d active alert(s) from %s", restored, self.state_path)
        return restored

    def active_alerts(self) -> list[dict]:
        out = []
        for g in self.groups:
            with g.lock:
                for r in g.rules:
                    if isinstance(r, AlertingRule):
                        out.extend(a.api() for a in r.active.values() if a.state != "inactive")
        return out
