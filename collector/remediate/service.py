"""Building the Remediator from the collector's `remediation:` config section.

    remediation:
      backend: slurm               # slurm | kubernetes | webhook
      dry_run: true                # the default: decide and audit, touch no scheduler
      healthy_window: 1h           # healthy this long before a held chip returns to service
      verify_command: []           # e.g. ["dcgmi", "diag", "-r", "2"]; {cluster} {node} {chip} {uuid} are filled in
      verify_timeout: 10m
      storm_nodes: 3               # the same job failing on this many nodes at once = fate-sharing
      operator_override: 24h       # after `cordon healthy`, old evidence does not cordon the chip again
      budget: {max_cluster_percent: 2, max_nodes_per_rack: 1, max_new_per_hour: 5, max_age: 5m}
      slurm: {scontrol: ["scontrol"]}
      kubernetes: {kubeconfig: null, context: null}   # null: in-cluster config, else ~/.kube/config
      webhook: {url: "https://...", secret_env: SHOPFLOOR_WEBHOOK_SECRET, timeout: 5s, retries: 3}

The collector keeps one Remediator per process in ctx.extras["remediation"]; the health
module's live job gets it with `remediator_for(ctx)` and calls `.apply(verdicts, now)`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from collector.config import ConfigError, parse_duration
from collector.remediate.audit import Audit
from collector.remediate.budget import Budget, BudgetConfig, Inventory
from collector.remediate.remediator import Remediator

KNOWN = {"backend", "dry_run", "healthy_window", "verify_command", "verify_timeout", "storm_nodes",
         "operator_override", "budget", "slurm", "kubernetes", "webhook"}


def _list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
        raise ConfigError(f"{where}: must be a list of arguments (never a shell string)")
    return [str(v) for v in value]


def make_backend(section: Mapping[str, Any], env: Mapping[str, str] | None = None):
    env = os.environ if env is None else env
    kind = section.get("backend", "slurm")
    if kind == "slurm":
        from collector.remediate.slurm import SlurmBackend
        opts = dict(section.get("slurm") or {})
        return SlurmBackend(_list(opts.get("scontrol", ["scontrol"]), "remediation.slurm.scontrol") or ["scontrol"])
    if kind == "kubernetes":
        from kubernetes import config as kconfig

        from collector.remediate.kubernetes import KubernetesBackend
        opts = dict(section.get("kubernetes") or {})
        if opts.get("kubeconfig") or opts.get("context"):
            api_client = kconfig.new_client_from_config(config_file=opts.get("kubeconfig"),
                                                        context=opts.get("context"))
            return KubernetesBackend(api_client)
        return KubernetesBackend()
    if kind == "webhook":
        from collector.remediate.webhook import WebhookBackend
        opts = dict(section.get("webhook") or {})
        if not opts.get("url"):
            raise ConfigError("remediation.webhook.url is required for the webhook backend")
        secret_env = str(opts.get("secret_env", "SHOPFLOOR_WEBHOOK_SECRET"))
        secret = env.get(secret_env, "")
        if not secret:
            raise ConfigError(f"remediation.webhook: the signing secret must be in ${secret_env}")
        return WebhookBackend(str(opts["url"]), secret,
                              timeout=parse_duration(opts.get("timeout", 5), "remediation.webhook.timeout"),
                              retries=int(opts.get("retries", 3)))
    raise ConfigError(f"remediation.backend: {kind!r} is not one of slurm, kubernetes, webhook")


def build(section: Mapping[str, Any], store, *, metrics_sink=None, backend=None,
          env: Mapping[str, str] | None = None) -> Remediator:
    section = dict(section or {})
    unknown = set(section) - KNOWN
    if unknown:
        raise ConfigError(f"remediation: unknown keys {sorted(unknown)} (known: {sorted(KNOWN)})")
    dry_run = section.get("dry_run", True)
    if not isinstance(dry_run, bool):
        raise ConfigError("remediation.dry_run: must be true or false")
    budget = Budget(BudgetConfig.from_dict(section.get("budget")), Inventory({}))
    rem = Remediator(
        backend or make_backend(section, env), budget, Audit(store), dry_run=dry_run,
        healthy_window_s=parse_duration(section.get("healthy_window", "1h"), "remediation.healthy_window"),
        verify_command=_list(section.get("verify_command"), "remediation.verify_command"),
        verify_timeout_s=parse_duration(section.get("verify_timeout", "10m"), "remediation.verify_timeout"),
        storm_nodes=int(section.get("storm_nodes", 3)), metrics_sink=metrics_sink,
        operator_override_s=parse_duration(section.get("operator_override", "24h"), "remediation.operator_override"),
        inventory_loader=lambda: Inventory.from_store(store))
    return rem


def remediator_for(ctx) -> Remediator:
    """The collector's Remediator (built on first use from ctx.config.remediation)."""
    rem = ctx.extras.get("remediation")
    if rem is None:
        rem = build(ctx.config.remediation, ctx.store, metrics_sink=ctx.writer.write)
        ctx.extras["remediation"] = rem
    return rem
