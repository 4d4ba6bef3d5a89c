"""`shopfloor collector`: run the collector service (FastAPI under uvicorn)."""

from __future__ import annotations

import argparse
import logging
import sys

from collector.config import ConfigError, load


def main_collector(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shopfloor collector", description=__doc__)
    p.add_argument("--config", help="YAML config file (see collector/config.py for the keys)")
    p.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:9600)")
    p.add_argument("--db", help="DuckDB file (default shopfloor.duckdb)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load(args.config, overrides={"listen": args.listen, "db": args.db})
    except ConfigError as exc:
        print(f"shopfloor collector: {exc}", file=sys.stderr)
        return 2

    import duckdb
    import uvicorn

    from collector.app import create_app

    try:
        app = create_app(config)
    except (OSError, duckdb.IOException) as exc:   # e.g. the DuckDB file is held by another collector
        print(f"shopfloor collector: cannot open {config.db}: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level,
                access_log=args.log_level == "debug", timeout_graceful_shutdown=10)
    return 0
