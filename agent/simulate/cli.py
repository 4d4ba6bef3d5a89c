"""`shopfloor simulate`: run a simulated fleet, pushing OTLP to a collector or writing a trace.

  shopfloor simulate --nodes 64 --endpoint http://127.0.0.1:9600/v1/metrics --realtime
  shopfloor simulate --nodes 125 --chips 8 --duration 60d --out trace/ --seed 7
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from datetime import datetime, timezone

# The fixed default start of a trace, so that two runs with the same arguments are identical.
DEFAULT_TRACE_START = "2026-01-01T00:00:00Z"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(text: str) -> int:
    """'6h', '60d', '10s', '90' (seconds) -> whole seconds (> 0)."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 10s, 5m, 6h, 60d)")
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds < 1 or seconds != int(seconds):
        raise argparse.ArgumentTypeError(f"duration {text!r} must be a whole number of seconds >= 1")
    return int(seconds)


def parse_time(text: str) -> int:
    """ISO 8601 (naive = UTC), 'now', or epoch seconds/milliseconds -> epoch milliseconds."""
    text = text.strip()
    if text == "now":
        return int(time.time() * 1000)
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return int(value if value > 1e11 else value * 1000)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (use ISO 8601, e.g. 2026-01-01T00:00:00Z, or epoch seconds)")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def _share(text: str) -> float:
    v = float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError("--trainium-share must be between 0 and 1")
    return v


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shopfloor simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=_positive, default=16, help="simulated nodes (default 16)")
    p.add_argument("--chips", type=_positive, default=None,
                   help="accelerators per node (default: 8 per B200 node, 16 per Trainium2 node)")
    p.add_argument("--trainium-share", type=_share, default=0.25, help="share of Trainium nodes (default 0.25)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same run")
    p.add_argument("--start", type=parse_time, default=None,
                   help=f"simulated start (ISO time or epoch); default: now when pushing, {DEFAULT_TRACE_START} for --out")
    p.add_argument("--duration", type=parse_duration, default=None, help="simulated span (default 1h push, 1d --out)")
    p.add_argument("--step", type=parse_duration, default=None, help="sample interval (default 10s push, 60s --out)")
    p.add_argument("--metrics", choices=("health", "all"), default=None,
                   help="metric set (default: all when pushing, health for --out; see docs/simulator.md)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="OTLP/HTTP metrics URL, e.g. http://127.0.0.1:9600/v1/metrics")
    where.add_argument("--out", help="write a trace directory (docs/trace-format.md) instead of pushing")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--realtime", action="store_true", default=None, help="pace steps to the wall clock")
    pace.add_argument("--fast", dest="realtime", action="store_false",
                      help="as fast as possible (default when --start is in the past)")
    p.add_argument("--token", default=os.environ.get("SHOPFLOOR_TOKEN"),
                   help="bearer token for the collector (default: $SHOPFLOOR_TOKEN; keeps it out of `ps`)")
    p.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout per request in seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pushing = args.endpoint is not None
    step = args.step or (10 if pushing else 60)
    duration = args.duration or (3600 if pushing else 86400)
    metric_set = args.metrics or ("all" if pushing else "health")
    if args.start is None:
        start = int(time.time() * 1000) if pushing else parse_time(DEFAULT_TRACE_START)
    else:
        start = args.start
    start -= start % (step * 1000) if pushing else 0
    if duration < step:
        print(f"shopfloor simulate: --duration ({duration}s) is shorter than --step ({step}s)", file=sys.stderr)
        return 2
    try:
        import numpy  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as exc:
        print(f"shopfloor simulate needs numpy and pyarrow (pip install 'shopfloor[collector]'): {exc}", file=sys.stderr)
        return 2
    from agent.simulate.scenario import build_scenario

    sc = build_scenario(args.seed, start, duration, args.nodes, args.chips, args.trainium_share)
    chips = int(sc.fleet.chips.sum())
    if pushing:
        from agent.simulate.push import push

        realtime = args.realtime if args.realtime is not None else start >= time.time() * 1000 - step * 1000
        headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
        print(f"simulating {args.nodes} nodes ({chips} chips) for {duration}s at {step}s steps -> {args.endpoint}"
              f" ({'real time' if realtime else 'as fast as possible'})", file=sys.stderr)
        t0 = time.monotonic()
        try:
            stats = push(sc, step, args.endpoint, metric_set, realtime, headers, args.timeout)
        except KeyboardInterrupt:
            return 130
        except (ConnectionError, RuntimeError) as exc:
            print(f"shopfloor simulate: {exc}", file=sys.stderr)
            return 1
        print(f"sent {stats.points} points in {stats.requests} requests over {stats.steps} steps "
              f"in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        return 0

    from agent.simulate.trace import write_trace

    t0 = time.monotonic()

    def progress(day: int, days: int) -> None:
        print(f"\r{day}/{days} days written ({time.monotonic() - t0:.0f}s)", end="", file=sys.stderr, flush=True)

    try:
        meta = write_trace(args.out, sc, step, metric_set, progress=progress)
    except FileExistsError as exc:
        print(f"shopfloor simulate: {exc}", file=sys.stderr)
        return 2
    failures = sum(1 for f in sc.failures if sc.start_ms <= f.ts < sc.end_ms)
    print(f"\nwrote {args.out}: {meta['nodes']} nodes, {chips} chips, {duration}s at {step}s, "
          f"{failures} failures, {len(sc.storms)} storms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
