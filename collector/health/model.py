"""The learned risk score: probability that a chip fails within HORIZON_H hours.

scikit-learn's HistGradientBoostingClassifier (a well-kept gradient-boosted-trees implementation
that handles missing values natively: a Trainium chip has no PCIe-replay feature, a chip without
history has no baseline) over the trend features of features.py.

Horizon: 7 days. The precursors the fleet shows (failure-model.md) lead HBM failures by a median
of ~7 days (1-30), thermal ones by 3-30 days and off-the-bus ones by hours to 3 days; 7 days
covers the bulk of them, and a cordon more than a week before a failure could not be told apart
from a false one by an operator anyway. The backtest counts a cordon as true with the same horizon
(or when it falls inside the precursor window of the chip's coming failure).

Training uses time-ordered splits: fit on the early part of the history, choose the cordon
threshold on the later part (so the reported validation figures are out of time), as random
splits inflate results. Labels: positive when the chip (uuid) fails within the horizon and its
recorded precursor has begun (the row can show it); other rows in the horizon before a failure
are left out (nothing to learn from them), as are rows after a chip failed.

Each model verdict lists its reasons: the features that moved the risk most, measured by setting
each feature back to its training median (occlusion) and re-scoring, put in words.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from .features import CHIP_KEY, HOUR_MS, MODEL_FEATURES

HORIZON_H = 24 * 7
MODEL_DIR = os.path.join(os.path.dirname(__file__), "models")
DEFAULT_MODEL = os.path.join(MODEL_DIR, "risk-v1.joblib")
VERSION = "risk-v1"
NEVER = 1.01                     # a cordon threshold no probability reaches


@dataclass
class RiskModel:
    clf: object
    features: list[str]
    threshold: float                 # risk at/above which the chip is cordoned (DEGRADED, DRAIN)
    watch_threshold: float           # risk at/above which the chip is watched
    medians: dict[str, float]
    meta: dict = field(default_factory=dict)

    def score(self, grid: pl.DataFrame) -> np.ndarray:
        if grid.is_empty():
            return np.zeros(0)
        x = _matrix(grid, self.features)
        return self.clf.predict_proba(x)[:, 1]  # type: ignore[attr-defined]

    def explain(self, row: dict, top: int = 3) -> list[str]:
        """Reasons in words: the features whose typical value would lower the risk most."""
        x = np.array([[_num(row.get(f)) for f in self.features]], dtype=float)
        base = float(self.clf.predict_proba(x)[0, 1])  # type: ignore[attr-defined]
        trials = np.repeat(x, len(self.features), axis=0)
        for i, f in enumerate(self.features):
            trials[i, i] = self.medians.get(f, np.nan)
        drops = base - self.clf.predict_proba(trials)[:, 1]  # type: ignore[attr-defined]
        order = [i for i in np.argsort(-drops) if drops[i] > 0.01][:top]
        words = [describe(self.features[i], row, self.medians.get(self.features[i])) for i in order]
        return words or [f"risk {base:.2f} from the combination of trends"]

    def save(self, path: str) -> None:
        import joblib

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        joblib.dump({"clf": self.clf, "features": self.features, "threshold": self.threshold,
                     "watch_threshold": self.watch_threshold, "medians": self.medians, "meta": self.meta}, path)
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump({**self.meta, "features": self.features, "threshold": self.threshold,
                       "watch_threshold": self.watch_threshold}, f, indent=2, sort_keys=True)


def load(path: str | None = None) -> RiskModel:
    import joblib

    path = path or DEFAULT_MODEL
    if not os.path.exists(path):
        raise FileNotFoundError(f"risk model {path} not found (train one: shopfloor health train --trace DIR)")
    d = joblib.load(path)
    return RiskModel(d["clf"], list(d["features"]), float(d["threshold"]), float(d["watch_threshold"]),
                     dict(d["medians"]), dict(d.get("meta", {})))


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _matrix(grid: pl.DataFrame, feats: list[str]) -> np.ndarray:
    cols = [pl.col(f).cast(pl.Float64) if f in grid.columns else pl.lit(None, pl.Float64).alias(f) for f in feats]
    return grid.select(cols).to_numpy().astype(float)


def _fmt(v, spec: str = ".0f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


WORDS = {
    "ecc_corr_ratio": lambda r: f"correctable ECC rate {_fmt((r.get('ecc_corr_24h') or 0) / 24, '.1f')}/h, "
                                f"{_fmt(r.get('ecc_corr_ratio'))}x its 7-day baseline",
    "ecc_corr_24h": lambda r: f"{_fmt(r.get('ecc_corr_24h'))} correctable ECC errors in 24 h",
    "ecc_corr_1h": lambda r: f"{_fmt(r.get('ecc_corr_1h'))} correctable ECC errors in the last hour",
    "ecc_corr_growth": lambda r: f"correctable ECC rate still growing ({_fmt(r.get('ecc_corr_growth'), '.1f')}x the 24-h rate in the last 6 h)",
    "ecc_corr_base": lambda r: f"correctable ECC baseline {_fmt(r.get('ecc_corr_base'), '.2f')}/h",
    "ecc_uncorr_7d": lambda r: f"{_fmt(r.get('ecc_uncorr_7d'))} uncorrectable ECC errors in 7 days",
    "sram_corr_24h": lambda r: f"{_fmt(r.get('sram_corr_24h'))} corrected SRAM ECC errors in 24 h",
    "remap_corr_7d": lambda r: f"{_fmt(r.get('remap_corr_7d'))} memory rows remapped in 7 days",
    "remap_pending": lambda r: "a row remap is pending",
    "retired_total": lambda r: f"{_fmt(r.get('retired_total'))} retired memory pages",
    "pcie_ratio": lambda r: f"PCIe replays {_fmt(r.get('pcie_24h'))} in 24 h, {_fmt(r.get('pcie_ratio'))}x its baseline",
    "pcie_24h": lambda r: f"PCIe replays {_fmt(r.get('pcie_24h'))} in 24 h",
    "pcie_1h": lambda r: f"PCIe replays {_fmt(r.get('pcie_1h'))} in the last hour",
    "pcie_base": lambda r: f"PCIe replay baseline {_fmt(r.get('pcie_base'), '.2f')}/h",
    "nvlink_ratio": lambda r: f"NVLink errors {_fmt(r.get('nvlink_24h'))} in 24 h, {_fmt(r.get('nvlink_ratio'))}x its baseline",
    "nvlink_24h": lambda r: f"NVLink errors {_fmt(r.get('nvlink_24h'))} in 24 h",
    "nvlink_1h": lambda r: f"NVLink errors {_fmt(r.get('nvlink_1h'))} in the last hour",
    "temp_max_1h": lambda r: f"peak temperature {_fmt(r.get('temp_max_1h'))} °C in the last hour",
    "temp_mean_24h": lambda r: f"mean temperature {_fmt(r.get('temp_mean_24h'))} °C over 24 h",
    "temp_drift": lambda r: f"temperature {_fmt(r.get('temp_drift'), '+.1f')} °C against its 7-day mean",
    "thermal_margin": lambda r: f"only {_fmt(r.get('thermal_margin'))} °C below the slowdown temperature",
    "mem_temp_max_24h": lambda r: f"memory temperature up to {_fmt(r.get('mem_temp_max_24h'))} °C in 24 h",
    "throttle_6h": lambda r: f"thermally throttled {_fmt((r.get('throttle_6h') or 0) * 100)}% of the last 6 h",
    "throttle_24h": lambda r: f"thermally throttled {_fmt((r.get('throttle_24h') or 0) * 100)}% of the last 24 h",
    "neuron_hw_24h": lambda r: f"{_fmt(r.get('neuron_hw_24h'))} Trainium hardware errors in 24 h",
    "xid_7d": lambda r: f"{_fmt(r.get('xid_7d'))} XIDs in 7 days",
    "xid_30d": lambda r: f"{_fmt(r.get('xid_30d'))} XIDs in 30 days",
    "efa_retrans_1h": lambda r: f"EFA retransmits {_fmt(r.get('efa_retrans_1h'))} in the last hour",
    "efa_retrans_ratio": lambda r: f"EFA retransmits {_fmt(r.get('efa_retrans_ratio'))}x their baseline",
    "efa_unresp_24h": lambda r: f"{_fmt(r.get('efa_unresp_24h'))} unresponsive-remote EFA events in 24 h",
    "efa_flap_hours_6h": lambda r: f"EFA port flapped in {_fmt(r.get('efa_flap_hours_6h'))} of the last 6 h",
}


def describe(feature: str, row: dict, median: float | None) -> str:
    f = WORDS.get(feature)
    if f is not None:
        return f(row)
    return f"{feature} = {_fmt(row.get(feature), '.3g')} (typical {_fmt(median, '.3g')})"


# ---------------------------------------------------------------------------- labels and training
def label(grid: pl.DataFrame, failures: pl.DataFrame, horizon_h: int = HORIZON_H) -> pl.DataFrame:
    """grid + y + `usable`.

    y = 1: the chip fails within the horizon and its precursor has begun (the row can show it);
    y = 0: no failure of the chip within the horizon. Rows within the horizon before a failure
    whose precursor has not begun (or that has none), and rows after the chip failed, are not
    usable: they are neither evidence of health nor of trouble."""
    f = failures.filter(pl.col("chip") != "").select(
        *CHIP_KEY, f_ts=pl.col("ts"), f_pre=pl.col("precursor_start"))
    g = grid.select(pl.all()).with_row_index("_r")
    j = g.select("_r", *CHIP_KEY, "t_ms").join(f, on=CHIP_KEY, how="inner")
    j = j.with_columns(dt_ms=pl.col("f_ts") - pl.col("t_ms"))
    h_ms = horizon_h * HOUR_MS
    within = (pl.col("dt_ms") > 0) & (pl.col("dt_ms") <= h_ms)
    showing = pl.col("f_pre").is_not_null() & (pl.col("t_ms") >= pl.col("f_pre"))
    agg = j.group_by("_r").agg(
        pos=(within & showing).any(), blind=(within & ~showing.fill_null(False)).any(),
        after=(pl.col("dt_ms") <= 0).any())
    g = g.join(agg, on="_r", how="left").with_columns(pl.col("pos", "blind", "after").fill_null(False))
    from .rules import SILENT_MIN
    return g.with_columns(
        y=pl.col("pos").cast(pl.Int8),
        usable=~pl.col("after") & (~pl.col("blind") | pl.col("pos"))
        & (pl.col("silent_min").fill_null(0) < SILENT_MIN)).drop("_r", "pos", "blind", "after")


def episodes(flags: pl.DataFrame, gap_h: int = 24) -> pl.DataFrame:
    """Cordon episodes from flagged rows (keys..., hour): a run of flagged hours, a new episode
    after `gap_h` unflagged hours (the return-to-service window). Returns keys + start_hour."""
    keys = [c for c in flags.columns if c != "hour"]
    f = flags.unique().sort(*keys, "hour")
    gap = (pl.col("hour") - pl.col("hour").shift(1)).over(keys)
    f = f.with_columns(new=(gap.is_null() | (gap > gap_h)))
    return f.filter(pl.col("new")).select(*keys, start_hour=pl.col("hour"))


def false_cordons(starts: pl.DataFrame, failures: pl.DataFrame, horizon_h: int = HORIZON_H) -> tuple[int, int]:
    """(true, false) chip cordon episodes: true when the chip fails within [start - 24 h, start +
    horizon], or the episode starts while the precursor of the chip's coming failure runs."""
    if starts.is_empty():
        return 0, 0
    f = failures.filter(pl.col("chip") != "").select(*CHIP_KEY, f_ts=pl.col("ts"), f_pre=pl.col("precursor_start"))
    s = starts.with_row_index("_e").with_columns(t=(pl.col("start_hour") + 1) * HOUR_MS)
    j = s.join(f, on=CHIP_KEY, how="left").with_columns(
        ok=(((pl.col("f_ts") >= pl.col("t") - 24 * HOUR_MS) & (pl.col("f_ts") <= pl.col("t") + horizon_h * HOUR_MS))
            | ((pl.col("t") >= pl.col("f_pre")) & (pl.col("t") < pl.col("f_ts")))).fill_null(False))
    ok = j.group_by("_e").agg(pl.col("ok").any())
    t = int(ok["ok"].sum())
    return t, len(ok) - t


def train(grid: pl.DataFrame, failures: pl.DataFrame, *, seed: int = 0, train_frac: float = 0.6,
          target_false_per_10k: float = 0.25, max_negatives: int = 150_000, source: str = "") -> tuple[RiskModel, dict]:
    """Fit on the early `train_frac` of the time range, pick thresholds on the rest.

    Returns the model and a report of the validation (out-of-time) figures."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    lab = label(grid, failures)
    lo, hi = int(lab["hour"].min()), int(lab["hour"].max())
    split = lo + int((hi - lo) * train_frac)
    purge = split - HORIZON_H            # labels of earlier rows do not look into the validation period
    tr = lab.filter(pl.col("usable") & (pl.col("hour") < purge))
    va = lab.filter(pl.col("hour") >= split)
    if tr.filter(pl.col("y") == 1).height == 0:
        raise ValueError("no precursor-bearing failure in the training period: use a longer or larger trace")
    rng = np.random.default_rng(seed)
    neg = tr.filter(pl.col("y") == 0)
    frac = min(1.0, max_negatives / max(1, neg.height))
    keep = rng.random(neg.height) < frac
    tr_s = pl.concat([tr.filter(pl.col("y") == 1), neg.filter(pl.Series(keep))])
    w = np.where(tr_s["y"].to_numpy() == 1, 1.0, 1.0 / frac)
    x = _matrix(tr_s, MODEL_FEATURES)
    # a feature the fleet never reported (no Trainium chips, no EFA) is all-missing: sklearn cannot
    # bin it, so train on a constant there (never split on; missing at scoring time is harmless)
    x[:, np.isnan(x).all(axis=0)] = 0.0
    y = tr_s["y"].to_numpy()
    clf = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.08, max_leaf_nodes=31,
                                         min_samples_leaf=40, l2_regularization=1.0, random_state=seed,
                                         early_stopping=False)
    clf.fit(x, y, sample_weight=w)
    medians = {f: float(np.nanmedian(x[y == 0, i])) if np.isfinite(x[y == 0, i]).any() else float("nan")
               for i, f in enumerate(MODEL_FEATURES)}
    model = RiskModel(clf, list(MODEL_FEATURES), 1.0, 1.0, medians)
    # thresholds on the out-of-time period
    va_rep = va.filter(pl.col("silent_min").fill_null(0) < 10)
    risk = model.score(va_rep)
    va_rep = va_rep.with_columns(risk=pl.Series(risk))
    chip_days = va_rep.height / 24
    cands = sorted(set(np.round(np.quantile(risk, [0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99995, 0.99999]), 4)) |
                   {0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99})
    chosen, table = None, []
    for t in sorted(cands):
        starts = episodes(va_rep.filter(pl.col("risk") >= t).select(*CHIP_KEY, "hour"))
        tp, fp = false_cordons(starts, failures)
        per10k = fp / max(chip_days, 1e-9) * 1e4
        table.append({"threshold": float(t), "true": tp, "false": fp, "false_per_10k_chip_days": per10k})
        if chosen is None and per10k <= target_false_per_10k and tp > 0:
            chosen = float(t)
    # No threshold catches a failure within the false-cordon budget on the out-of-time period:
    # the model then never cordons on its own (its risk still makes chips WATCH and is exported).
    if chosen is None:
        chosen = NEVER
    auc = _auc(va_rep.filter(pl.col("usable"))["y"].to_numpy(), va_rep.filter(pl.col("usable"))["risk"].to_numpy())
    model.threshold = chosen
    model.watch_threshold = 0.5 if chosen == NEVER else min(chosen, max(0.2, chosen / 2))
    report = {
        "version": VERSION, "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed, "source": source, "horizon_h": HORIZON_H, "train_frac": train_frac,
        "train_rows": int(tr_s.height), "train_positives": int(y.sum()),
        "train_hours": [lo, purge], "validation_hours": [split, hi],
        "validation_auc": auc, "validation_chip_days": chip_days,
        "threshold": chosen, "threshold_table": table, "sklearn": _sk_version(),
    }
    model.meta = report
    return model, report


def _sk_version() -> str:
    import sklearn

    return sklearn.__version__


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    if len(set(y.tolist())) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))
