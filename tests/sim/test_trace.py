"""`shopfloor simulate --out DIR`: the trace directory (docs/trace-format.md), reproducibility,
and what the injected faults and storms look like in the samples."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from agent.catalog import catalog
from agent.simulate import params as P
from agent.simulate.cli import main
from agent.simulate.scenario import build_scenario
from agent.simulate.signals import Labeler, Renderer
from agent.simulate.trace import SeriesIndex, block_table

START = 1767225600000  # 2026-01-01T00:00:00Z


def simulate(out, *extra):
    argv = ["--nodes", "6", "--duration", "30h", "--step", "5m", "--seed", "5", "--out", str(out), *extra]
    assert main(argv) == 0
    return out


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_byte_identical_directories(tmp_path):
    a = files(simulate(tmp_path / "a"))
    b = files(simulate(tmp_path / "b"))
    assert sorted(a) == ["failures.parquet", "jobs.parquet", "meta.json", "nodes.parquet",
                         "samples/2026-01-01.parquet", "samples/2026-01-02.parquet", "storms.parquet"]
    assert a == b
    c = files(simulate(tmp_path / "c", "--seed", "6"))
    assert c["samples/2026-01-01.parquet"] != a["samples/2026-01-01.parquet"]


def test_refuses_a_non_empty_directory_and_keeps_it(tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--nodes", "2", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_arguments_get_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["--nodes", "2", "--duration", "six hours", "--out", "x"])
    assert "not a duration" in capsys.readouterr().err


def test_trace_format_matches_the_documented_schema(tmp_path):
    out = simulate(tmp_path / "t", "--metrics", "all")
    meta = json.loads((out / "meta.json").read_text())
    assert {k: meta[k] for k in ("version", "seed", "start_ms", "duration_s", "step_s", "nodes", "chips_per_node")} == \
        {"version": 1, "seed": 5, "start_ms": START, "duration_s": 30 * 3600, "step_s": 300, "nodes": 6,
         "chips_per_node": None}
    nodes = pl.read_parquet(out / "nodes.parquet")
    assert nodes.columns == ["node", "cluster", "rack", "vendor", "model", "chips", "lemon"]
    assert set(zip(nodes["vendor"], nodes["model"], nodes["chips"])) == {("nvidia", "NVIDIA B200", 8), ("aws", "trainium2", 16)}

    schema = pq.read_schema(out / "samples" / "2026-01-01.parquet")
    assert [(f.name, str(f.type)) for f in schema] == [
        ("ts", "int64"), ("name", "dictionary<values=string, indices=int32, ordered=0>"),
        ("labels", "dictionary<values=string, indices=int32, ordered=0>"), ("value", "double")]
    samples = pl.read_parquet(out / "samples" / "*.parquet").with_columns(pl.col("name").cast(pl.Utf8), pl.col("labels").cast(pl.Utf8))
    assert set(samples["name"].unique()) == set(meta["metric_names"])
    assert samples["ts"].min() == START and samples["ts"].max() == START + 30 * 3600_000 - 300_000
    assert ((samples["ts"] - START) % 300_000).max() == 0

    cat = catalog()
    by_prom = {m.prom_name: m for m in cat}
    for name, labels in samples.select("name", "labels").unique().iter_rows():
        metric = by_prom[name]                       # every name is a catalog name
        parsed = json.loads(labels)
        assert labels == json.dumps(parsed, sort_keys=True, separators=(",", ":"))   # canonical
        # the agent's labels: the catalog's, except the static facts hw_gpu_info lacks like the real
        # sources (NVML knows no instance type; neuron-monitor no driver version or PCI bus id)
        optional = {"instance_type", "driver_version", "pci_bus_id"} if metric.name == "hw.gpu.info" else set()
        assert set(parsed) <= set(metric.labels) and set(metric.labels) - set(parsed) <= optional, (name, parsed)
    # counters never go down within a series
    counters = samples.filter(pl.col("name").str.ends_with("_total")).sort("name", "labels", "ts")
    drops = counters.with_columns(pl.col("value").diff().over("name", "labels").alias("d")).filter(pl.col("d") < 0)
    assert drops.height == 0
    # utilization follows the jobs: busy chips work, idle chips do not
    jobs = pl.read_parquet(out / "jobs.parquet")
    assert jobs.columns == ["job", "node", "start", "end"] and jobs.height > 0
    util = samples.filter(pl.col("name") == cat.prom("hw.gpu.utilization")).with_columns(
        pl.col("labels").str.json_path_match("$.node").alias("node"))
    busy = util.join(jobs, on="node").filter((pl.col("ts") >= pl.col("start")) & (pl.col("ts") < pl.col("end")))
    assert busy["value"].mean() > 0.7
    idle = util.join(busy.select("node", "ts", "labels").unique(), on=["node", "ts", "labels"], how="anti")
    assert idle["value"].max() == 0.0


# ------------------------------------------------------------- faults and storms in the samples

@pytest.fixture(scope="module")
def season():
    """90 days of 300 nodes: enough failures and storms to look at (the ground truth only)."""
    return build_scenario(seed=3, start_ms=START, duration_s=90 * 86400, nodes=300, chips=None, trainium_share=0.25)


def render(sc, start, end, step_s, keep):
    """Samples of the window [start, end) that pass the polars filter `keep`, labels parsed.
    Rendered a few hours at a time so memory stays small however long the window."""
    r = Renderer(sc, step_s, "health")
    index = SeriesIndex(Labeler(r))
    ts_all = np.arange(start, end, step_s * 1000, dtype=np.int64)
    parts = []
    for block in r.blocks(ts_all, 24, block_seed=0):
        frame = pl.from_arrow(block_table(block, index)).with_columns(
            pl.col("name").cast(pl.Utf8), pl.col("labels").cast(pl.Utf8))
        series = frame.select("labels").unique().with_columns(   # parse each series' labels once
            pl.col("labels").str.json_path_match("$.uuid").alias("uuid"),
            pl.col("labels").str.json_path_match("$.node").alias("node"),
            pl.col("labels").str.json_path_match("$.xid").alias("xid"))
        parts.append(frame.join(series, on="labels").filter(keep))
    return pl.concat(parts)


def test_hbm_failure_is_preceded_by_corrected_ecc_and_row_remaps(season):
    sc = season
    f = next(f for f in sc.failures if f.mode == "hbm_uncorrectable" and f.precursor_start
             and sc.fleet.vendor[f.node] == "nvidia" and f.precursor_start - 3 * P.DAY_MS > sc.start_ms
             and f.ts < sc.end_ms and f.ts - f.precursor_start < 5 * P.DAY_MS)
    uuid = sc.inc_uuid[f.inc]
    s = render(sc, f.precursor_start - 3 * P.DAY_MS, f.ts + P.HOUR_MS, 3600, pl.col("uuid") == uuid)
    cat = catalog()
    ecc = s.filter((pl.col("name") == cat.prom("hw.gpu.ecc.errors")) & pl.col("labels").str.contains('"type":"corrected"')).sort("ts")
    before = ecc.filter(pl.col("ts") < f.precursor_start)["value"]
    during = ecc.filter((pl.col("ts") >= f.precursor_start) & (pl.col("ts") < f.ts))["value"]
    base_rate = (before.max() - before.min()) / 3
    pre_rate = (during.max() - during.min()) / ((f.ts - f.precursor_start) / P.DAY_MS)
    assert pre_rate > 10 * max(base_rate, P.CORRECTED_ECC_PER_DAY)
    pending = s.filter(pl.col("name") == cat.prom("hw.gpu.row_remap.pending")).sort("ts")
    assert pending.filter(pl.col("ts") < f.precursor_start)["value"].max() == 0
    assert pending.filter(pl.col("ts") < f.ts)["value"].max() == 1
    unc = s.filter((pl.col("name") == cat.prom("hw.gpu.ecc.errors")) & pl.col("labels").str.contains('"type":"uncorrected"')).sort("ts")
    assert unc.filter(pl.col("ts") < f.ts)["value"].max() < unc["value"].max()
    xids = set(s.filter(pl.col("name") == cat.prom("hw.gpu.xid.errors"))["xid"].to_list())
    assert xids & {"48", "94", "95"} and "63" in xids


def test_off_bus_chip_logs_xid_79_and_goes_silent(season):
    sc = season
    f = next(f for f in sc.failures if f.mode == "off_bus" and sc.fleet.vendor[f.node] == "nvidia"
             and sc.start_ms + P.HOUR_MS < f.ts < sc.end_ms - 2 * P.HOUR_MS)
    uuid = sc.inc_uuid[f.inc]
    s = render(sc, f.ts - P.HOUR_MS, f.ts + P.HOUR_MS, 300, pl.col("uuid") == uuid)
    cat = catalog()
    util = s.filter(pl.col("name") == cat.prom("hw.gpu.utilization"))
    assert util["ts"].max() < f.ts and util["ts"].min() == f.ts - P.HOUR_MS     # silent from the failure on
    xid79 = s.filter((pl.col("name") == cat.prom("hw.gpu.xid.errors")) & (pl.col("xid") == "79"))
    assert xid79["ts"].min() >= f.ts and xid79["ts"].max() == f.ts + P.HOUR_MS - 300_000   # the kernel log keeps it


def test_storms_hit_most_of_a_job_without_any_bad_chip(season):
    sc = season
    storms = [s for s in sc.storms if sc.start_ms < s[0] < sc.end_ms - P.HOUR_MS]
    assert len(storms) >= 5
    for ts, job, xid, hit in storms:
        job_nodes = set(sc.job_node[sc.job_of_row == job].tolist())
        assert set(hit) <= job_nodes and len(hit) >= 3 and len(hit) >= 0.6 * len(job_nodes) - 1e-9
        assert xid in P.STORM_XIDS
        # not caused by bad chips: at most a chance failure on one of the many nodes it hits
        near = {f.node for f in sc.failures if f.node in hit and abs(f.ts - ts) < P.HOUR_MS}
        assert len(near) <= 1 < len(hit), "a storm is not a chip failure"
    ts, job, xid, hit = storms[0]
    logged = render(sc, ts - 600_000, ts + 600_000, 60,
                    (pl.col("name") == catalog().prom("hw.gpu.xid.errors")) & (pl.col("xid") == str(xid)))
    names = [sc.fleet.node[n] for n in hit]
    assert set(logged["node"].unique()) == set(names)
    first = logged.group_by("node").agg(pl.col("ts").min())["ts"]
    assert first.min() >= ts and first.max() <= ts + P.STORM_SPREAD_MS + 60_000


def test_ground_truth_tables_match_the_samples(tmp_path):
    """failures/storms/jobs have the documented columns, and every failure names a chip (uuid)
    and node that really report in the samples."""
    out = tmp_path / "t"
    assert main(["--nodes", "60", "--duration", "30d", "--step", "6h", "--seed", "2", "--out", str(out)]) == 0
    failures = pl.read_parquet(out / "failures.parquet")
    assert failures.schema == pl.Schema({"ts": pl.Int64, "cluster": pl.Utf8, "rack": pl.Utf8, "node": pl.Utf8,
                                         "chip": pl.Utf8, "uuid": pl.Utf8, "mode": pl.Utf8,
                                         "precursor_start": pl.Int64, "lemon": pl.Boolean})
    assert failures.height >= 3 and set(failures["mode"]) <= set(P.FAILURE_MODES)
    storms = pl.read_parquet(out / "storms.parquet")
    assert storms.schema == pl.Schema({"ts": pl.Int64, "job": pl.Utf8, "xid": pl.Int64, "nodes": pl.List(pl.Utf8)})
    samples = pl.read_parquet(out / "samples" / "*.parquet").with_columns(pl.col("labels").cast(pl.Utf8))
    series = samples.select("labels").unique().with_columns(
        pl.col("labels").str.json_path_match("$.uuid").alias("uuid"),
        pl.col("labels").str.json_path_match("$.node").alias("node"),
        pl.col("labels").str.json_path_match("$.chip").alias("chip"))
    known_uuids = set(series["uuid"].drop_nulls())
    known_chips = set(zip(series["node"], series["chip"]))
    nodes = pl.read_parquet(out / "nodes.parquet")
    place = {n: (c, r, lemon) for n, c, r, lemon in nodes.select("node", "cluster", "rack", "lemon").iter_rows()}
    for row in failures.iter_rows(named=True):
        assert place[row["node"]] == (row["cluster"], row["rack"], row["lemon"])
        if row["mode"] == "nic":
            assert row["chip"] == "" and row["uuid"] == ""
        else:
            assert row["uuid"] in known_uuids and (row["node"], row["chip"]) in known_chips
        if row["precursor_start"] is not None:
            assert row["precursor_start"] < row["ts"]
