"""The audit trail and the current cordon state, in the collector's DuckDB file.

    remediation_audit    one row per decision, made or refused, with its reasons: what an
                         on-call engineer reads to learn why a node was (not) drained.
    remediation_cordons  one row per chip Shopfloor currently holds out of service (or would
                         hold, in dry-run), with when it started and its healthy streak.

Both live in the same DuckDB database as the samples so that one backup, one `shopfloor sql`
and one retention policy cover them. Writes take the store's write lock (one writer
connection per process, like every other write).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS remediation_audit (
    ts           TIMESTAMP NOT NULL,   -- UTC
    cluster      VARCHAR NOT NULL,
    node         VARCHAR NOT NULL,
    chip         VARCHAR NOT NULL,
    action       VARCHAR NOT NULL,     -- cordon | uncordon | mark_healthy | confirm_failure
    outcome      VARCHAR NOT NULL,     -- done | dry_run | refused | failed | held_by_other | already | noop
    dry_run      BOOLEAN NOT NULL,
    backend      VARCHAR NOT NULL,
    reasons      VARCHAR NOT NULL,     -- JSON list of sentences
    budget_state VARCHAR NOT NULL,     -- JSON object: the budget's counts when deciding
    actor        VARCHAR NOT NULL      -- "shopfloor" or the operator's name
);
CREATE TABLE IF NOT EXISTS remediation_cordons (
    cluster        VARCHAR NOT NULL,
    node           VARCHAR NOT NULL,
    chip           VARCHAR NOT NULL,
    uuid           VARCHAR NOT NULL,
    rack           VARCHAR NOT NULL,
    backend        VARCHAR NOT NULL,
    state          VARCHAR NOT NULL,   -- cordoned | held_by_other (somebody else already drained it)
    dry_run        BOOLEAN NOT NULL,
    since          TIMESTAMP NOT NULL,
    reason         VARCHAR NOT NULL,
    healthy_since  TIMESTAMP,          -- start of the current healthy streak (return to service)
    PRIMARY KEY (cluster, node, chip)
);
CREATE TABLE IF NOT EXISTS remediation_overrides (
    cluster  VARCHAR NOT NULL,
    node     VARCHAR NOT NULL,
    chip     VARCHAR NOT NULL,
    actor    VARCHAR NOT NULL,     -- the operator who marked the chip healthy
    ts       TIMESTAMP NOT NULL,
    until    TIMESTAMP NOT NULL,   -- no new cordon for this chip before this time
    PRIMARY KEY (cluster, node, chip)
);
"""


def to_ts(epoch_s: float) -> dt.datetime:
    """A naive UTC datetime (DuckDB TIMESTAMP) from epoch seconds."""
    return dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc).replace(tzinfo=None)


def from_ts(value: dt.datetime | None) -> float | None:
    return None if value is None else value.replace(tzinfo=dt.timezone.utc).timestamp()


@dataclass
class Decision:
    """One remediation decision, made or refused (a row of remediation_audit)."""

    ts: float
    cluster: str
    node: str
    chip: str
    action: str
    outcome: str
    dry_run: bool
    backend: str
    reasons: list[str]
    budget_state: dict[str, Any] = field(default_factory=dict)
    actor: str = "shopfloor"

    def as_dict(self) -> dict[str, Any]:
        return {"ts": self.ts, "cluster": self.cluster, "node": self.node, "chip": self.chip,
                "action": self.action, "outcome": self.outcome, "dry_run": self.dry_run,
                "backend": self.backend, "reasons": list(self.reasons),
                "budget_state": self.budget_state, "actor": self.actor}


@dataclass
class Cordon:
    """A chip Shopfloor holds out of service (a row of remediation_cordons)."""

    cluster: str
    node: str
    chip: str
    uuid: str
    rack: str
    backend: str
    state: str
    dry_run: bool
    since: float
    reason: str
    healthy_since: float | None = None

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.node}/{self.chip}"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Audit:
    """Reads and writes the two tables through a Store's connection (or any DuckDB connection)."""

    def __init__(self, store):
        self.con = store.con
        self.lock = store.write_lock
        self.read_only = getattr(store, "read_only", False)
        with self.lock:
            try:
                self.con.execute(SCHEMA)
            except Exception:  # noqa: BLE001 - a read-only file: the tables exist or reads say so
                pass

    # ------------------------------------------------------------------ audit
    def record(self, d: Decision) -> None:
        with self.lock:
            self.con.execute(
                "INSERT INTO remediation_audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [to_ts(d.ts), d.cluster, d.node, d.chip, d.action, d.outcome, d.dry_run, d.backend,
                 json.dumps(list(d.reasons)), json.dumps(d.budget_state, sort_keys=True), d.actor])

    def history(self, limit: int = 100, *, cluster: str | None = None, node: str | None = None,
                since: float | None = None) -> list[Decision]:
        where, params = ["TRUE"], []
        if cluster:
            where.append("cluster = ?"); params.append(cluster)
        if node:
            where.append("node = ?"); params.append(node)
        if since is not None:
            where.append("ts >= ?"); params.append(to_ts(since))
        rows = self.con.cursor().execute(
            f"SELECT * FROM remediation_audit WHERE {' AND '.join(where)} "
            "ORDER BY ts DESC, rowid DESC LIMIT ?", [*params, int(limit)]).fetchall()
        return [Decision(from_ts(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8]),
                         json.loads(r[9]), r[10]) for r in rows]

    def count_new_cordons(self, since: float, *, dry_run: bool) -> int:
        """Cordons started since `since` (done, or would-be in dry-run): the hourly rate budget."""
        outcome = "dry_run" if dry_run else "done"
        return self.con.cursor().execute(
            "SELECT count(*) FROM remediation_audit WHERE action = 'cordon' AND outcome = ? "
            "AND ts >= ? AND json_extract_string(budget_state, '$.new_hold') = 'true'",
            [outcome, to_ts(since)]).fetchone()[0]

    # ------------------------------------------------------------------ cordon state
    def cordons(self, *, dry_run: bool | None = None) -> list[Cordon]:
        sql, params = "SELECT * FROM remediation_cordons", []
        if dry_run is not None:
            sql += " WHERE dry_run = ?"
            params.append(dry_run)
        rows = self.con.cursor().execute(sql + " ORDER BY cluster, node, chip", params).fetchall()
        return [Cordon(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], from_ts(r[8]), r[9],
                       from_ts(r[10])) for r in rows]

    def get(self, cluster: str, node: str, chip: str) -> Cordon | None:
        r = self.con.cursor().execute(
            "SELECT * FROM remediation_cordons WHERE cluster = ? AND node = ? AND chip = ?",
            [cluster, node, chip]).fetchone()
        return None if r is None else Cordon(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7],
                                             from_ts(r[8]), r[9], from_ts(r[10]))

    def put(self, c: Cordon) -> None:
        with self.lock:
            self.con.execute(
                "INSERT OR REPLACE INTO remediation_cordons VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [c.cluster, c.node, c.chip, c.uuid, c.rack, c.backend, c.state, c.dry_run,
                 to_ts(c.since), c.reason, None if c.healthy_since is None else to_ts(c.healthy_since)])

    def remove(self, cluster: str, node: str, chip: str) -> None:
        with self.lock:
            self.con.execute("DELETE FROM remediation_cordons WHERE cluster = ? AND node = ? AND chip = ?",
                             [cluster, node, chip])

    # ------------------------------------------------------------------ operator overrides
    def set_override(self, cluster: str, node: str, chip: str, *, actor: str, ts: float, until: float) -> None:
        with self.lock:
            self.con.execute("INSERT OR REPLACE INTO remediation_overrides VALUES (?, ?, ?, ?, ?, ?)",
                             [cluster, node, chip, actor, to_ts(ts), to_ts(until)])

    def override(self, cluster: str, node: str, chip: str, now: float) -> tuple[str, float, float] | None:
        """(actor, ts, until) of an operator's "healthy" still in force for the chip, or None."""
        r = self.con.cursor().execute(
            "SELECT actor, ts, until FROM remediation_overrides WHERE cluster = ? AND node = ? AND chip = ? "
            "AND until > ?", [cluster, node, chip, to_ts(now)]).fetchone()
        return None if r is None else (r[0], from_ts(r[1]), from_ts(r[2]))

    def clear_override(self, cluster: str, node: str, chip: str) -> None:
        with self.lock:
            self.con.execute("DELETE FROM remediation_overrides WHERE cluster = ? AND node = ? AND chip = ?",
                             [cluster, node, chip])

    # ------------------------------------------------------------------ operator-confirmed failures
    def confirm_failure(self, cluster: str, node: str, chip: str, *, failed_at: float, actor: str,
                        mode: str) -> None:
        """A failure an operator confirmed: a training label for `shopfloor health train
        --from-collector` (the table and its columns are the health module's, docs/health.md)."""
        from collector.health.cli import CONFIRMED_SCHEMA, CONFIRMED_TABLE
        with self.lock:
            self.con.execute(CONFIRMED_SCHEMA)
            self.con.execute(f"INSERT INTO {CONFIRMED_TABLE} (ts, cluster, node, chip, mode, confirmed_by) "
                             "VALUES (?, ?, ?, ?, ?, ?)", [int(failed_at * 1000), cluster, node, chip, mode, actor])


def rows_as_dicts(items: Iterable[Any]) -> list[dict[str, Any]]:
    return [i.as_dict() for i in items]
