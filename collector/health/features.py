"""Feature extraction: the one layer that reads telemetry for the health rules and the risk model.

It works identically on a simulator trace directory (docs/trace-format.md) and on the collector's
DuckDB store, so the backtest runs the code the live service runs:

1. `series_hours_*`: one DuckDB aggregate per source turns raw samples into one row per series and
   hour (first/last value and time, min, max, sum, count). Only the metrics the signals use are
   read. The SQL is the same for both sources; only the FROM clause differs.
2. `rollup`: maps each series to a chip (cluster, node, chip, uuid) or a node, and to a *signal*
   (SIGNALS below: a catalog metric, a label filter and how to reduce it), turning counters into
   per-hour increases (resets handled) and reducing gauges. A small `carry` table (each counter
   series' last value) links consecutive chunks, so a long trace is read a day at a time and the
   live service a few hours at a time, with the same result.
3. `xid_increments`: exact XID occurrences (time, chip, code, count) from the XID counters'
   samples (a per-series lag, with a carry between chunks too). Fate-sharing needs their exact time.
4. `features`: a dense chip x hour grid with rolling windows (1 h, 6 h, 24 h, 7-day baseline)
   computed with cumulative sums per chip; every row is "what we knew at the end of that hour".

Everything is vectorised (DuckDB group-bys, polars expressions over the whole grid); nothing loops
over samples in Python. Metric names come from the catalog.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import duckdb
import polars as pl

from agent.catalog import catalog

HOUR_MS = 3_600_000
CHIP_KEY = ["cluster", "node", "chip", "uuid"]
NODE_KEY = ["cluster", "node"]
# Labels the signals and rules look at (absent -> null).
LABELS = ["cluster", "node", "rack", "chip", "uuid", "vendor", "model", "type", "memory", "scope",
          "link", "reason", "sensor", "threshold", "device", "port", "counter", "cause", "xid"]


@dataclass(frozen=True)
class Signal:
    """One per-hour value per chip (or node) derived from one catalog metric."""

    name: str                   # column in the hourly table
    metric: str                 # OTel name in agent/catalog.yaml
    # inc: counter increase, summed over series; max / min: of the values; mean: the largest
    # series mean; minmax: the smallest per-series max (0 = some series was 0 all hour: a port
    # down); flap: 1 when some series was both 0 and non-zero within the hour
    agg: str
    where: tuple[tuple[str, tuple[str, ...]], ...] = ()   # label -> allowed values ("" = absent)
    level: str = "chip"         # chip | node


def _w(**kw: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple(kw.items())


SIGNALS: tuple[Signal, ...] = (
    # ECC: lifetime ("aggregate") counters are preferred; volatile ones are the fallback.
    Signal("ecc_corr_agg", "hw.gpu.ecc.errors", "inc", _w(type=("corrected",), memory=("device", "hbm", ""), scope=("aggregate", ""))),
    Signal("ecc_corr_vol", "hw.gpu.ecc.errors", "inc", _w(type=("corrected",), memory=("device", "hbm", ""), scope=("volatile",))),
    Signal("ecc_uncorr_agg", "hw.gpu.ecc.errors", "inc", _w(type=("uncorrected",), memory=("device", "hbm", ""), scope=("aggregate", ""))),
    Signal("ecc_uncorr_vol", "hw.gpu.ecc.errors", "inc", _w(type=("uncorrected",), memory=("device", "hbm", ""), scope=("volatile",))),
    Signal("sram_corr_agg", "hw.gpu.ecc.errors", "inc", _w(type=("corrected",), memory=("sram",), scope=("aggregate", ""))),
    Signal("sram_corr_vol", "hw.gpu.ecc.errors", "inc", _w(type=("corrected",), memory=("sram",), scope=("volatile",))),
    Signal("sram_uncorr_agg", "hw.gpu.ecc.errors", "inc", _w(type=("uncorrected",), memory=("sram",), scope=("aggregate", ""))),
    Signal("sram_uncorr_vol", "hw.gpu.ecc.errors", "inc", _w(type=("uncorrected",), memory=("sram",), scope=("volatile",))),
    Signal("remap_uncorr", "hw.gpu.row_remap.rows", "inc", _w(type=("uncorrectable",))),
    Signal("remap_corr", "hw.gpu.row_remap.rows", "inc", _w(type=("correctable",))),
    Signal("remap_pending", "hw.gpu.row_remap.pending", "max"),
    Signal("remap_failure", "hw.gpu.row_remap.failure", "max"),
    Signal("retired_sbe", "hw.gpu.retired_pages", "max", _w(cause=("single_bit",))),
    Signal("retired_dbe", "hw.gpu.retired_pages", "max", _w(cause=("double_bit",))),
    Signal("retired_pending", "hw.gpu.retired_pages.pending", "max"),
    Signal("pcie_replays", "hw.gpu.pcie.replays", "inc"),
    Signal("nvlink_errors", "hw.gpu.nvlink.errors", "inc"),
    Signal("nvlink_up_min", "hw.gpu.nvlink.up", "min"),
    Signal("recovery_action", "hw.gpu.recovery_action", "max"),
    Signal("temp_max", "hw.temperature", "max", _w(sensor=("gpu", ""))),
    Signal("temp_mean", "hw.temperature", "mean", _w(sensor=("gpu", ""))),
    Signal("mem_temp_max", "hw.temperature", "max", _w(sensor=("memory",))),
    Signal("temp_slowdown", "hw.temperature.limit", "min", _w(sensor=("gpu", ""), threshold=("slowdown",))),
    Signal("throttle_thermal", "hw.gpu.clock.event.active", "mean", _w(reason=("hw_thermal", "sw_thermal", "hw_slowdown"))),
    Signal("neuron_hw_errors", "hw.neuron.execution.errors", "inc", _w(type=("hardware",))),
    # node level (EFA ports)
    Signal("net_up_min", "hw.network.up", "min", level="node"),
    Signal("net_up_max", "hw.network.up", "minmax", level="node"),
    Signal("net_flap", "hw.network.up", "flap", level="node"),
    Signal("efa_retrans", "hw.efa.port.stat", "inc", _w(counter=("retrans_pkts", "retrans_timeout_events")), level="node"),
    Signal("efa_unresponsive", "hw.efa.port.stat", "inc",
           _w(counter=("unresponsive_remote_events", "impaired_remote_conn_events")), level="node"),
)
XID_METRIC = "hw.gpu.xid.errors"
# Metrics whose series appear only at their first event (the agent creates an XID counter at the
# first XID of a code): a series first seen after the start of the data counts up from zero.
FROM_ZERO = {XID_METRIC}


def metric_names() -> list[str]:
    """Prometheus names of every metric the health layer reads."""
    cat = catalog()
    return sorted({cat.prom(s.metric) for s in SIGNALS} | {cat.prom(XID_METRIC)})


# ---------------------------------------------------------------------------- step 1: SQL
_AGG = """
SELECT hash(name, labels) AS key, any_value(name) AS name, any_value(labels) AS labels, ts // {hour} AS hour,
       min(ts) AS first_ts, arg_min(value, ts) AS first,
       max(ts) AS last_ts, arg_max(value, ts) AS last,
       min(value) AS vmin, max(value) AS vmax, sum(value) AS vsum, count(*) AS n
FROM ({src}) WHERE value IS NOT NULL AND prune_hour BETWEEN ? AND ? AND ts >= ? AND ts < ?
  AND name IN (SELECT unnest(?::VARCHAR[]))
GROUP BY key, hour
"""
_XID_ROWS = """
SELECT hash(name, labels) AS key, name, labels, ts, value FROM ({src})
WHERE value IS NOT NULL AND prune_hour BETWEEN ? AND ? AND ts >= ? AND ts < ? AND name = ?
"""


def _trace_src(files: list[str]) -> str:
    quoted = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    return f"SELECT ts, ts // {HOUR_MS} AS prune_hour, name, labels, value FROM read_parquet([{quoted}])"


# The store keeps label sets in `series` (a MAP); to_json gives the same JSON-object form as a trace.
# prune_hour: the store's compacted samples prune row groups on their hour column, not on ts
# (collector.store.core), so every query here filters on both.
_STORE_SRC = ("SELECT s.ts, s.hour AS prune_hour, se.metric AS name, to_json(se.labels) AS labels, s.value "
              "FROM samples_by_hour s JOIN series se ON se.id = s.series_id")


_FRAME_SRC = f"SELECT ts, ts // {HOUR_MS} AS prune_hour, name, labels, value FROM frame_samples"


def _window(start_ms: int, end_ms: int) -> list[int]:
    """Parameters of `prune_hour BETWEEN ? AND ? AND ts >= ? AND ts < ?`."""
    return [start_ms // HOUR_MS, (end_ms - 1) // HOUR_MS, start_ms, end_ms]


def _query(con, sql: str, params: list) -> pl.DataFrame:
    return con.sql(sql, params=params).pl()


def series_hours(con: duckdb.DuckDBPyConnection, src: str, start_ms: int, end_ms: int) -> pl.DataFrame:
    """Per series and hour aggregates of the health metrics with start_ms <= ts < end_ms."""
    return _query(con, _AGG.format(hour=HOUR_MS, src=src), _window(start_ms, end_ms) + [metric_names()])


def xid_rows(con: duckdb.DuckDBPyConnection, src: str, start_ms: int, end_ms: int) -> pl.DataFrame:
    return _query(con, _XID_ROWS.format(src=src), _window(start_ms, end_ms) + [catalog().prom(XID_METRIC)])


def _empty_xcarry() -> pl.DataFrame:
    return pl.DataFrame(schema={"key": pl.UInt64, "x_last": pl.Float64})


def xid_increments(raw: pl.DataFrame, carry: pl.DataFrame | None, data_start_ms: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(events, new carry) from raw XID counter samples of one chunk.

    Events: ts, chip labels, xid (int), count. The increase of a sample is its value minus the
    series' previous value (from this chunk, else from `carry`); a counter reset counts from zero;
    a series never seen before that first appears after `data_start_ms` counts from zero (the
    agent creates an XID counter at that code's first XID)."""
    carry = _empty_xcarry() if carry is None else carry
    if raw.is_empty():
        return _empty_events(), carry
    raw = raw.with_columns(pl.col("name").cast(pl.String), pl.col("labels").cast(pl.String)).sort("key", "ts")
    raw = raw.join(carry, on="key", how="left")
    prev = pl.coalesce(pl.col("value").shift(1).over("key"), pl.col("x_last"))
    inc = (pl.when(prev.is_null())
           .then(pl.when(pl.col("ts") > data_start_ms).then(pl.col("value")).otherwise(0.0))
           .when(pl.col("value") >= prev).then(pl.col("value") - prev)
           .otherwise(pl.col("value")))          # counter reset: the new value is the increase
    ev = raw.with_columns(count=inc).filter(pl.col("count") > 0)
    new_carry = pl.concat([carry, raw.group_by("key").agg(x_last=pl.col("value").last())]) \
        .group_by("key").agg(pl.col("x_last").last())
    if ev.is_empty():
        return _empty_events(), new_carry
    ev = _with_labels(ev)
    ev = ev.select("ts", "cluster", "rack", "node", "chip", "uuid",
                   pl.col("xid").cast(pl.Int64, strict=False).fill_null(-1).alias("xid"),
                   pl.col("count").cast(pl.Int64)).sort("ts")
    return ev, new_carry


def _empty_events() -> pl.DataFrame:
    return pl.DataFrame(schema={"ts": pl.Int64, "cluster": pl.String, "rack": pl.String, "node": pl.String,
                                "chip": pl.String, "uuid": pl.String, "xid": pl.Int64, "count": pl.Int64})


def _with_labels(df: pl.DataFrame) -> pl.DataFrame:
    """Decode the JSON label column once per distinct label set, then join it back."""
    uniq = df.select("labels").unique()
    dtype = pl.Struct({k: pl.String for k in LABELS})
    parsed = uniq.with_columns(pl.col("labels").str.json_decode(dtype).alias("_l")).unnest("_l")
    return df.join(parsed, on="labels", how="left")


# ---------------------------------------------------------------------------- sources
class TraceSource:
    """Reads a simulator trace directory; a chunk reads only the files whose times overlap it
    (from the Parquet footers' statistics), so a long trace is read once, a day at a time."""

    def __init__(self, trace_dir: str):
        import pyarrow.parquet as pq

        self.dir = trace_dir
        files = sorted(glob.glob(os.path.join(trace_dir, "samples", "*.parquet")))
        if not files:
            raise FileNotFoundError(f"{trace_dir}: no samples/*.parquet (not a trace directory?)")
        self.files: list[tuple[str, int, int]] = []
        for f in files:
            md = pq.ParquetFile(f).metadata
            col = md.schema.to_arrow_schema().get_field_index("ts")
            lo, hi = None, None
            for i in range(md.num_row_groups):
                st = md.row_group(i).column(col).statistics
                if st is None or not st.has_min_max:
                    lo, hi = -(1 << 62), 1 << 62
                    break
                lo = st.min if lo is None else min(lo, st.min)
                hi = st.max if hi is None else max(hi, st.max)
            if lo is not None:
                self.files.append((f, int(lo), int(hi)))
        self.con = duckdb.connect()

    def _src(self, start_ms: int, end_ms: int) -> str | None:
        fs = [f for f, lo, hi in self.files if hi >= start_ms and lo < end_ms]
        return _trace_src(fs) if fs else None

    def series_hours(self, start_ms: int, end_ms: int) -> pl.DataFrame:
        src = self._src(start_ms, end_ms)
        return series_hours(self.con, src, start_ms, end_ms) if src else _empty_series_hours()

    def xid_rows(self, start_ms: int, end_ms: int) -> pl.DataFrame:
        src = self._src(start_ms, end_ms)
        return xid_rows(self.con, src, start_ms, end_ms) if src else _empty_xid_rows()

    def node_samples(self, cluster: str, node: str, start_ms: int, end_ms: int) -> pl.DataFrame:
        """Raw samples (ts, name, labels, value) of one node's health metrics in [start_ms, end_ms)."""
        src = self._src(start_ms, end_ms)
        if src is None:
            return _empty_samples()
        sql = (f"SELECT ts, name, labels, value FROM ({src}) WHERE ts >= ? AND ts < ? "
               "AND name IN (SELECT unnest(?::VARCHAR[])) "
               "AND json_extract_string(labels, '$.node') = ? AND json_extract_string(labels, '$.cluster') = ?")
        return _query(self.con, sql, [start_ms, end_ms, metric_names(), node, cluster])

    def time_range(self) -> tuple[int, int]:
        if not self.files:
            raise ValueError(f"{self.dir}: the trace has no samples")
        return min(lo for _, lo, _ in self.files), max(hi for _, _, hi in self.files)


def _empty_series_hours() -> pl.DataFrame:
    return pl.DataFrame(schema={"key": pl.UInt64, "name": pl.String, "labels": pl.String, "hour": pl.Int64, "first_ts": pl.Int64,
                                "first": pl.Float64, "last_ts": pl.Int64, "last": pl.Float64, "vmin": pl.Float64,
                                "vmax": pl.Float64, "vsum": pl.Float64, "n": pl.Int64})


def _empty_xid_rows() -> pl.DataFrame:
    return pl.DataFrame(schema={"key": pl.UInt64, "name": pl.String, "labels": pl.String, "ts": pl.Int64, "value": pl.Float64})


def _empty_samples() -> pl.DataFrame:
    return pl.DataFrame(schema={"ts": pl.Int64, "name": pl.String, "labels": pl.String, "value": pl.Float64})


class FrameSource:
    """Raw samples held in memory (ts, name, labels, value), read through the same SQL as the
    other sources: the backtest replays a node's partial hours with it."""

    def __init__(self, samples: pl.DataFrame):
        self.con = duckdb.connect()
        self.con.register("frame_samples", samples.to_arrow())

    def series_hours(self, start_ms: int, end_ms: int) -> pl.DataFrame:
        return series_hours(self.con, _FRAME_SRC, start_ms, end_ms)

    def xid_rows(self, start_ms: int, end_ms: int) -> pl.DataFrame:
        return xid_rows(self.con, _FRAME_SRC, start_ms, end_ms)


class StoreSource:
    """Reads the collector's store (collector.store.core.Store)."""

    def __init__(self, store):
        self.store = store

    def series_hours(self, start_ms: int, end_ms: int) -> pl.DataFrame:
        return series_hours(self.store.cursor(), _STORE_SRC, start_ms, end_ms)

    def xid_rows(self, start_ms: int, end_ms: int) -> pl.DataFrame:
        return xid_rows(self.store.cursor(), _STORE_SRC, start_ms, end_ms)

    def time_range(self) -> tuple[int, int] | None:
        lo, hi = self.store.cursor().execute("SELECT min(ts), max(ts) FROM samples").fetchall()[0]
        return None if lo is None else (int(lo), int(hi))


# ---------------------------------------------------------------------------- step 2: rollup
def _signal_of(df: pl.DataFrame) -> pl.DataFrame:
    """Add `signal` (null when the series feeds none) to a frame with name + label columns."""
    cat = catalog()
    parts = []
    for s in SIGNALS:
        cond = pl.col("name") == cat.prom(s.metric)
        for label, allowed in s.where:
            values = [v for v in allowed if v]
            c = pl.col(label).is_in(values)
            if "" in allowed:
                c = c | pl.col(label).is_null() | (pl.col(label) == "")
            cond = cond & c.fill_null(False)
        parts.append((s.name, cond))
    # a series may feed several signals (temp_max and temp_mean): explode over the matches
    frames = [df.filter(cond).with_columns(signal=pl.lit(name)) for name, cond in parts]
    return pl.concat(frames) if frames else df.clear().with_columns(signal=pl.lit(None, pl.String))


_SIGNAL = {s.name: s for s in SIGNALS}


@dataclass
class Rollup:
    """Hourly per-chip and per-node signals, plus presence."""

    chips: pl.DataFrame     # cluster node chip uuid rack vendor model hour last_ts <signal columns>
    nodes: pl.DataFrame     # cluster node hour node_last_ts <node signal columns>
    carry: pl.DataFrame     # name labels c_hour c_last  (each counter series' last value)
    xcarry: pl.DataFrame | None = None   # each XID counter series' last value


def _empty_carry() -> pl.DataFrame:
    return pl.DataFrame(schema={"key": pl.UInt64, "c_hour": pl.Int64, "c_last": pl.Float64})


def rollup(sh: pl.DataFrame, carry: pl.DataFrame | None = None) -> Rollup:
    """Turn one chunk of series-hour rows into per-chip / per-node hourly signals.

    `carry` holds each counter series' last value before this chunk; a counter series without
    carry counts its increase from its first sample in the chunk."""
    carry = _empty_carry() if carry is None else carry
    # labels are decoded and signals assigned once per distinct series (`key`, a hash of name and
    # labels computed by DuckDB), then joined back by that integer
    series = _with_labels(sh.select("key", pl.col("name").cast(pl.String), pl.col("labels").cast(pl.String))
                          .unique(subset="key")).rename({"key": "sid"})
    # strings are grouped once per series; the hot group-bys below run on integer ids
    series = series.with_columns(
        ent=pl.struct(CHIP_KEY).rank("dense").cast(pl.Int64),
        nent=pl.struct(NODE_KEY).rank("dense").cast(pl.Int64))
    is_chip = pl.col("chip").is_not_null() & (pl.col("chip") != "")
    ents = series.filter(is_chip).group_by("ent").agg(
        *[pl.col(c).first() for c in CHIP_KEY], *[pl.col(c).drop_nulls().last() for c in ("rack", "vendor", "model")])
    nents = series.group_by("nent").agg(*[pl.col(c).first() for c in NODE_KEY], pl.col("rack").drop_nulls().last())
    ids = series.select("sid", pl.when(is_chip).then(pl.col("ent")).alias("ent"), "nent")
    sh = sh.drop("name", "labels").rename({"key": "sid"}).with_columns(pl.col("hour").cast(pl.Int64))
    shk = sh.select("sid", "hour", "last_ts").join(ids, on="sid")
    # presence: newest sample time of each chip and each node per hour (any health metric)
    presence = (shk.filter(pl.col("ent").is_not_null()).group_by("ent", "hour").agg(pl.col("last_ts").max())
                .join(ents, on="ent"))
    node_presence = (shk.group_by("nent", "hour").agg(node_last_ts=pl.col("last_ts").max())
                     .join(nents, on="nent"))
    names = [s.name for s in SIGNALS]
    code = {n: i for i, n in enumerate(names)}
    sig = _signal_of(series).select("sid", sigc=pl.col("signal").replace_strict(code, return_dtype=pl.Int32))
    tagged = sh.join(sig, on="sid", how="inner").join(ids, on="sid")

    def codes(*aggs: str) -> list[int]:
        return [code[n] for n, s in _SIGNAL.items() if s.agg in aggs]

    is_inc = pl.col("sigc").is_in(codes("inc"))
    # counter increases per series-hour: sort per series, compare with the previous hour's last
    inc_rows = tagged.filter(is_inc).sort("sid", "sigc", "hour")
    inc_rows = inc_rows.join(carry.rename({"key": "sid"}), on="sid", how="left")
    prev_last = pl.col("last").shift(1).over(["sid", "sigc"])
    prev = pl.coalesce(prev_last, pl.col("c_last"))
    within = pl.col("last") - pl.col("first")          # no earlier value: what changed inside the hour
    inc_rows = inc_rows.with_columns(
        v=pl.when(prev.is_null()).then(within)
        .when(pl.col("last") >= prev).then(pl.col("last") - prev)
        .otherwise(pl.col("last")))                    # reset: counted from zero
    new_carry = pl.concat([
        carry,
        inc_rows.group_by(key=pl.col("sid")).agg(c_hour=pl.col("hour").max(), c_last=pl.col("last").sort_by("hour").last()),
    ]).group_by("key").agg(pl.col("c_last").sort_by("c_hour").last(), pl.col("c_hour").max())
    new_carry = new_carry.select(_empty_carry().columns)
    gauge_rows = tagged.filter(~is_inc).with_columns(
        v=pl.when(pl.col("sigc").is_in(codes("max", "minmax"))).then(pl.col("vmax"))
        .when(pl.col("sigc").is_in(codes("min"))).then(pl.col("vmin"))
        .when(pl.col("sigc").is_in(codes("flap"))).then(((pl.col("vmin") == 0) & (pl.col("vmax") != 0)).cast(pl.Float64))
        .otherwise(pl.col("vsum") / pl.col("n")))
    cols = ["ent", "nent", "hour", "sigc", "v"]
    allv = pl.concat([inc_rows.select(cols), gauge_rows.select(cols)])
    # reduce over the series of a chip (or node): counters add up, min-signals take the min,
    # the others the max
    red = (pl.when(pl.col("sigc").first().is_in(codes("inc"))).then(pl.col("v").sum())
           .when(pl.col("sigc").first().is_in(codes("min", "minmax"))).then(pl.col("v").min())
           .otherwise(pl.col("v").max()))
    chip_codes = [code[n] for n, s in _SIGNAL.items() if s.level == "chip"]
    chip_long = allv.filter(pl.col("sigc").is_in(chip_codes)).group_by("ent", "hour", "sigc").agg(val=red)
    node_long = allv.filter(~pl.col("sigc").is_in(chip_codes)).group_by("nent", "hour", "sigc").agg(val=red)
    chips = _wide(presence, chip_long, "ent", [n for n, s in _SIGNAL.items() if s.level == "chip"], names)
    nodes = _wide(node_presence, node_long, "nent", [n for n, s in _SIGNAL.items() if s.level == "node"], names)
    return Rollup(chips.drop("ent"), nodes.drop("nent"), new_carry)


def _wide(base: pl.DataFrame, long: pl.DataFrame, ent: str, signals: list[str], names: list[str]) -> pl.DataFrame:
    """One column per signal, joined onto the presence table."""
    if not long.is_empty():
        long = long.with_columns(signal=pl.col("sigc").replace_strict(dict(enumerate(names)), return_dtype=pl.String))
        piv = long.pivot(on="signal", index=[ent, "hour"], values="val", aggregate_function="first")
        base = base.join(piv, on=[ent, "hour"], how="left")
    for s in signals:
        if s not in base.columns:
            base = base.with_columns(pl.lit(None, pl.Float64).alias(s))
    return base



def concat_rollups(parts: list[Rollup]) -> Rollup:
    chips = pl.concat([p.chips for p in parts], how="diagonal_relaxed")
    nodes = pl.concat([p.nodes for p in parts], how="diagonal_relaxed")
    return Rollup(chips, nodes, parts[-1].carry if parts else _empty_carry())


def read_hours(source, start_ms: int, end_ms: int, chunk_hours: int = 24, carry: pl.DataFrame | None = None,
               xcarry: pl.DataFrame | None = None, data_start_ms: int | None = None) -> tuple[Rollup, pl.DataFrame]:
    """Roll up [start_ms, end_ms) chunk by chunk (aligned to hours): (rollup, XID events).

    `data_start_ms`: where the data begins (an XID series first seen later is new); default start_ms."""
    start_ms = start_ms - start_ms % HOUR_MS
    data_start_ms = start_ms if data_start_ms is None else data_start_ms
    parts: list[Rollup] = []
    events: list[pl.DataFrame] = []
    t = start_ms
    while t < end_ms:
        t2 = min(end_ms, t + chunk_hours * HOUR_MS)
        r = rollup(source.series_hours(t, t2), carry)
        ev, xcarry = xid_increments(source.xid_rows(t, t2), xcarry, data_start_ms)
        carry = r.carry
        parts.append(r)
        events.append(ev)
        t = t2
    if not parts:
        return Rollup(pl.DataFrame(), pl.DataFrame(), _empty_carry()), _empty_events()
    r = concat_rollups(parts)
    r.xcarry = xcarry
    return r, pl.concat(events)


# ---------------------------------------------------------------------------- step 4: features
BASELINE_H = 24 * 7          # the "normal" rate: the 7 days before the last 24 h
GAP_MIN_HOURS_24H = 12       # hours of temperature behind a 24-h gap to the node (a day's half)
GAP_MIN_HOURS_BASE = 72      # and behind its baseline: a chip new to the node has none yet

# Feature columns of the model (documented in docs/health.md); rules read some of them too.
MODEL_FEATURES = [
    "ecc_corr_1h", "ecc_corr_24h", "ecc_corr_base", "ecc_corr_ratio", "ecc_corr_growth",
    "ecc_uncorr_7d", "sram_corr_24h", "remap_corr_7d", "remap_pending", "retired_total",
    "pcie_1h", "pcie_24h", "pcie_base", "pcie_ratio",
    "nvlink_1h", "nvlink_24h", "nvlink_ratio",
    "temp_max_1h", "temp_max_24h", "temp_mean_24h", "temp_drift", "temp_max_drift", "thermal_margin",
    "mem_temp_max_24h",
    "throttle_6h", "throttle_24h",
    "neuron_hw_1h", "neuron_hw_24h", "xid_7d", "xid_30d",
    "efa_retrans_ratio", "efa_unresp_1h", "efa_unresp_24h", "efa_flap_hours_6h",
    "is_trainium",
]


def _sum(col: str) -> pl.Expr:
    """Sum that stays null when every value is null (polars' sum would say 0: "no counter" is
    not "no errors", and the ECC fallback from aggregate to volatile counters depends on it)."""
    return pl.when(pl.col(col).count() > 0).then(pl.col(col).sum()).alias(col)


def _roll(col: str, hours: int) -> pl.Expr:
    """Sum of the last `hours` hourly values per chip (nulls as 0), via a cumulative sum."""
    cum = pl.col(col).fill_null(0).cum_sum().over("eid")
    return cum - cum.shift(hours).over("eid").fill_null(0)


def _count(col: str, hours: int) -> pl.Expr:
    cum = pl.col(col).is_not_null().cast(pl.Int64).cum_sum().over("eid")
    return cum - cum.shift(hours).over("eid").fill_null(0)


def features(r: Rollup, events: pl.DataFrame | None = None, end_hour: int | None = None,
             now_ms: int | None = None) -> pl.DataFrame:
    """Dense chip x hour grid of features; the row for hour h is what was known at (h+1)*1h.

    Chips are (cluster, node, chip, uuid): a replaced chip (new uuid) starts afresh and the old
    one's rows stop where the new one's begin. `end_hour` extends the grid to that hour (a chip
    silent since then is still evaluated: that is how "fallen off the bus" shows). `now_ms` is
    the evaluation time of the live service when it falls inside the last, partial hour."""
    chips = r.chips
    if chips.is_empty():
        return pl.DataFrame()
    for s in (n for n, sig in _SIGNAL.items() if sig.level == "chip"):
        if s not in chips.columns:
            chips = chips.with_columns(pl.lit(None, pl.Float64).alias(s))
    chips = chips.group_by(CHIP_KEY + ["hour"]).agg(
        pl.col("last_ts").max(), pl.col("rack", "vendor", "model").drop_nulls().last(),
        *[(_sum(s) if _SIGNAL[s].agg == "inc" else pl.col(s).min() if _SIGNAL[s].agg == "min"
           else pl.col(s).max()) for s in _SIGNAL if _SIGNAL[s].level == "chip"])
    last_hour = int(chips["hour"].max()) if end_hour is None else int(end_hour)
    ents = chips.group_by(CHIP_KEY).agg(
        pl.col("rack", "vendor", "model").drop_nulls().last(), first_hour=pl.col("hour").min())
    # a chip ends when the same slot reports a newer uuid
    ents = ents.sort("cluster", "node", "chip", "first_hour").with_columns(
        end_hour=(pl.col("first_hour").shift(-1).over(["cluster", "node", "chip"]) - 1).fill_null(last_hour))
    ents = ents.with_row_index("eid").with_columns(pl.col("eid").cast(pl.Int64))
    grid = ents.with_columns(hour=pl.int_ranges("first_hour", pl.col("end_hour") + 1)).explode("hour")
    grid = grid.filter(pl.col("hour").is_not_null()).select("eid", *CHIP_KEY, "rack", "vendor", "model", "hour")
    g = grid.join(chips.drop("rack", "vendor", "model"), on=CHIP_KEY + ["hour"], how="left")
    nodes = r.nodes
    node_sig = [n for n, s in _SIGNAL.items() if s.level == "node"]
    if not nodes.is_empty():
        for s in node_sig:
            if s not in nodes.columns:
                nodes = nodes.with_columns(pl.lit(None, pl.Float64).alias(s))
        nodes = nodes.group_by(NODE_KEY + ["hour"]).agg(
            pl.col("node_last_ts").max(),
            *[(_sum(s) if _SIGNAL[s].agg == "inc" else pl.col(s).min() if _SIGNAL[s].agg in ("min", "minmax")
               else pl.col(s).max()) for s in node_sig])
        g = g.join(nodes, on=NODE_KEY + ["hour"], how="left")
    else:
        g = g.with_columns(pl.lit(None, pl.Int64).alias("node_last_ts"),
                           *[pl.lit(None, pl.Float64).alias(s) for s in node_sig])
    # XID counts per hour (all codes but the never-fatal, application-side ones)
    if events is not None and not events.is_empty():
        xh = (events.filter(~pl.col("xid").is_in([43, 45]))
              .with_columns(hour=pl.col("ts") // HOUR_MS)
              .group_by(CHIP_KEY + ["hour"]).agg(xid_n=pl.col("count").sum()))
        g = g.join(xh, on=CHIP_KEY + ["hour"], how="left")
    else:
        g = g.with_columns(xid_n=pl.lit(None, pl.Int64))
    g = g.sort("eid", "hour").with_columns(
        ecc_corr=pl.coalesce("ecc_corr_agg", "ecc_corr_vol"),
        ecc_uncorr=pl.coalesce("ecc_uncorr_agg", "ecc_uncorr_vol"),
        sram_corr=pl.coalesce("sram_corr_agg", "sram_corr_vol"),
        sram_uncorr=pl.coalesce("sram_uncorr_agg", "sram_uncorr_vol"),
        efa_flap=pl.col("net_flap"),
        hot=(pl.col("temp_max") >= pl.col("temp_slowdown")).cast(pl.Float64),
        # the chips of a node run the same job in the same air: a chip's gap to its node's median
        # temperature compares it at equal load, so a cooling fault's slow rise stands out of
        # the busy/idle swings every chip shares
        temp_gap=pl.col("temp_mean") - pl.col("temp_mean").median().over(NODE_KEY + ["hour"]),
    )
    base_n = BASELINE_H + 24

    def rate_base(col: str) -> pl.Expr:   # mean hourly value over the 7 days before the last 24 h
        return (_roll(col, base_n) - _roll(col, 24)) / (_count(col, base_n) - _count(col, 24)).clip(1, None)

    def fwd(col: str, limit: int = 2) -> pl.Expr:   # a state gauge persists briefly if a scrape is missed
        return pl.col(col).forward_fill(limit).over("eid")

    last_seen = pl.col("last_ts").forward_fill().over("eid")
    node_seen = pl.col("node_last_ts").forward_fill().over("eid")
    end_ms = (pl.col("hour") + 1) * HOUR_MS
    if now_ms is not None:
        end_ms = pl.min_horizontal(end_ms, pl.lit(int(now_ms)))
    g = g.with_columns(
        t_ms=end_ms,
        ecc_corr_1h=_roll("ecc_corr", 1), ecc_corr_24h=_roll("ecc_corr", 24),
        ecc_corr_6h=_roll("ecc_corr", 6), ecc_corr_7d=_roll("ecc_corr", BASELINE_H),
        ecc_corr_base=rate_base("ecc_corr"),
        ecc_uncorr_1h=_roll("ecc_uncorr", 1), ecc_uncorr_24h=_roll("ecc_uncorr", 24),
        ecc_uncorr_7d=_roll("ecc_uncorr", BASELINE_H),
        sram_uncorr_1h=_roll("sram_uncorr", 1), sram_uncorr_24h=_roll("sram_uncorr", 24),
        sram_corr_24h=_roll("sram_corr", 24),
        remap_uncorr_1h=_roll("remap_uncorr", 1), remap_corr_7d=_roll("remap_corr", BASELINE_H),
        remap_pending=fwd("remap_pending"), remap_failure=fwd("remap_failure"),
        retired_total=(fwd("retired_sbe").fill_null(0) + fwd("retired_dbe").fill_null(0)),
        retired_dbe=fwd("retired_dbe"), retired_pending=fwd("retired_pending"),
        pcie_1h=_roll("pcie_replays", 1), pcie_24h=_roll("pcie_replays", 24), pcie_base=rate_base("pcie_replays"),
        nvlink_1h=_roll("nvlink_errors", 1), nvlink_24h=_roll("nvlink_errors", 24),
        nvlink_base=rate_base("nvlink_errors"), nvlink_up_min=pl.col("nvlink_up_min"),
        recovery_action=fwd("recovery_action"),
        temp_max_1h=pl.col("temp_max"),
        temp_max_24h=pl.col("temp_max").rolling_max(24, min_samples=1).over("eid"),
        temp_max_base=pl.col("temp_max").shift(24).rolling_max(BASELINE_H, min_samples=1).over("eid"),
        temp_mean_24h=_roll("temp_mean", 24) / _count("temp_mean", 24).clip(1, None),
        temp_base=rate_base("temp_mean"),
        temp_gap_24h=pl.when(_count("temp_gap", 24) >= GAP_MIN_HOURS_24H)
        .then(_roll("temp_gap", 24) / _count("temp_gap", 24).clip(1, None)),
        temp_gap_base=pl.when(_count("temp_gap", base_n) - _count("temp_gap", 24) >= GAP_MIN_HOURS_BASE)
        .then(rate_base("temp_gap")),
        thermal_margin=fwd("temp_slowdown", 24) - pl.col("temp_max"),
        thermal_margin_24h=fwd("temp_slowdown", 24) - pl.col("temp_max").rolling_max(24, min_samples=1).over("eid"),
        hot_6h=_roll("hot", 6),
        mem_temp_max_24h=pl.col("mem_temp_max").rolling_max(24, min_samples=1).over("eid"),
        throttle_6h=_roll("throttle_thermal", 6) / _count("throttle_thermal", 6).clip(1, None),
        throttle_24h=_roll("throttle_thermal", 24) / _count("throttle_thermal", 24).clip(1, None),
        neuron_hw_1h=_roll("neuron_hw_errors", 1), neuron_hw_24h=_roll("neuron_hw_errors", 24),
        neuron_hw_peak_24h=pl.col("neuron_hw_errors").fill_null(0).rolling_max(24, min_samples=1).over("eid"),
        xid_7d=_roll("xid_n", BASELINE_H), xid_30d=_roll("xid_n", 24 * 30),
        efa_retrans_1h=_roll("efa_retrans", 1), efa_retrans_base=rate_base("efa_retrans"),
        efa_unresp_1h=_roll("efa_unresponsive", 1), efa_unresp_24h=_roll("efa_unresponsive", 24),
        efa_flap_hours_6h=_roll("efa_flap", 6),
        silent_min=(end_ms - last_seen) / 60_000,
        node_silent_min=(end_ms - node_seen) / 60_000,
        hours_seen=pl.int_range(1, pl.len() + 1).over("eid"),
        is_trainium=(pl.col("vendor") == "aws").cast(pl.Float64),
    )
    floor = 1.0 / 24   # one event a day: keeps the ratio finite when the baseline is zero
    g = g.with_columns(
        ecc_corr_ratio=(pl.col("ecc_corr_24h") / 24) / pl.max_horizontal(pl.col("ecc_corr_base"), pl.lit(floor)),
        ecc_corr_growth=(pl.col("ecc_corr_6h") / 6) / pl.max_horizontal(pl.col("ecc_corr_24h") / 24, pl.lit(floor)),
        pcie_ratio=(pl.col("pcie_24h") / 24) / pl.max_horizontal(pl.col("pcie_base"), pl.lit(floor)),
        nvlink_ratio=(pl.col("nvlink_24h") / 24) / pl.max_horizontal(pl.col("nvlink_base"), pl.lit(floor)),
        temp_drift=pl.col("temp_mean_24h") - pl.col("temp_base"),
        temp_max_drift=pl.col("temp_max_24h") - pl.col("temp_max_base"),
        temp_gap_rise=pl.col("temp_gap_24h") - pl.col("temp_gap_base"),
        # the live service evaluates every few minutes: in the current, partial hour the count covers
        # only the minutes so far, so it is scaled to an hourly rate (over at least 10 minutes, so one
        # early sample makes no surge); a complete hour is unchanged
        efa_retrans_ratio=pl.col("efa_retrans_1h") / ((pl.col("t_ms") - pl.col("hour") * HOUR_MS) / HOUR_MS).clip(1 / 6, 1)
        / pl.max_horizontal(pl.col("efa_retrans_base"), pl.lit(floor)),
    )
    return g


def load_trace(trace_dir: str, chunk_hours: int = 24) -> tuple[Rollup, pl.DataFrame, int, int]:
    """Roll up a whole trace: (rollup, xid events, start_ms, end_ms)."""
    src = TraceSource(trace_dir)
    lo, hi = src.time_range()
    r, ev = read_hours(src, lo, hi + 1, chunk_hours, data_start_ms=lo)
    return r, ev, lo, hi + 1
