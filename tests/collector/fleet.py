"""Small fleet-shaped OTLP batches built with the agent's own encoder (agent.export.otlp)."""

from __future__ import annotations

from agent.export.otlp import encode_request
from agent.sources.base import point


def node_resource(i: int) -> dict[str, str]:
    return {"cluster": "c1", "node": f"node-{i:03d}", "rack": f"r{i // 4}"}


def node_points(i: int, step: int, chips: int = 4) -> list:
    pts = []
    for c in range(chips):
        attrs = dict(chip=str(c), uuid=f"GPU-{i:03d}-{c}", vendor="nvidia", model="B200")
        pts.append(point("hw.gpu.utilization", (step * 7 + c) % 100 / 100, **attrs))
        pts.append(point("hw.power", 500 + (step + c) % 200, **attrs))
        pts.append(point("hw.energy", 1000.0 * step + c, **attrs))
        pts.append(point("hw.gpu.memory.usage", float((step % 50) << 30), **attrs))
    return pts


def batch(i: int, step: int, ts_ms: int, chips: int = 4) -> bytes:
    """One node's collection at ts_ms (4 metrics x chips points)."""
    return encode_request(node_points(i, step, chips), node_resource(i), start_time_ns=0,
                          default_time_ns=ts_ms * 1_000_000)
