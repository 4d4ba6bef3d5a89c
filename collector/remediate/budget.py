"""Safety limits on remediation: how much of the fleet Shopfloor may take out of service.

A bad rule, a bad model or a fabric event must never cordon the fleet. So before any new cordon:

  * the data must be fresh (verdict.observed_at no older than max_age);
  * fate-sharing verdicts (the same XID on many nodes of one job) never cordon;
  * at most `max_cluster_percent` of a cluster's chips may be out of service because of
    Shopfloor at once (a Slurm drain or a Kubernetes cordon takes the whole node out, so a held
    node counts all its chips);
  * at most `max_nodes_per_rack` nodes of one rack held at once;
  * at most `max_new_per_hour` new node holds per hour (the rate limit).

When a limit is hit, new cordons are refused and the scope is reported "tripped" (the
shopfloor.remediation.budget.tripped gauge, alertable), while un-cordoning keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from collector.config import ConfigError, parse_duration
from collector.health.verdict import Verdict
from collector.remediate.audit import Cordon


@dataclass
class BudgetConfig:
    max_cluster_percent: float = 2.0
    max_nodes_per_rack: int = 1
    max_new_per_hour: int = 5
    max_age_s: float = 300.0

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "BudgetConfig":
        raw = dict(raw or {})
        unknown = set(raw) - {"max_cluster_percent", "max_nodes_per_rack", "max_new_per_hour", "max_age"}
        if unknown:
            raise ConfigError(f"remediation.budget: unknown keys {sorted(unknown)}")
        cfg = cls()
        try:
            if "max_cluster_percent" in raw:
                cfg.max_cluster_percent = float(raw["max_cluster_percent"])
            if "max_nodes_per_rack" in raw:
                cfg.max_nodes_per_rack = int(raw["max_nodes_per_rack"])
            if "max_new_per_hour" in raw:
                cfg.max_new_per_hour = int(raw["max_new_per_hour"])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"remediation.budget: {exc}") from None
        if "max_age" in raw:
            cfg.max_age_s = parse_duration(raw["max_age"], "remediation.budget.max_age")
        if not 0 <= cfg.max_cluster_percent <= 100:
            raise ConfigError("remediation.budget.max_cluster_percent: must be between 0 and 100")
        if cfg.max_nodes_per_rack < 0 or cfg.max_new_per_hour < 0 or cfg.max_age_s <= 0:
            raise ConfigError("remediation.budget: limits must not be negative, max_age must be positive")
        return cfg


@dataclass(frozen=True)
class Check:
    allowed: bool
    reasons: tuple[str, ...]         # why refused (empty when allowed)
    tripped: tuple[str, ...]         # scopes whose limit refused it: cluster/<c>, rack/<r>, rate
    state: dict[str, Any]            # the counts behind the decision (audited)


class Inventory:
    """How many chips each node has, per cluster: the denominator of the cluster budget."""

    def __init__(self, chips_by_node: Mapping[tuple[str, str], int]):
        self.chips_by_node = dict(chips_by_node)

    def cluster_chips(self, cluster: str) -> int:
        return sum(n for (c, _), n in self.chips_by_node.items() if c == cluster)

    def node_chips(self, cluster: str, node: str) -> int:
        return self.chips_by_node.get((cluster, node), 0)

    @classmethod
    def from_store(cls, store, metric: str | None = None) -> "Inventory":
        """Chips per node from the hw.gpu.info series the agents report (one series per chip)."""
        from agent.catalog import catalog
        metric = metric or catalog().prom("hw.gpu.info")
        rows = store.cursor().execute(
            "SELECT labels['cluster'], labels['node'], count(DISTINCT labels['chip']) FROM series "
            "WHERE metric = ? GROUP BY ALL", [metric]).fetchall()
        return cls({(c or "", n or ""): int(k) for c, n, k in rows})


@dataclass
class Budget:
    config: BudgetConfig
    inventory: Inventory
    tripped: dict[str, str] = field(default_factory=dict)   # scope -> why, while exhausted

    def is_stale(self, verdict: Verdict, now: float) -> bool:
        return now - verdict.observed_at > self.config.max_age_s

    def check_new_hold(self, cluster: str, node: str, rack: str, held: Iterable[Cordon],
                       new_last_hour: int) -> Check:
        """May Shopfloor take `node` out of service, given the nodes it already holds?"""
        cfg = self.config
        held_nodes = {(c.cluster, c.node): c.rack for c in held if c.state == "cordoned"}
        total = self.inventory.cluster_chips(cluster)
        out_chips = sum(self.inventory.node_chips(c, n) for (c, n) in held_nodes if c == cluster)
        node_chips = self.inventory.node_chips(cluster, node)
        rack_nodes = sum(1 for r in held_nodes.values() if r == rack)   # rack names are site-wide
        state = {"cluster": cluster, "cluster_chips": total, "chips_out": out_chips,
                 "node_chips": node_chips, "max_cluster_percent": cfg.max_cluster_percent,
                 "rack": rack, "rack_nodes_out": rack_nodes, "max_nodes_per_rack": cfg.max_nodes_per_rack,
                 "new_last_hour": new_last_hour, "max_new_per_hour": cfg.max_new_per_hour}
        reasons, scopes = [], []
        if total <= 0 or node_chips <= 0:
            # Without an inventory the cluster budget cannot be computed: refuse rather than guess.
            reasons.append(f"no chip inventory for {cluster}/{node}: cannot check the cluster budget")
            scopes.append(f"cluster/{cluster}")
        elif 100.0 * (out_chips + node_chips) / total > cfg.max_cluster_percent:
            reasons.append(f"cluster budget: {out_chips + node_chips} of {total} chips would be out "
                           f"of service (limit {cfg.max_cluster_percent:g}%)")
            scopes.append(f"cluster/{cluster}")
        if rack_nodes + 1 > cfg.max_nodes_per_rack:
            reasons.append(f"rack budget: rack {rack or '(unknown)'} already has {rack_nodes} node(s) "
                           f"held (limit {cfg.max_nodes_per_rack})")
            scopes.append(f"rack/{rack}")
        if new_last_hour + 1 > cfg.max_new_per_hour:
            reasons.append(f"rate budget: {new_last_hour} new cordons in the last hour "
                           f"(limit {cfg.max_new_per_hour})")
            scopes.append("rate")
        for scope, why in zip(scopes, reasons):
            self.tripped[scope] = why
        return Check(not reasons, tuple(reasons), tuple(scopes), state)

    def refresh_tripped(self, held: Iterable[Cordon], new_last_hour: int) -> None:
        """Clear the scopes that have room again (a node was released, the hour moved on)."""
        held = list(held)
        held_nodes = {(c.cluster, c.node): c.rack for c in held if c.state == "cordoned"}
        for scope in list(self.tripped):
            kind, _, name = scope.partition("/")
            if kind == "rate":
                room = new_last_hour < self.config.max_new_per_hour
            elif kind == "rack":
                room = sum(1 for r in held_nodes.values() if r == name) < self.config.max_nodes_per_rack
            else:
                total = self.inventory.cluster_chips(name)
                out = sum(self.inventory.node_chips(c, n) for (c, n) in held_nodes if c == name)
                # room for at least one more node of the cluster's typical size
                per_node = max((self.inventory.node_chips(c, n) for (c, n) in self.inventory.chips_by_node
                                if c == name), default=0)
                room = total > 0 and 100.0 * (out + per_node) / total <= self.config.max_cluster_percent
            if room:
                del self.tripped[scope]
