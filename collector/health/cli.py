"""`shopfloor health train|backtest`.

    shopfloor health train --trace DIR [DIR ...] [--out MODEL] [--seed N]
    shopfloor health train --from-collector DB [--out MODEL]
    shopfloor health backtest --trace DIR [--model MODEL] [--json]

`--from-collector` reads the collector's DuckDB file (stop the collector first, or point at a
copy: DuckDB lets one process write a file) and takes the failures an operator confirmed from
its `health_confirmed_failures` table (docs/health.md).
"""

from __future__ import annotations

import argparse
import json
import sys

import polars as pl

from . import backtest as bt
from . import model as risk_model
from .evaluate import without_storms
from .features import CHIP_KEY, HOUR_MS, StoreSource, features, read_hours

CONFIRMED_TABLE = "health_confirmed_failures"
CONFIRMED_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {CONFIRMED_TABLE} (
    ts           BIGINT  NOT NULL,   -- when the chip failed, ms since the epoch
    cluster      VARCHAR NOT NULL,
    node         VARCHAR NOT NULL,
    chip         VARCHAR NOT NULL,   -- the chip label; '' for a node-level failure
    mode         VARCHAR NOT NULL,   -- off_bus, hbm_uncorrectable, sram_ecc, gsp, thermal, nic or other
    confirmed_by VARCHAR NOT NULL    -- who confirmed it (operator name, ticket)
)
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shopfloor health", description="health model: train it, backtest it")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the risk model")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", nargs="+", help="simulator trace directories (shopfloor simulate --out DIR); "
                     "several are trained on together")
    src.add_argument("--from-collector", metavar="DB", help="the collector's DuckDB file")
    t.add_argument("--out", default=risk_model.DEFAULT_MODEL, help="where to write the model (default: the packaged one)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--train-frac", type=float, default=0.6, help="early share of the time range to fit on")
    b = sub.add_parser("backtest", help="replay a trace through the live evaluation code and score it")
    b.add_argument("--trace", required=True)
    b.add_argument("--model", default=None, help="model file (default: the packaged one)")
    b.add_argument("--json", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "backtest":
            bt.run(args.trace, args.model, as_json=args.json)
            return 0
        if args.trace:
            grids, fails, seeds = [], [], []
            for d in args.trace:
                td = bt.read_trace(d)
                # the features the live service computes: storm events removed first
                _, events = without_storms(td.events, td.jobs)
                grids.append(features(td.rollup, events, end_hour=(td.end_ms - 1) // HOUR_MS))  # type: ignore[arg-type]
                fails.append(td.failures)
                seeds.append(str(td.meta.get("seed")))
            grid, failures = pl.concat(grids, how="diagonal_relaxed"), pl.concat(fails, how="diagonal_relaxed")
            source = f"traces {' '.join(args.trace)} (seeds {', '.join(seeds)})"
        else:
            grid, failures = from_collector(args.from_collector)
            source = f"collector {args.from_collector}"
        model, report = risk_model.train(grid, failures, seed=args.seed, train_frac=args.train_frac, source=source)
        model.save(args.out)
        print(json.dumps({k: v for k, v in report.items() if k != "threshold_table"}, indent=2))
        print(f"model written to {args.out}")
        return 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"shopfloor health: {exc}", file=sys.stderr)
        return 2


def from_collector(db_path: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(feature grid, confirmed failures) from a collector database file."""
    from collector.store.core import Store

    store = Store(db_path, read_only=True)
    try:
        cur = store.cursor()
        has = cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                          [CONFIRMED_TABLE]).fetchall()[0][0]
        if not has:
            raise ValueError(f"{db_path}: no {CONFIRMED_TABLE} table: no operator-confirmed failures to learn from")
        conf = cur.sql(f"SELECT ts, cluster, node, chip, mode, confirmed_by FROM {CONFIRMED_TABLE}").pl()
        lo, hi = cur.execute("SELECT min(ts), max(ts) FROM samples").fetchall()[0]
        if lo is None:
            raise ValueError(f"{db_path}: the store has no samples")
        src = StoreSource(store)
        r, ev = read_hours(src, int(lo), int(hi) + 1)
        _, ev = without_storms(ev, None)
    finally:
        store.close()
    grid = features(r, ev, end_hour=int(hi) // HOUR_MS)
    # a confirmed failure names a chip slot; the uuid is the one that slot reported at the time
    spans = grid.group_by(CHIP_KEY).agg(h0=pl.col("hour").min(), h1=pl.col("hour").max())
    f = conf.with_columns(h=pl.col("ts") // HOUR_MS).join(spans, on=["cluster", "node", "chip"], how="left")
    f = f.filter(pl.col("uuid").is_null() | ((pl.col("h") >= pl.col("h0")) & (pl.col("h") <= pl.col("h1") + 24)))
    failures = f.select("ts", "cluster", pl.lit("").alias("rack"), "node", "chip", pl.col("uuid").fill_null(""), "mode",
                        # the precursor of a confirmed failure is not known: the whole horizon before it
                        # counts as "showing", the model learns what it can
                        precursor_start=pl.col("ts") - risk_model.HORIZON_H * HOUR_MS, lemon=pl.lit(False))
    return grid, failures
