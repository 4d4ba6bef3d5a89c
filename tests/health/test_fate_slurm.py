"""Job membership for fate-sharing from a real Slurm (the remediation tests' lab: munged,
slurmctld and slurmd on 127.0.0.1), and a storm on a running job's nodes found through it."""

import shutil
import subprocess
import time

import polars as pl
import pytest

from collector.health.fate import expand_hostlist, find_storms, jobs_from_squeue
from tests.remediate.conftest import slurm, slurm_cluster  # noqa: F401 - the shared lab fixtures
from tests.support import require_binary


def test_running_job_nodes_from_squeue_and_a_storm_on_them(slurm):  # noqa: F811
    sbatch, squeue = require_binary("sbatch"), require_binary("squeue")
    scontrol = shutil.which("scontrol")
    assert expand_hostlist("gpu-[001-003]", scontrol, slurm.env) == ["gpu-001", "gpu-002", "gpu-003"]
    out = subprocess.run([sbatch, "-N", "3", "--parsable", "-o", "/dev/null", "--wrap", "sleep 30"], env=slurm.env,
                         capture_output=True, text=True, timeout=20, check=True)
    job = out.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 30
        jobs = pl.DataFrame()
        while time.monotonic() < deadline:
            jobs = jobs_from_squeue(squeue, scontrol, slurm.env)
            if job in jobs["job"].to_list():
                break
            time.sleep(0.5)
        mine = sorted(jobs.filter(pl.col("job") == job)["node"].to_list())
        assert len(mine) == 3 and set(mine) <= set(slurm.nodes)
        # XID 31 on the job's three nodes within seconds, on different racks: one job storm
        ev = pl.DataFrame({"ts": [1000, 2000, 3000], "cluster": ["c"] * 3, "rack": ["r1", "r2", "r3"],
                           "node": mine, "chip": ["0"] * 3, "uuid": ["u1", "u2", "u3"], "xid": [31] * 3,
                           "count": [1] * 3})
        storms, marked = find_storms(ev, jobs)
        assert [(s.key_type, s.key, s.nodes) for s in storms] == [("job", job, tuple(mine))]
        assert marked["in_storm"].all()
    finally:
        subprocess.run([shutil.which("scancel") or "scancel", job], env=slurm.env, timeout=20)
