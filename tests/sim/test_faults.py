"""The injected faults follow ../shared/reference/failure-model.md within sampling error.

A year of a 2,000-node fleet (about 20,000 chips, 7 million chip-days) gives each mode enough
failures for a tight bound. The expected counts are computed here from the parameters and the
ground truth (lemon nodes, regime windows), not taken from the simulator; observed counts must be
within 4 standard deviations (Poisson for counts, binomial for the share with a precursor).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc
import pytest

from agent.simulate import params as P
from agent.simulate.scenario import build_scenario
from agent.simulate.trace import failures_table

START = 1767225600000  # 2026-01-01
DAYS = 365


@pytest.fixture(scope="module")
def year():
    sc = build_scenario(seed=11, start_ms=START, duration_s=DAYS * 86400, nodes=2000, chips=None,
                        trainium_share=0.25, schedule=False)
    table = failures_table(sc)
    inside = table.filter(pc.less(table["ts"], sc.end_ms))
    return sc, inside


def _weights(sc, mode):
    """Per-entity hazard multiplier (vendor applicability x lemon factor) and entity node index."""
    f = sc.fleet
    nodes = f.slot_node if mode.scope == "chip" else np.arange(f.n_nodes)
    vendor = np.array(f.vendor)[nodes]
    return np.isin(vendor, mode.vendors) * np.where(f.lemon[nodes], P.LEMON_FACTOR, 1.0), nodes


def _regime_days(sc, mode_name, inside: bool | None = None):
    grid = np.arange(sc.start_ms, sc.end_ms, P.MINUTE_MS * 10)
    factor = sc.regime_factor(mode_name, grid)
    if inside is None:
        weight = factor
    else:
        weight = np.where((factor > 1) == inside, factor, 0.0)
    return weight.sum() * 10 / (24 * 60)


def _within_poisson(observed, expected, what):
    sigma = math.sqrt(expected)
    assert abs(observed - expected) <= 4 * sigma + 1, f"{what}: observed {observed}, expected {expected:.1f} +- {sigma:.1f}"


@pytest.mark.parametrize("mode_name", list(P.FAILURE_MODES))
def test_failure_rate_per_mode_matches_the_hazard(year, mode_name):
    sc, table = year
    mode = P.FAILURE_MODES[mode_name]
    weights, _ = _weights(sc, mode)
    expected = weights.sum() * mode.hazard_per_day * _regime_days(sc, mode_name)
    observed = table.filter(pc.equal(table["mode"], mode_name)).num_rows
    assert expected > 30  # the bound below is only meaningful with enough events
    _within_poisson(observed, expected, mode_name)


@pytest.mark.parametrize("mode_name", list(P.FAILURE_MODES))
def test_share_with_a_precursor_and_lead_times(year, mode_name):
    sc, table = year
    mode = P.FAILURE_MODES[mode_name]
    rows = table.filter(pc.equal(table["mode"], mode_name))
    n = rows.num_rows
    pre = rows["precursor_start"].to_numpy(zero_copy_only=False)
    has = ~np.isnan(pre.astype(float))
    k = int(has.sum())
    p = mode.precursor_share
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(k - n * p) <= 4 * sigma + 1, f"{mode_name}: {k}/{n} with precursor, expected share {p}"
    if k:
        lead_h = (rows["ts"].to_numpy()[has] - pre[has].astype(np.int64)) / P.HOUR_MS
        # a precursor never starts after its failure nor before the window the model allows
        # (it can be shorter when the chip was installed less than a lead time before)
        assert (lead_h > 0).all() and (lead_h <= mode.lead_max_h + 1e-9).all()
        assert np.median(lead_h) == pytest.approx(mode.lead_median_h, rel=0.35)


def test_lemons_fail_about_fifteen_times_as_often(year):
    sc, table = year
    f = sc.fleet
    assert 0.005 < f.lemon.mean() < 0.03
    lemon_nodes = set(np.array(f.node)[f.lemon].tolist())
    lemon_rows = sum(1 for node in table["node"].to_pylist() if node in lemon_nodes)
    expected = 0.0
    for mode in P.FAILURE_MODES.values():
        weights, nodes = _weights(sc, mode)
        expected += (weights * f.lemon[nodes]).sum() * mode.hazard_per_day * _regime_days(sc, mode.name)
    _within_poisson(lemon_rows, expected, "failures on lemon nodes")
    assert all(flag == (node in lemon_nodes) for node, flag in zip(table["node"].to_pylist(), table["lemon"].to_pylist()))


def test_bad_driver_regimes_raise_gsp_failures_fleet_wide(year):
    sc, table = year
    gsp = [r for r in sc.regimes if r.mode == "gsp" and r.start_ms < sc.end_ms]
    assert gsp, "a year should contain bad-driver regimes"
    mode = P.FAILURE_MODES["gsp"]
    weights, _ = _weights(sc, mode)
    ts = table.filter(pc.equal(table["mode"], "gsp"))["ts"].to_numpy()
    in_regime = np.zeros(ts.size, dtype=bool)
    for r in gsp:
        in_regime |= (ts >= r.start_ms) & (ts < r.end_ms)
    for inside in (True, False):
        expected = weights.sum() * mode.hazard_per_day * _regime_days(sc, "gsp", inside)
        _within_poisson(int((in_regime == inside).sum()), expected, f"gsp failures inside={inside}")
    # the regime's rate per day really is higher
    days_in = sum(min(r.end_ms, sc.end_ms) - r.start_ms for r in gsp) / P.DAY_MS
    assert in_regime.sum() / days_in > 3 * (~in_regime).sum() / (DAYS - days_in)


def test_gsp_failures_never_have_precursors_and_only_hit_gpus(year):
    sc, table = year
    rows = table.filter(pc.equal(table["mode"], "gsp"))
    assert rows["precursor_start"].null_count == rows.num_rows
    vendor = dict(zip(sc.fleet.node, sc.fleet.vendor))
    assert {vendor[n] for n in rows["node"].to_pylist()} == {"nvidia"}
