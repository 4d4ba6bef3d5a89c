"""`shopfloor agent`: run the node agent, or print one collection.

    shopfloor agent --config FILE                  run: collect every interval, push OTLP, serve /metrics
    shopfloor agent scrape --once --config FILE    collect every enabled source once and print the
                                                   Prometheus text exposition (a debugging aid)

An invalid config exits with status 2 and the reason (naming the key) on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from agent.config import ConfigError, load

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shopfloor agent", description="Shopfloor node agent")
    p.add_argument("command", nargs="?", choices=["scrape"],
                   help="scrape: collect once and print Prometheus text exposition (with --once)")
    p.add_argument("--config", required=True, help="agent YAML config (see docs/agent.example.yaml)")
    p.add_argument("--once", action="store_true", help="with scrape: collect one time and exit")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def scrape_once(config_path: str) -> int:
    from agent.export.prometheus import render
    from agent.runner import close_sources, collect_sources
    from agent.sources import build_sources

    cfg = load(config_path)
    sources = build_sources(cfg)
    try:
        data, selfm = collect_sources(sources)
    finally:
        close_sources(sources)
    sys.stdout.write(render(data + selfm, cfg.resource))
    return 0


def run(config_path: str) -> int:
    from agent.runner import Agent

    cfg = load(config_path)
    agent = Agent(cfg)   # opens the spool and binds /metrics: fails here, before anything runs

    def _term(signum, frame):
        agent.request_stop()   # the loop ends after the current collection; stop() cleans up

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    agent.start()
    logging.getLogger("agent").info("agent running: node=%s interval=%ss endpoint=%s",
                                 cfg.labels.get("node"), cfg.interval, cfg.collector_endpoint or "(push off)")
    try:
        agent.run()
    finally:
        agent.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.command == "scrape") != args.once:
        parser.error("use `scrape --once` together")
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "scrape":
            return scrape_once(args.config)
        return run(args.config)
    except ConfigError as exc:
        print(f"shopfloor agent: invalid config: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:   # the /metrics port is taken, the spool dir is not writable, ...
        print(f"shopfloor agent: cannot start: {exc}", file=sys.stderr)
        return 1
