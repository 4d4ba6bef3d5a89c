"""A simulated node's OTLP request looks like a real agent's: same metric names, units, types,
attribute keys and resource attributes as one collection of the real agent (agent.runner.Agent,
with its self-metrics) whose sources read the recorded fixtures (NVML replay, dcgm-exporter page,
kernel log, sysfs, ipmitool, neuron-monitor)."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from agent.config import AgentConfig
from agent.export.otlp import encode_request
from agent.runner import Agent
from agent.simulate import params as P
from agent.simulate.push import node_batches, step_points
from agent.simulate.scenario import build_scenario
from agent.simulate.signals import Labeler, Renderer
from agent.sources.dcgm import DcgmSource
from agent.sources.efa import EfaSource
from agent.sources.neuron import NeuronSource
from agent.sources.nvml import NvmlSource
from agent.sources.power import PowerSource
from agent.sources.xid import XidSource
from tests.agent.nvml_replay import NvmlReplay
from tests.agent.test_source_dcgm import PAGE, serving
from tests.support import FIXTURES

START = 1767225600000
RESOURCE = {"cluster": "lab", "node": "fixture-node", "rack": "r1"}


def shape(body: bytes):
    """metric name -> (unit, kind, monotonic, {attribute key sets}); and the resource keys."""
    req = ExportMetricsServiceRequest.FromString(body)
    [rm] = req.resource_metrics
    out = {}
    for sm in rm.scope_metrics:
        for m in sm.metrics:
            kind = m.WhichOneof("data")
            points = getattr(m, kind).data_points
            keys = {frozenset(kv.key for kv in dp.attributes) for dp in points}
            monotonic = m.sum.is_monotonic if kind == "sum" else None
            temporality = m.sum.aggregation_temporality if kind == "sum" else None
            entry = out.setdefault(m.name, (m.unit, kind, monotonic, temporality, set()))
            entry[4].update(keys)
    return out, {kv.key for kv in rm.resource.attributes}


class Unsupported:
    """A source whose hardware is absent on this node (the agent reports supported = 0)."""

    def __init__(self, name):
        self.name = name

    def supported(self):
        return False, "not on this node"

    def collect(self):
        raise AssertionError("never collected")


class Replayed:
    """NeuronSource's report after feeding it the recorded neuron-monitor lines."""

    name = "neuron"

    def __init__(self, points):
        self.points = points

    def supported(self):
        return True, ""

    def collect(self):
        return self.points


def agent_batch(tmp_path, sources) -> bytes:
    """One collection of the real agent (agent.runner.Agent) with these sources - data points,
    self-metrics and export metrics - encoded as the agent encodes it. The agent's shipper is
    never started, so nothing is sent."""
    config = AgentConfig(labels=RESOURCE, collector_endpoint="http://127.0.0.1:9/v1/metrics", listen="",
                         spool_dir=str(tmp_path / "spool"), state_dir=str(tmp_path / "state"))
    agent = Agent(config, sources=sources)
    points = agent.collect_once()
    return encode_request(points, agent.resource, agent.start_time_ns, agent.last_time_ns)


def fixture_gpu_node(tmp_path):
    recording = json.loads((FIXTURES / "nvml" / "recorded_b200x8.json").read_text())
    ipmitool = [str(FIXTURES / "ipmitool" / "fake-ipmitool"), "dcmi", "power", "reading"]
    with serving(PAGE) as url:
        return agent_batch(tmp_path, [
            NvmlSource(nvml=NvmlReplay(copy.deepcopy(recording))), DcgmSource(url, timeout=5),
            Unsupported("neuron"), EfaSource(sysfs_root=FIXTURES / "sysfs"),
            PowerSource(FIXTURES / "sysfs", ipmitool),
            XidSource(FIXTURES / "kmsg" / "kmsg.log", FIXTURES / "procfs", tmp_path / "xid")])


def fixture_trainium_node(tmp_path):
    src = NeuronSource([sys.executable, str(FIXTURES / "neuron" / "fake-neuron-monitor")])
    for line in (FIXTURES / "neuron" / "trn2.jsonl").read_bytes().split(b"\n"):
        src.feed_line(line)     # what its reader thread does with each line of neuron-monitor
    ipmitool = [str(FIXTURES / "ipmitool" / "fake-ipmitool"), "dcmi", "power", "reading"]
    return agent_batch(tmp_path, [
        Unsupported("nvml"), Unsupported("dcgm"), Replayed(src.current()),
        EfaSource(sysfs_root=FIXTURES / "sysfs"), PowerSource(FIXTURES / "sysfs", ipmitool), Unsupported("xid")])


@pytest.fixture(scope="module")
def simulated():
    """Requests of simulated nodes at a moment when a storm made them log XIDs and a job runs."""
    sc = build_scenario(seed=3, start_ms=START, duration_s=30 * 86400, nodes=200, chips=None, trainium_share=0.25)
    ts, job, xid, hit = next(s for s in sc.storms if s[0] > START)
    r = Renderer(sc, 10, "all")
    labeler = Labeler(r)
    steps = np.arange(ts - 60_000, ts + 120_000, 10_000, dtype=np.int64)
    block = r.render(steps, np.random.default_rng(0))
    batches = node_batches(block, labeler)
    trn = next(n for n in range(sc.fleet.n_nodes) if sc.fleet.vendor[n] == "aws"
               and ((sc.job_node == n) & (sc.job_start <= ts) & (sc.job_end > ts)).any())
    out = {}
    for vendor, node in (("nvidia", hit[0]), ("aws", trn)):
        t = steps.size - 1
        points = step_points(batches[node], t, int(steps[t]) * 1_000_000)
        out[vendor] = encode_request(points, labeler.resource(node), START * 1_000_000, int(steps[t]) * 1_000_000)
    return out


def compare(sim_body: bytes, real_body: bytes):
    sim, sim_resource = shape(sim_body)
    real, real_resource = shape(real_body)
    assert sim_resource == real_resource
    assert set(sim) == set(real), {"only simulated": set(sim) - set(real), "only real": set(real) - set(sim)}
    for name in real:
        s_unit, s_kind, s_mono, s_temp, s_keys = sim[name]
        r_unit, r_kind, r_mono, r_temp, r_keys = real[name]
        assert (s_unit, s_kind, s_mono, s_temp) == (r_unit, r_kind, r_mono, r_temp), name
        assert s_keys == r_keys, (name, s_keys, r_keys)


def test_simulated_gpu_node_speaks_like_the_real_sources(simulated, tmp_path):
    compare(simulated["nvidia"], fixture_gpu_node(tmp_path))


def test_simulated_trainium_node_speaks_like_the_real_sources(simulated, tmp_path):
    compare(simulated["aws"], fixture_trainium_node(tmp_path))


def test_simulated_values_are_in_the_catalog_units(simulated):
    req = ExportMetricsServiceRequest.FromString(simulated["nvidia"])
    values = {}
    for m in req.resource_metrics[0].scope_metrics[0].metrics:
        for dp in getattr(m, m.WhichOneof("data")).data_points:
            values.setdefault(m.name, []).append(dp.as_double)
    assert all(0 <= v <= 1 for v in values["hw.gpu.utilization"])           # a ratio, not percent
    assert all(P.HARDWARE["nvidia"].idle_w * 0.8 <= v <= 1020 for v in values["hw.power"])   # watts
    assert all(20 <= v <= 100 for v in values["hw.temperature"])             # Celsius
    assert all(v > 1e8 for v in values["hw.gpu.clock"])                     # Hz, not MHz
