"""Fate-sharing: the same XID on many nodes of one job (or one rack) within a short window is an
application or fabric event, not many bad chips.

A storm is reported once (a `Storm` record, and a Verdict with source="fate-sharing" on a job or
rack key, action WATCH), and its events are removed before the XID rules and the model see them,
so none of the chips involved is cordoned for it.

Which nodes run which job comes from the trace's jobs.parquet, from the scheduler
(`squeue -h -o '%i %N'`, node lists expanded with `scontrol show hostnames`), or is absent (then
only racks group events).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

import polars as pl

from .verdict import Action, ChipRef, State, Verdict

WINDOW_MS = 5 * 60_000     # events of one storm arrive within a few minutes (the simulator: 60 s)
MIN_NODES = 3              # fewer nodes than this is not a storm: two chips can fail together
# An application fault often ends its job: the XIDs land (and are stamped at the next scrape)
# just after the scheduler's end time. A job still owns its nodes' events this long after it ends.
JOB_GRACE_MS = 10 * 60_000


@dataclass(frozen=True)
class Storm:
    key_type: str            # "job" or "rack"
    key: str
    cluster: str
    xid: int
    start_ms: int
    end_ms: int
    nodes: tuple[str, ...]

    def verdict(self) -> Verdict:
        return Verdict(
            chip=ChipRef(cluster=self.cluster, node=f"{self.key_type}/{self.key}", chip=""),
            state=State.WATCH, action=Action.WATCH,
            reasons=(f"XID {self.xid} on {len(self.nodes)} nodes of {self.key_type} {self.key} within "
                     f"{max(1, (self.end_ms - self.start_ms) // 1000)} s: an application or fabric event, "
                     f"not bad chips (no cordons)",),
            source="fate-sharing", observed_at=self.end_ms / 1000.0,
            job=self.key if self.key_type == "job" else None,
            evidence={"nodes": float(len(self.nodes))})


def _clusters(ev: pl.DataFrame, key: str) -> pl.DataFrame:
    """Group events by (key, xid) into bursts separated by gaps > WINDOW_MS."""
    ev = ev.filter(pl.col(key).is_not_null()).sort(key, "xid", "ts")
    gap = (pl.col("ts") - pl.col("ts").shift(1)).over([key, "xid"])
    ev = ev.with_columns(burst=(gap.is_null() | (gap > WINDOW_MS)).cast(pl.Int64).cum_sum().over([key, "xid"]))
    return ev


def find_storms(events: pl.DataFrame, jobs: pl.DataFrame | None = None) -> tuple[list[Storm], pl.DataFrame]:
    """(storms, the events with a boolean `in_storm` column).

    `events`: ts, cluster, rack, node, chip, uuid, xid, count (features.xid_increments).
    `jobs`: job, node, start, end (ms; end exclusive)."""
    if events.is_empty():
        return [], events.with_columns(in_storm=pl.lit(False))
    ev = events.with_row_index("_i")
    if jobs is not None and not jobs.is_empty():
        j = jobs.select(pl.col("job").cast(pl.String), pl.col("node").cast(pl.String), "start", "end")
        withjob = ev.join(j, on="node", how="inner").filter(
            (pl.col("ts") >= pl.col("start")) & (pl.col("ts") < pl.col("end") + JOB_GRACE_MS))
        # a running job first, else the one that ended last
        withjob = withjob.sort("_i", pl.col("ts") < pl.col("end"), "end", descending=[False, True, True]) \
            .group_by("_i", maintain_order=True).agg(pl.col("job").first())
        ev = ev.join(withjob, on="_i", how="left")
    else:
        ev = ev.with_columns(job=pl.lit(None, pl.String))
    storms: list[Storm] = []
    members: set[int] = set()
    for key_type in ("job", "rack"):
        b = _clusters(ev, key_type)
        agg = b.group_by(key_type, "xid", "burst").agg(
            cluster=pl.col("cluster").first(), start=pl.col("ts").min(), end=pl.col("ts").max(),
            nodes=pl.col("node").unique().sort(), idx=pl.col("_i"), node_of_idx=pl.col("node"))
        agg = agg.filter(pl.col("nodes").list.len() >= MIN_NODES).sort("start")
        for row in agg.iter_rows(named=True):
            new = set(row["idx"]) - members
            if not new:
                continue          # already reported as a job storm
            if key_type == "rack":
                new_nodes = {n for i, n in zip(row["idx"], row["node_of_idx"]) if i in new}
                if len(new_nodes) < MIN_NODES:
                    members |= new   # the stragglers of a job storm on this rack
                    continue
            members |= set(row["idx"])
            storms.append(Storm(key_type, str(row[key_type]), row["cluster"], int(row["xid"]),
                                int(row["start"]), int(row["end"]), tuple(row["nodes"])))
    marked = ev.with_columns(in_storm=pl.col("_i").is_in(sorted(members))).drop("_i", "job")
    return storms, marked


# ---------------------------------------------------------------------------- live job membership
def expand_hostlist(hostlist: str, scontrol: str = "scontrol", env: dict | None = None) -> list[str]:
    """Slurm hostlist ("gpu[01-03,07]") -> names, with Slurm's own expansion (argument list, no shell)."""
    out = subprocess.run([scontrol, "show", "hostnames", hostlist], capture_output=True, text=True,
                         timeout=10, check=True, env=env)
    return [h for h in out.stdout.split() if h]


def jobs_from_squeue(squeue: str = "squeue", scontrol: str = "scontrol", env: dict | None = None) -> pl.DataFrame:
    """Running jobs and their nodes, from `squeue -h -t R -o '%i %N'` (start/end: always, as the
    membership is read at evaluation time)."""
    out = subprocess.run([squeue, "-h", "-t", "R", "-o", "%i %N"], capture_output=True, text=True,
                         timeout=10, check=True, env=env)
    rows = []
    for line in out.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) != 2:
            continue
        for node in expand_hostlist(parts[1].strip(), scontrol, env):
            rows.append((parts[0], node, 0, 1 << 62))
    return pl.DataFrame(rows, schema={"job": pl.String, "node": pl.String, "start": pl.Int64, "end": pl.Int64},
                        orient="row")
