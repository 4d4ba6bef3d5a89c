"""Time from a fatal XID line appearing in the kernel log to the node drained in Slurm.

    .venv/bin/python benchmarks/xid_to_drain.py [--runs 10]

Path measured (node-local, what runs on every GPU node):
    a kmsg-format file (the recorded fixture tests/fixtures/kmsg/kmsg.log, plus appended lines)
    -> `shopfloor health-check --follow` (a separate process: agent/sources/xid.py's event
       thread follows the log, collector/health/xid.py's table judges the code)
    -> `scontrol update NodeName=.. State=DRAIN Reason="shopfloor: ..."` on a real slurmctld
       started on 127.0.0.1 (tests/remediate/slurmlab.py).
t0 is taken just before the XID 79 line is written; t1 when the health-check process reports
that scontrol returned (slurmctld accepted the drain), read from its stdout without polling.
Every run is then checked with `scontrol show node` (State has DRAIN, Reason names XID 79).

Peer, measured in the same run: a bare `scontrol update ... State=DRAIN` from this process (the
floor any Slurm integration pays). The ratio says what detection adds on top of it.
Needs root (mknod for the fake GPU devices) and slurmctld, slurmd, munged, scontrol.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.remediate.slurmlab import slurm_lab  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
XID79 = "4,{seq},{usec},-;NVRM: Xid (PCI:0000:1b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.\n"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args(argv)
    node = "gpu-001"
    work = Path(tempfile.mkdtemp(prefix="xid2drain-"))
    kmsg = work / "kmsg"
    shutil.copy(FIXTURES / "kmsg" / "kmsg.log", kmsg)
    # the fixture's own fatal lines are the node's history: start from a log without them
    kmsg.write_text("".join(ln for ln in kmsg.read_text().splitlines(True) if "Xid" not in ln))
    latencies, floors = [], []
    with slurm_lab([node]) as lab:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shopfloor", "health-check", "--follow", "--no-nvml", "--node", node,
             "--cluster", "bench", "--kmsg", str(kmsg), "--procfs", str(FIXTURES / "procfs")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=lab.env, cwd=ROOT,
            start_new_session=True)
        try:
            line = proc.stdout.readline()
            while not line.startswith("following"):
                if not line:
                    raise RuntimeError("health-check exited before following the log")
                line = proc.stdout.readline()
            seq = 10_000
            for i in range(args.runs):
                seq += 1
                t0 = time.perf_counter()
                with open(kmsg, "a") as f:
                    f.write(XID79.format(seq=seq, usec=seq * 1000))
                line = proc.stdout.readline()
                t1 = time.perf_counter()
                if not line.startswith("done:"):
                    raise RuntimeError(f"unexpected health-check output: {line!r}")
                fields = lab.node_fields(node)
                assert "DRAIN" in fields["State"] and "XID 79" in fields["Reason"], fields
                latencies.append(t1 - t0)
                lab.run("update", f"NodeName={node}", "State=RESUME")
                # peer: the bare scontrol drain, from a fresh process, as any integration does
                t2 = time.perf_counter()
                lab.run("update", f"NodeName={node}", "State=DRAIN", "Reason=peer drain")
                floors.append(time.perf_counter() - t2)
                lab.run("update", f"NodeName={node}", "State=RESUME")
                time.sleep(0.3)   # let the follower go back to sleep between runs
        finally:
            proc.terminate()
            proc.wait(10)
            proc.stdout.close()
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "path": "node-local: kmsg file -> XidSource event thread -> health.xid table -> scontrol drain",
        "runs": len(latencies),
        "xid_to_drain_median_s": round(statistics.median(latencies), 4),
        "xid_to_drain_p95_s": round(pct(latencies, 0.95), 4),
        "xid_to_drain_max_s": round(max(latencies), 4),
        "peer_bare_scontrol_drain_median_s": round(statistics.median(floors), 4),
        "ratio_median_vs_bare_scontrol": round(statistics.median(latencies) / statistics.median(floors), 2),
        "goal_s": 2.0,
        "host": f"{os.cpu_count()} CPUs",
    }
    print(json.dumps(result, indent=2))
    return 0 if result["xid_to_drain_p95_s"] < 2.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
