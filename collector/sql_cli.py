"""`shopfloor sql "SELECT ..."`: run a read-only query against a running collector.

    shopfloor sql "SELECT * FROM accelerator_hours_daily" --url http://127.0.0.1:9600
    shopfloor sql "SELECT ..." --format csv|json|parquet [--output FILE]

The token comes from SHOPFLOOR_COLLECTOR_TOKEN (never the command line). parquet needs --output.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shopfloor sql", description="Read-only SQL against a running collector.")
    p.add_argument("query", help="one SELECT statement (see docs/sql.md for the views)")
    p.add_argument("--url", default=os.environ.get("SHOPFLOOR_COLLECTOR_URL", "http://127.0.0.1:9600"))
    p.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    p.add_argument("--output", "-o", help="write to this file instead of stdout (required for parquet)")
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    if args.format == "parquet" and not args.output:
        p.error("--format parquet needs --output FILE")

    import httpx
    import polars as pl

    from collector.sql import SqlError, query

    try:
        df = query(args.url, args.query, token=os.environ.get("SHOPFLOOR_COLLECTOR_TOKEN"), timeout=args.timeout)
    except SqlError as exc:
        print(f"shopfloor sql: {exc.kind}: {exc.message}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"shopfloor sql: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if args.format == "parquet":
        df.write_parquet(args.output)
        return 0
    if args.format == "csv":
        # CSV has no nested types: maps/lists are written as JSON text.
        nested = [c for c, t in df.schema.items()
                  if not (t.is_numeric() or t.is_temporal() or t in (pl.String, pl.Boolean, pl.Null))]
        if nested:
            df = df.with_columns(pl.col(c).map_elements(_json_text, return_dtype=pl.String) for c in nested)
        text = df.write_csv()
    elif args.format == "json":
        text = df.write_json()
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200,
                       tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
            text = str(df) + "\n"
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _json_text(value) -> str:
    import json

    if hasattr(value, "to_list"):
        value = value.to_list()
    if isinstance(value, list) and value and isinstance(value[0], dict) and set(value[0]) == {"key", "value"}:
        value = {d["key"]: d["value"] for d in value}   # an Arrow MAP read by polars
    return json.dumps(value, default=str, sort_keys=True)
