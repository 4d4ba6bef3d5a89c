"""Benchmark: how fast `shopfloor simulate --out` writes a trace, and how big it is.

    .venv/bin/python benchmarks/simulate.py                      # 1,000 chips, 60 days, 60 s step
    .venv/bin/python benchmarks/simulate.py --days 2 --nodes 16  # a quick look

Runs the real command in a child process and reports wall time, CPU time, peak memory, samples
written, samples/s and bytes on disk (also per sample). The peer, measured in the same run, is
the floor any trace writer pays: re-writing the first day's rows (read back into memory) with the
same Parquet settings. "x floor" says how many times that floor the whole simulation costs, i.e.
what generating the fleet adds on top of just writing its Parquet.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=125)
    p.add_argument("--chips", type=int, default=8)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--step", default="60s")
    p.add_argument("--metrics", default="health", choices=("health", "all"))
    p.add_argument("--dir", help="where to write the trace (default: a temporary directory, removed)")
    args = p.parse_args()

    import pyarrow.parquet as pq

    from agent.simulate.trace import _PARQUET

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="shopfloor-sim-bench-"))
    out = work / "trace"
    cmd = [sys.executable, "-m", "shopfloor", "simulate", "--nodes", str(args.nodes), "--chips", str(args.chips),
           "--duration", f"{args.days}d", "--step", args.step, "--metrics", args.metrics, "--seed", "1",
           "--out", str(out)]
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        files = sorted((out / "samples").glob("*.parquet"))
        samples = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        sample_bytes = sum(f.stat().st_size for f in files)
        total_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())

        # peer: write the first day's rows again, from memory, with the same settings
        day = pq.read_table(files[0])
        t1 = time.perf_counter()
        pq.write_table(day, work / "floor.parquet", row_group_size=max(day.num_rows // 4, 1), **_PARQUET)
        floor_day = time.perf_counter() - t1
        floor_total = floor_day * samples / max(day.num_rows, 1)
        meta = json.loads((out / "meta.json").read_text())
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    chips = args.nodes * args.chips
    print(f"command: {' '.join(cmd[1:])}")
    print(f"fleet: {args.nodes} nodes x {args.chips} chips = {chips} chips, {args.days} days at {args.step}, "
          f"metric set {args.metrics} ({len(meta['metric_names'])} metrics)")
    print(f"wall time: {wall:.1f} s   cpu time: {cpu:.1f} s   peak RSS: {after.ru_maxrss / 1024:.0f} MiB")
    print(f"samples: {samples:,}   samples/s (wall): {samples / wall:,.0f}")
    print(f"bytes on disk: {total_bytes:,} ({sample_bytes / max(samples, 1):.2f} bytes/sample in samples/)")
    print(f"peer (Parquet write floor, same rows, same settings): {floor_total:.1f} s "
          f"-> simulation = {wall / floor_total:.1f}x floor")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
