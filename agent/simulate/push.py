"""Push a simulated fleet to a collector over OTLP/HTTP, through the real agent's exporter.

Every simulated node's batch is built as agent Points and serialized by
agent.export.otlp.encode_request, then sent by OtlpSender - the same code path as a real agent,
so the collector cannot tell the difference (resource attributes, names, units, types).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from agent.export.otlp import OtlpSender, encode_request
from agent.simulate.scenario import Scenario
from agent.simulate.signals import Block, Labeler, Renderer
from agent.sources.base import Point

log = logging.getLogger(__name__)


@dataclass
class PushStats:
    requests: int = 0
    points: int = 0
    failed: int = 0
    steps: int = 0


def node_batches(block: Block, labeler: Labeler) -> dict[int, list[tuple[str, dict, np.ndarray]]]:
    """node -> [(otel name, attributes, values over the block's steps)], built once per block."""
    out: dict[int, list[tuple[str, dict, np.ndarray]]] = {}
    for g in block.groups:
        for j, e in enumerate(g.ids.tolist()):
            extra = g.per_row[j] if g.per_row is not None else g.extra
            node = labeler.node_of(g.kind, e)
            out.setdefault(node, []).append((g.otel, labeler.attrs(g.kind, e, extra), g.values[j]))
    return out


def step_points(series: list[tuple[str, dict, np.ndarray]], t: int, time_ns: int) -> list[Point]:
    """The points one node reports at step t (silent series send nothing)."""
    return [Point(name, float(v[t]), attrs, time_ns) for name, attrs, v in series if v[t] == v[t]]


def push(sc: Scenario, step_s: int, endpoint: str, metric_set: str = "all", realtime: bool = False,
         headers: dict[str, str] | None = None, timeout: float = 10.0, block_steps: int = 60,
         stop_on_error: bool | None = None) -> PushStats:
    """Send every step of every node in time order; with realtime, pace steps to the wall clock.

    A refused batch (4xx) always stops the run. An unreachable collector stops a fast run; a
    realtime run (stop_on_error defaults to not realtime) logs it and goes on with the next step."""
    if stop_on_error is None:
        stop_on_error = not realtime
    renderer = Renderer(sc, step_s, metric_set)
    labeler = Labeler(renderer)
    sender = OtlpSender(endpoint, headers=headers, timeout=timeout)
    stats = PushStats()
    start_ns = sc.start_ms * 1_000_000
    wall0 = time.time()
    try:
        for block in renderer.blocks(renderer.steps(), block_steps, block_seed=0):
            batches = node_batches(block, labeler)
            for t, ts in enumerate(block.ts.tolist()):
                if realtime:
                    delay = wall0 + (ts - sc.start_ms) / 1000 - time.time()
                    if delay > 0:
                        time.sleep(delay)
                time_ns = ts * 1_000_000
                for node in sorted(batches):
                    points = step_points(batches[node], t, time_ns)
                    if not points:
                        continue
                    body = encode_request(points, labeler.resource(node), start_ns, time_ns)
                    result = sender.send_with_retry(body)
                    stats.requests += 1
                    if result.ok:
                        stats.points += len(points) - result.rejected_points
                    else:
                        stats.failed += 1
                        log.error("push to %s failed: %s", endpoint, result.error)
                        if not result.retryable:
                            raise RuntimeError(f"collector refused a batch: {result.error}")
                        if stop_on_error:
                            raise ConnectionError(f"collector unreachable: {result.error}")
                        # paced to the clock: a live fleet keeps going through a collector
                        # outage (its real agents would spool; the simulator drops the batch)
                stats.steps += 1
    finally:
        sender.close()
    return stats
