"""The risk model learns from history and, on a later period it never saw, ranks chips that are
about to fail above healthy ones better than a trivial baseline; its verdicts carry reasons."""

import json

import numpy as np
import polars as pl
import pytest

from collector.health import model as risk_model
from collector.health.evaluate import evaluate, verdicts
from collector.health.features import MODEL_FEATURES, features, load_trace
from tests.health.tracegen import HOUR, START_MS, Trace

DAYS = 20
CHIPS = 60
PRE_H = 120


def fleet(tmp_path, seed: int):
    """60 chips; 16 of them get an HBM-like precursor (correctable ECC rising to ~40x baseline over
    the 5 days before) and then fail; every chip has Poisson background ECC and a noisy temperature."""
    rng = np.random.default_rng(seed)
    t = Trace(nodes=CHIPS // 2, chips=2, hours=DAYS * 24, step_s=300)
    t.baseline()
    bad = rng.choice(CHIPS, size=16, replace=False)
    fail_at = {int(b): START_MS + int(rng.uniform(3, DAYS - 0.5) * 24) * HOUR + 1_800_000 for b in bad}
    for i in range(CHIPS):
        n, c = divmod(i, 2)
        incs = {}
        for h in range(DAYS * 24):
            ts = START_MS + h * HOUR + 600_000
            lam = 0.02
            if i in fail_at:
                lead_h = (fail_at[i] - ts) / HOUR
                if 0 < lead_h < PRE_H:
                    lam = 0.02 * (1 + 40 * (1 - lead_h / PRE_H))
            k = rng.poisson(lam)
            if k:
                incs[ts] = float(k)
        t.counter(n, c, "hw.gpu.ecc.errors", incs, type="corrected", memory="device", scope="aggregate")
        if i in fail_at:
            t.failures.append({"ts": fail_at[i], "rack": t.rack(n), "node": t.node(n), "chip": str(c),
                               "uuid": f"GPU-{n:03d}-{c}", "mode": "hbm_uncorrectable",
                               "precursor_start": fail_at[i] - PRE_H * HOUR})
    d = t.write(str(tmp_path / f"trace{seed}"))
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = fleet(tmp_path_factory.mktemp("fleet"), seed=3)
    r, ev, lo, hi = load_trace(d)
    failures = pl.read_parquet(f"{d}/failures.parquet")
    grid = features(r, ev, end_hour=(hi - 1) // HOUR)
    model, report = risk_model.train(grid, failures, seed=1, train_frac=0.55, max_negatives=20_000)
    return r, ev, hi, grid, failures, model, report


def test_model_beats_a_trivial_baseline_out_of_time(trained):
    r, ev, hi, grid, failures, model, report = trained
    # the validation period is later than everything trained on
    assert report["validation_hours"][0] > report["train_hours"][1]
    lab = risk_model.label(grid, failures).filter(pl.col("usable") & (pl.col("hour") >= report["validation_hours"][0]))
    y = lab["y"].to_numpy()
    assert 0 < y.sum() < len(y)
    auc_model = risk_model._auc(y, model.score(lab))
    # trivial baselines: a constant (AUC 0.5), and "any correctable ECC error in the last 24 h"
    auc_any_ecc = risk_model._auc(y, (lab["ecc_corr_24h"].fill_null(0) > 0).cast(pl.Float64).to_numpy())
    assert auc_model > 0.75, (auc_model, auc_any_ecc)
    assert auc_model > auc_any_ecc + 0.02, (auc_model, auc_any_ecc)
    assert report["validation_auc"] is not None and 0 < report["threshold"] <= risk_model.NEVER


def test_model_round_trip_and_reasons_in_words(trained, tmp_path):
    r, ev, hi, grid, failures, model, report = trained
    path = str(tmp_path / "m" / "risk-test.joblib")
    model.save(path)
    loaded = risk_model.load(path)
    assert np.allclose(loaded.score(grid.head(500)), model.score(grid.head(500)))
    assert loaded.meta["seed"] == 1 and loaded.meta["horizon_h"] == risk_model.HORIZON_H
    meta = json.load(open(str(tmp_path / "m" / "risk-test.json")))
    assert meta["features"] == MODEL_FEATURES and meta["threshold"] == model.threshold
    # the riskiest chip-hour: its verdict names the ECC trend in words
    e = evaluate(r, ev, None, loaded, end_hour=(hi - 1) // HOUR)
    top = e.chips.sort("risk", descending=True).row(0, named=True)
    vs = [v for v in verdicts(e, loaded, hour=top["hour"]) if (v.chip.node, v.chip.chip) == (top["node"], top["chip"])]
    assert vs and vs[0].risk is not None and vs[0].risk == top["risk"]
    text = " ".join(vs[0].reasons)
    assert "correctable ECC" in text, text


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="shopfloor health train"):
        risk_model.load(str(tmp_path / "nope.joblib"))
