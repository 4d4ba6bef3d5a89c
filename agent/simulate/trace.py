"""Write a simulated run as a trace directory (docs/trace-format.md).

Samples stream out one UTC day per Parquet file, a block of steps at a time, so memory stays
bounded by one block whatever the duration. Parquet is written with pyarrow: `name` and `labels`
are dictionary-encoded Arrow columns (a block has a few thousand distinct series, so the writer
stores each label string once per row group instead of once per sample).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from agent.catalog import catalog
from agent.simulate import params as P
from agent.simulate.scenario import Scenario
from agent.simulate.signals import Block, Labeler, Renderer

TRACE_VERSION = 1
SAMPLES_SCHEMA = pa.schema([
    ("ts", pa.int64()),
    ("name", pa.dictionary(pa.int32(), pa.string())),
    ("labels", pa.dictionary(pa.int32(), pa.string())),
    ("value", pa.float64()),
])
# Parquet settings fixed here so two runs write identical bytes. Measured on a 1,000-chip block
# (benchmarks/simulate.py): delta-encoded ts and plain+zstd values write faster and smaller than
# dictionary-encoding every column.
_PARQUET = dict(compression="zstd", compression_level=3, use_dictionary=["name", "labels"],
                column_encoding={"ts": "DELTA_BINARY_PACKED"}, write_statistics=True)
_PARQUET_SMALL = dict(compression="zstd", compression_level=3)


class SeriesIndex:
    """Integer ids for label strings, and each group's ids cached across blocks.

    A group (one metric, one attribute set, the same chips) recurs in every block, so its label
    strings are looked up once and later blocks only concatenate integer arrays."""

    _MAX_GROUPS = 50_000

    def __init__(self, labeler: Labeler):
        self.labeler = labeler
        self.strings: list[str] = []
        self._ids: dict[str, int] = {}
        self._groups: dict[tuple, np.ndarray] = {}

    def _id(self, text: str) -> int:
        i = self._ids.get(text)
        if i is None:
            i = self._ids[text] = len(self.strings)
            self.strings.append(text)
        return i

    def label_ids(self, g) -> np.ndarray:
        if g.per_row is not None:
            return np.array([self._id(self.labeler.label_json(g.otel, g.kind, e, extra))
                             for e, extra in zip(g.ids.tolist(), g.per_row)], dtype=np.int64)
        key = (g.kind, g.extra, g.ids.tobytes())
        ids = self._groups.get(key)
        if ids is None:
            if len(self._groups) >= self._MAX_GROUPS:
                self._groups.clear()
            ids = self._groups[key] = np.array(
                [self._id(self.labeler.label_json(g.otel, g.kind, e, g.extra)) for e in g.ids.tolist()], dtype=np.int64)
        return ids


def block_table(block: Block, index: SeriesIndex) -> pa.Table:
    """One block as rows (ts, name, labels, value), series by series; silent steps dropped."""
    cat = catalog()
    groups = [g for g in block.groups if g.ids.size]
    if not groups:
        return SAMPLES_SCHEMA.empty_table()
    T = block.ts.size
    names = sorted({cat.prom(g.otel) for g in groups})
    name_of = {n: i for i, n in enumerate(names)}
    series_name = np.concatenate([np.full(g.ids.size, name_of[cat.prom(g.otel)], dtype=np.int32) for g in groups])
    series_label = np.concatenate([index.label_ids(g) for g in groups])
    label_ids, label_idx = np.unique(series_label, return_inverse=True)
    flat = np.vstack([g.values for g in groups]).ravel()
    S = flat.size // T
    ts = np.tile(block.ts, S)
    name_rows = np.repeat(series_name, T)
    label_rows = np.repeat(label_idx.astype(np.int32), T)
    keep = ~np.isnan(flat)
    if not keep.all():   # silent chips, XID series before their first XID
        ts, name_rows, label_rows, flat = ts[keep], name_rows[keep], label_rows[keep], flat[keep]
    return pa.table([
        pa.array(ts, pa.int64()),
        pa.DictionaryArray.from_arrays(name_rows, pa.array(names, pa.string())),
        pa.DictionaryArray.from_arrays(label_rows, pa.array([index.strings[i] for i in label_ids.tolist()], pa.string())),
        pa.array(flat, pa.float64()),
    ], schema=SAMPLES_SCHEMA)


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, **_PARQUET_SMALL)


def write_trace(out: str | Path, sc: Scenario, step_s: int, metric_set: str = "health",
                block_hours: float = 3.0, progress=None) -> dict:
    """Write the whole trace; returns meta (also written to meta.json). progress(day, days)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new directory for the trace")
    (out / "samples").mkdir(parents=True, exist_ok=True)
    renderer = Renderer(sc, step_s, metric_set)
    index = SeriesIndex(Labeler(renderer))
    ts_all = renderer.steps()
    block_steps = max(1, int(block_hours * 3600 // step_s))
    metric_names: set[str] = set()
    days = np.unique(ts_all // P.DAY_MS)
    for d_i, day in enumerate(days.tolist()):
        ts_day = ts_all[(ts_all // P.DAY_MS) == day]
        date = np.datetime64(int(day) * P.DAY_MS, "ms").astype("datetime64[D]")
        writer = pq.ParquetWriter(out / "samples" / f"{date}.parquet", SAMPLES_SCHEMA, **_PARQUET)
        try:
            for block in renderer.blocks(ts_day, block_steps, block_seed=int(day)):
                table = block_table(block, index)
                metric_names.update(table.column("name").chunk(0).dictionary.to_pylist() if table.num_rows else [])
                writer.write_table(table, row_group_size=max(table.num_rows, 1))
        finally:
            writer.close()
        if progress:
            progress(d_i + 1, days.size)
    _write_truth(out, sc)
    meta = {
        "version": TRACE_VERSION, "seed": sc.seed, "start_ms": sc.start_ms,
        "duration_s": (sc.end_ms - sc.start_ms) // 1000, "step_s": step_s,
        "nodes": sc.fleet.n_nodes, "chips_per_node": sc.chips_override,
        "trainium_share": sc.trainium_share, "metrics": metric_set,
        "metric_names": sorted(metric_names),
        "regimes": [{"mode": r.mode, "start_ms": r.start_ms, "end_ms": r.end_ms, "factor": r.factor}
                    for r in sc.regimes if r.start_ms < sc.end_ms],
        "generator": "shopfloor simulate",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n")
    return meta


def failures_table(sc: Scenario) -> pa.Table:
    """Failures that happen in the trace, plus later ones whose precursor is already visible."""
    f = sc.fleet
    rows = [fl for fl in sc.failures if sc.start_ms <= fl.ts and
            (fl.ts < sc.end_ms or (fl.precursor_start is not None and fl.precursor_start < sc.end_ms))]
    return pa.table({
        "ts": pa.array([fl.ts for fl in rows], pa.int64()),
        "cluster": pa.array([f.cluster[fl.node] for fl in rows], pa.string()),
        "rack": pa.array([f.rack[fl.node] for fl in rows], pa.string()),
        "node": pa.array([f.node[fl.node] for fl in rows], pa.string()),
        "chip": pa.array([str(int(f.slot_chip[fl.slot])) if fl.slot >= 0 else "" for fl in rows], pa.string()),
        "uuid": pa.array([sc.inc_uuid[fl.inc] if fl.inc >= 0 else "" for fl in rows], pa.string()),
        "mode": pa.array([fl.mode for fl in rows], pa.string()),
        "precursor_start": pa.array([fl.precursor_start for fl in rows], pa.int64()),
        "lemon": pa.array([bool(f.lemon[fl.node]) for fl in rows], pa.bool_()),
    })


def _write_truth(out: Path, sc: Scenario) -> None:
    f = sc.fleet
    _write(pa.table({
        "node": pa.array(f.node, pa.string()), "cluster": pa.array(f.cluster, pa.string()),
        "rack": pa.array(f.rack, pa.string()), "vendor": pa.array(f.vendor, pa.string()),
        "model": pa.array(f.model, pa.string()), "chips": pa.array(f.chips, pa.int64()),
        "lemon": pa.array(f.lemon, pa.bool_()),
    }), out / "nodes.parquet")
    _write(failures_table(sc), out / "failures.parquet")
    keep = (sc.job_start < sc.end_ms) & (sc.job_end > sc.start_ms)
    _write(pa.table({
        "job": pa.array([sc.job_names[j] for j in sc.job_of_row[keep]], pa.string()),
        "node": pa.array([f.node[n] for n in sc.job_node[keep]], pa.string()),
        "start": pa.array(sc.job_start[keep], pa.int64()),
        "end": pa.array(sc.job_end[keep], pa.int64()),
    }), out / "jobs.parquet")
    storms = [s for s in sc.storms if sc.start_ms <= s[0] < sc.end_ms]
    _write(pa.table({
        "ts": pa.array([s[0] for s in storms], pa.int64()),
        "job": pa.array([sc.job_names[s[1]] for s in storms], pa.string()),
        "xid": pa.array([s[2] for s in storms], pa.int64()),
        "nodes": pa.array([[f.node[n] for n in s[3]] for s in storms], pa.list_(pa.string())),
    }), out / "storms.parquet")
