"""The `shopfloor` command: one entry point that reaches the agent and the collector.

Each subcommand lives in the module that owns it; this file only dispatches, importing the
module lazily so `shopfloor agent` on a GPU node never imports the collector's dependencies.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help). The function takes argv (list[str]) and
# returns an exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "agent": ("agent.cli", "main", "run the node agent (`agent scrape --once` prints one collection)"),
    "simulate": ("agent.simulate.cli", "main", "run a simulated fleet (push to a collector or write a trace directory)"),
    "collector": ("collector.cli", "main_collector", "run the collector service"),
    "demo": ("collector.demo", "main", "collector on embedded DuckDB plus a simulated fleet, with the URLs to open"),
    "sql": ("collector.sql_cli", "main", "run a read-only SQL query against a running collector"),
    "dashboards": ("collector.dashboards_cli", "main", "push the Grafana dashboards (`dashboards push --grafana-url URL`)"),
    "health": ("collector.health.cli", "main", "health model: `health train`, `health backtest --trace DIR`"),
    "health-check": ("collector.health.node_check", "main", "node health check for Slurm's HealthCheckProgram"),
    "cordon": ("collector.remediate.cli", "main", "remediation state: `cordon list`, `cordon healthy CHIP`"),
}


def usage() -> str:
    lines = ["usage: shopfloor <command> [args...]", "", "commands:"]
    lines += [f"  {name:14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"shopfloor: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        print(f"shopfloor {cmd}: cannot load {module}: {exc}. "
              "The collector's commands need `pip install shopfloor[collector]`.", file=sys.stderr)
        return 2
    return int(getattr(mod, func)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
