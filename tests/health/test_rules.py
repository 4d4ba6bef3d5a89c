"""Each deterministic rule on crafted data: the chip with the signal gets the verdict, the others
stay healthy, and signals below the rule's threshold do not fire."""

import polars as pl
import pytest

from agent.catalog import catalog
from collector.health.evaluate import evaluate, verdicts
from collector.health.features import load_trace
from collector.health.verdict import Action, State
from tests.health.tracegen import HOUR, START_MS, Trace

AT = START_MS + 10 * HOUR + 7 * 60_000     # the signal appears 10 h 7 min into the trace


def run(tmp_path, t: Trace, hour: int = 10):
    r, ev, lo, hi = load_trace(t.write(str(tmp_path / "trace")))
    e = evaluate(r, ev, None, None, end_hour=(hi - 1) // HOUR)
    h0 = START_MS // HOUR + hour
    return {(v.chip.node, v.chip.chip): v for v in verdicts(e, None, hour=h0)}, e


def only(vs, node="n000", chip="0", state=None, action=None, words=None):
    v = vs[(node, chip)]
    assert (v.state, v.action) == (state, action), v
    if words:
        assert any(words in r for r in v.reasons), v.reasons
    others = [x for k, x in vs.items() if k != (node, chip) and x.chip.chip != ""]
    assert others and all(x.state == State.HEALTHY for x in others), [x for x in others if x.state != State.HEALTHY]
    return v


def test_uncorrectable_ecc_nvidia(tmp_path):
    t = Trace().baseline()
    t.counter(0, 0, "hw.gpu.ecc.errors", {AT: 2}, type="uncorrected", memory="device", scope="aggregate")
    vs, _ = run(tmp_path, t)
    v = only(vs, state=State.FAILING, action=Action.RESET_GPU, words="uncorrectable ECC errors: 2")
    assert v.source == "rule" and v.chip.vendor == "nvidia"


def test_corrected_ecc_alone_is_not_fatal(tmp_path):
    t = Trace().baseline()
    t.counter(0, 0, "hw.gpu.ecc.errors", {AT: 5}, type="corrected", memory="device", scope="aggregate")
    vs, _ = run(tmp_path, t)
    assert all(v.state == State.HEALTHY for v in vs.values())


def test_trainium_hbm_and_sram_uncorrectable(tmp_path):
    t = Trace(vendor="aws").baseline()
    t.counter(0, 0, "hw.gpu.ecc.errors", {AT: 1}, type="uncorrected", memory="hbm", scope="volatile")
    t.counter(1, 1, "hw.gpu.ecc.errors", {AT: 1}, type="uncorrected", memory="sram", scope="volatile")
    vs, _ = run(tmp_path, t)
    assert (vs[("n000", "0")].state, vs[("n000", "0")].action) == (State.FAILING, Action.DRAIN)
    assert "HBM" in vs[("n000", "0")].reasons[0]
    assert (vs[("n001", "1")].state, vs[("n001", "1")].action) == (State.FAILING, Action.DRAIN)
    assert "SRAM" in vs[("n001", "1")].reasons[0]
    assert vs[("n000", "1")].state == State.HEALTHY


def test_row_remap_failure_and_pending(tmp_path):
    t = Trace().baseline()
    t.gauge(0, 0, "hw.gpu.row_remap.failure", {START_MS: 0, AT: 1})
    t.gauge(1, 0, "hw.gpu.row_remap.pending", {START_MS: 0, AT: 1})
    vs, _ = run(tmp_path, t)
    assert (vs[("n000", "0")].state, vs[("n000", "0")].action) == (State.FAILING, Action.DRAIN)
    # a pending remap asks for a reset at the next opportunity: watched, not cordoned
    assert (vs[("n001", "0")].state, vs[("n001", "0")].action) == (State.WATCH, Action.WATCH)


@pytest.mark.parametrize("pages,fires", [(59, False), (60, True)])
def test_retired_pages_limit(tmp_path, pages, fires):
    t = Trace().baseline()
    t.gauge(0, 0, "hw.gpu.retired_pages", {START_MS: 0, AT: pages - 2}, cause="single_bit")
    t.gauge(0, 0, "hw.gpu.retired_pages", {START_MS: 0, AT: 2}, cause="double_bit")
    vs, _ = run(tmp_path, t)
    v = vs[("n000", "0")]
    assert (v.state == State.FAILING and v.action == Action.DRAIN) == fires, v


def test_fallen_off_the_bus_by_silence(tmp_path):
    t = Trace()
    t.silent[(0, 1)] = AT          # chip 1 of node 0 stops reporting; its node goes on
    t.silent[(1, 0)] = AT          # node 1 stops entirely (a host down is not a chip off the bus)
    t.silent[(1, 1)] = AT
    t.baseline()
    # node 1's network series stop too
    t.rows = [r for r in t.rows if not ('"node":"n001"' in r[2] and r[0] >= AT)]
    vs, _ = run(tmp_path, t)
    v = vs[("n000", "1")]
    assert (v.state, v.action) == (State.FAILING, Action.REBOOT_NODE)
    assert "fallen off the bus" in v.reasons[0]
    # a whole node silent is a host problem (or stale data): unknown, not a chip off the bus
    assert vs[("n001", "0")].state == State.UNKNOWN and vs[("n001", "1")].state == State.UNKNOWN
    assert not vs[("n001", "0")].action.takes_out_of_service
    assert vs[("n000", "0")].state == State.HEALTHY


def test_xid_79_13_and_unknown(tmp_path):
    t = Trace(nodes=3, hours=40).baseline()
    t.counter(0, 0, "hw.gpu.xid.errors", {AT: 1}, from_ts=AT, xid="79")
    t.counter(1, 0, "hw.gpu.xid.errors", {AT: 1}, from_ts=AT, xid="13")
    t.counter(2, 0, "hw.gpu.xid.errors", {AT: 1}, from_ts=AT, xid="201")
    vs, _ = run(tmp_path, t)
    assert (vs[("n000", "0")].state, vs[("n000", "0")].action) == (State.FAILING, Action.REBOOT_NODE)
    assert (vs[("n001", "0")].state, vs[("n001", "0")].action) == (State.WATCH, Action.RESTART_APP)
    v = vs[("n002", "0")]
    assert (v.state, v.action) == (State.WATCH, Action.WATCH) and "unknown" in v.reasons[0]
    # the fatal XID holds its verdict for a day (remediation keeps the cordon); 13 is watched for
    # its escalation window (24 h); an unknown code for an hour
    later, _ = run(tmp_path / "later", t, hour=14)
    assert later[("n000", "0")].state == State.FAILING
    assert later[("n001", "0")].state == State.WATCH and later[("n002", "0")].state == State.HEALTHY
    much_later, _ = run(tmp_path / "much_later", t, hour=36)
    assert much_later[("n000", "0")].state == State.HEALTHY and much_later[("n001", "0")].state == State.HEALTHY


def test_xid_13_twice_in_a_day_asks_for_diagnostics_not_a_cordon(tmp_path):
    t = Trace().baseline()
    t.counter(0, 0, "hw.gpu.xid.errors", {AT - 3 * HOUR: 1, AT: 1}, from_ts=AT - 3 * HOUR, xid="13")
    vs, _ = run(tmp_path, t)
    v = vs[("n000", "0")]
    assert (v.state, v.action) == (State.DEGRADED, Action.DIAGNOSE)
    assert not v.action.takes_out_of_service


def test_nvlink_down(tmp_path):
    t = Trace().baseline()
    for link in range(2):
        t.gauge(0, 1, "hw.gpu.nvlink.up", {START_MS: 1, AT: 0 if link == 1 else 1}, link=str(link))
    vs, _ = run(tmp_path, t)
    only(vs, "n000", "1", State.DEGRADED, Action.DRAIN, "NVLink is down")


@pytest.mark.parametrize("errors,fires", [(1, False), (3, True)])
def test_trainium_hardware_execution_errors(tmp_path, errors, fires):
    t = Trace(vendor="aws").baseline()
    t.counter(0, 0, "hw.neuron.execution.errors", {AT + i * 60_000: 1 for i in range(errors)}, type="hardware")
    vs, _ = run(tmp_path, t)
    v = vs[("n000", "0")]
    assert (v.state == State.FAILING and v.action == Action.DRAIN) == fires, v


def test_efa_port_down_is_a_node_verdict(tmp_path):
    t = Trace().baseline()
    t.rows = [r for r in t.rows if not ('"node":"n001"' in r[2] and "hw_network_up" == r[1])]
    for ts in t.steps():
        t.add(ts, "hw_network_up", {"cluster": "c1", "node": "n001", "rack": "r0", "device": "rdmap0", "port": "1"},
              0.0 if ts >= AT - 2 * HOUR else 1.0)
        t.add(ts, "hw_network_up", {"cluster": "c1", "node": "n001", "rack": "r0", "device": "rdmap1", "port": "1"}, 1.0)
    vs, _ = run(tmp_path, t)
    v = vs[("n001", "")]
    assert (v.state, v.action) == (State.DEGRADED, Action.DRAIN) and "down" in v.reasons[0]
    assert ("n000", "") not in vs
    assert all(x.state == State.HEALTHY for k, x in vs.items() if k[1] != "")


def test_efa_port_flapping(tmp_path):
    t = Trace(hours=24).baseline()
    t.rows = [r for r in t.rows if not ('"node":"n000"' in r[2] and "hw_network_up" == r[1])]
    for i, ts in enumerate(t.steps()):
        flapping = ts >= AT - 5 * HOUR and (i % 6 == 0)      # down a few minutes every half hour
        t.add(ts, "hw_network_up", {"cluster": "c1", "node": "n000", "rack": "r0", "device": "rdmap0", "port": "1"},
              0.0 if flapping else 1.0)
    vs, _ = run(tmp_path, t)
    v = vs[("n000", "")]
    assert (v.state, v.action) == (State.DEGRADED, Action.DRAIN)
    assert any("went down and up in" in r for r in v.reasons), v.reasons
    assert not any("whole last hour" in r for r in v.reasons)


def test_sustained_thermal_throttling(tmp_path):
    t = Trace().baseline()
    t.gauge(0, 0, "hw.gpu.clock.event.active", {START_MS: 0, AT - 5 * HOUR: 1}, reason="hw_thermal")
    t.gauge(1, 1, "hw.gpu.clock.event.active", {START_MS: 0, AT - HOUR: 1, AT - HOUR + 600_000: 0}, reason="hw_thermal")
    vs, _ = run(tmp_path, t)
    only(vs, "n000", "0", State.DEGRADED, Action.DRAIN, "sustained thermal trouble")


@pytest.mark.parametrize("ra,state,action", [(1, State.FAILING, Action.RESET_GPU), (2, State.FAILING, Action.REBOOT_NODE),
                                             (3, State.DEGRADED, Action.DRAIN), (0, State.HEALTHY, Action.NONE)])
def test_recovery_action(tmp_path, ra, state, action):
    t = Trace().baseline()
    t.gauge(0, 0, "hw.gpu.recovery_action", {START_MS: 0, AT: ra})
    vs, _ = run(tmp_path, t)
    v = vs[("n000", "0")]
    assert (v.state, v.action) == (state, action)


def test_154_uses_the_recovery_action(tmp_path):
    t = Trace().baseline()
    t.gauge(0, 0, "hw.gpu.recovery_action", {START_MS: 0, AT: 2})
    t.counter(0, 0, "hw.gpu.xid.errors", {AT: 1}, from_ts=AT, xid="154")
    vs, e = run(tmp_path, t)
    v = vs[("n000", "0")]
    assert (v.state, v.action) == (State.FAILING, Action.REBOOT_NODE)
    assert any("XID 154" in r and "node reboot" in r for r in v.reasons)


@pytest.mark.parametrize("errors,fires", [(5, False), (10, True)])
def test_correctable_ecc_surge(tmp_path, errors, fires):
    t = Trace().baseline()
    t.counter(0, 0, "hw.gpu.ecc.errors", {AT - i * 1_800_000: 1 for i in range(errors)},
              type="corrected", memory="device", scope="aggregate")
    vs, _ = run(tmp_path, t)
    v = vs[("n000", "0")]
    if fires:
        assert (v.state, v.action) == (State.DEGRADED, Action.DRAIN)
        assert "correctable ECC rate" in v.reasons[0] and "baseline" in v.reasons[0]
    else:
        assert v.state == State.HEALTHY


def test_pcie_replay_surge(tmp_path):
    t = Trace(nodes=2, chips=2)
    t.baseline()
    t.rows = [r for r in t.rows if not (r[1] == "hw_gpu_pcie_replays_total" and '"node":"n001"' in r[2] and '"chip":"1"' in r[2])]
    t.counter(1, 1, "hw.gpu.pcie.replays", {AT - 3 * HOUR: 10, AT - HOUR: 15, AT: 20})
    vs, _ = run(tmp_path, t)
    only(vs, "n001", "1", State.DEGRADED, Action.DRAIN, "PCIe replays 45 in 24 h")


def test_trainium_hardware_errors_spread_over_a_day(tmp_path):
    t = Trace(vendor="aws").baseline()
    t.counter(0, 1, "hw.neuron.execution.errors", {AT - 9 * HOUR: 1, AT - 4 * HOUR: 1, AT: 1}, type="hardware")
    vs, _ = run(tmp_path, t)
    v = only(vs, "n000", "1", State.DEGRADED, Action.DRAIN, "3 in 24 h")
    assert not any("in an hour" in r for r in v.reasons)


DAY = 24 * HOUR


def _replace_temperature(t: Trace, n: int, c: int, values: dict[int, float]):
    """Chip (n, c) reports these die temperatures (held from each ts) instead of the baseline's."""
    name, chip = catalog().prom("hw.temperature"), f'"chip":"{c}"'
    t.rows = [r for r in t.rows if not (r[1] == name and f'"node":"{t.node(n)}"' in r[2] and chip in r[2])]
    t.gauge(n, c, "hw.temperature", values, sensor="gpu")


def test_thermal_drift_toward_slowdown(tmp_path):
    # the slowdown limit is 87 C (tracegen); the baseline chips run at 55 C
    t = Trace(nodes=3, chips=2, hours=9 * 24).baseline()
    at = START_MS + 8 * DAY + 10 * HOUR
    _replace_temperature(t, 0, 0, {START_MS: 70.0, at - 6 * HOUR: 78.0})       # +8 C, 9 C below slowdown
    for c in range(2):       # +15 C but 17 C of margin left (the whole node: a hotter job, not a drift)
        _replace_temperature(t, 1, c, {START_MS: 55.0, at - 6 * HOUR: 70.0})
    _replace_temperature(t, 2, 0, {START_MS: 79.0})                            # hot, but always this hot
    vs, _ = run(tmp_path, t, hour=8 * 24 + 10)
    v = only(vs, "n000", "0", State.DEGRADED, Action.DRAIN, "temperature drifting up")
    assert "8 C above the week before" in v.reasons[0] and "9 C below slowdown" in v.reasons[0], v.reasons


def test_thermal_gap_rise_against_the_node(tmp_path):
    """A chip warming against the other chips of its node (same job, same air) is drained long
    before it nears the slowdown temperature; a whole node warming (a hotter job) is not, nor a
    chip whose rise over its node stays under THERMAL_GAP_RISE_C."""
    t = Trace(nodes=2, chips=4, hours=9 * 24).baseline()
    at = START_MS + 8 * DAY + 10 * HOUR
    since = at - 19 * HOUR   # the evaluated hour ends at `at` + 1 h: 20 of its 24 h are warmer
    _replace_temperature(t, 0, 0, {START_MS: 55.0, since: 61.0})    # +6 C over its node for 20 of 24 h: +5 C
    for c in range(4):                                              # node 1 runs a hotter job: all of it rises
        _replace_temperature(t, 1, c, {START_MS: 55.0, since: 65.0 + (3.0 if c == 1 else 0.0)})
    vs, e = run(tmp_path, t, hour=8 * 24 + 10)
    v = only(vs, "n000", "0", State.DEGRADED, Action.DRAIN, "hotter than its node's median")
    assert "5.0 C more than the week before" in v.reasons[0], v.reasons
    g = e.grid.filter(pl.col("hour") == START_MS // HOUR + 8 * 24 + 10)
    rise = {(n, c): x for n, c, x in g.select("node", "chip", "temp_gap_rise").iter_rows()}
    assert rise[("n000", "0")] == pytest.approx(5.0) and rise[("n001", "1")] == pytest.approx(2.5)
    # 4 h into the rise the day's gap is up 1 C: not yet
    vs, _ = run(tmp_path, t, hour=8 * 24 - 6)
    assert vs[("n000", "0")].state == State.HEALTHY


def test_efa_retransmit_surge_is_a_node_verdict(tmp_path):
    t = Trace(nodes=3, chips=1, hours=9 * 24).baseline()
    at = START_MS + 8 * DAY + 10 * HOUR
    t.efa(0, {START_MS: 1800.0, at - HOUR: 1800.0 * 50})     # 6/s, then 50x for the last hour
    t.efa(1, {START_MS: 1800.0, at - HOUR: 1800.0 * 5})      # a busier hour: 5x is no surge
    t.efa(2, {START_MS: 0.0, at - HOUR: 1800.0 * 50})        # idle all week: no baseline to judge by
    vs, _ = run(tmp_path, t, hour=8 * 24 + 10)
    v = vs[("n000", "")]
    assert (v.state, v.action) == (State.DEGRADED, Action.DRAIN)
    assert any("EFA retransmits" in r and "50x" in r for r in v.reasons), v.reasons
    assert ("n001", "") not in vs and ("n002", "") not in vs
