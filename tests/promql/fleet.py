"""Fleet-like series for the differential test and the query benchmark.

Deterministic (seeded) data in the catalog's names and labels: per chip utilization, GPU
temperature, power, a cumulative energy counter and an ECC-error counter that sometimes resets
(an agent or driver restart), scraped every `step_s` seconds. Each chip's scrape times carry a
fixed sub-second phase so no sample ever lands exactly on a query step or window boundary: that
keeps the answers identical between Prometheus 2.42 (closed windows) and 3.x semantics
(left-open windows), whose only difference is a sample exactly on the boundary.

Also a helper to push the same series to any remote-write endpoint (Prometheus or the collector).
"""

from __future__ import annotations

import math

import httpx
import numpy as np

from agent.catalog import catalog

CAT = catalog()
UTIL = CAT.prom("hw.gpu.utilization")
TEMP = CAT.prom("hw.temperature")
POWER = CAT.prom("hw.power")
ENERGY = CAT.prom("hw.energy")
ECC = CAT.prom("hw.gpu.ecc.errors")
METRICS = (UTIL, TEMP, POWER, ENERGY, ECC)


def fleet(chips: int, duration_s: int, step_s: int, end_ms: int, seed: int = 7,
          chips_per_node: int = 8, nodes_per_rack: int = 4, racks_per_cluster: int = 4):
    """[(labels with __name__, ts_ms int64 array, values float64 array)] for the whole fleet.

    A value of NaN with stale=True is not produced here; `gone` chips stop reporting two thirds
    of the way through (their series just end), as a chip that falls off the bus does.
    """
    rng = np.random.default_rng(seed)
    n = duration_s // step_s
    start_ms = end_ms - n * step_s * 1000
    out = []
    for c in range(chips):
        node = c // chips_per_node
        rack = node // nodes_per_rack
        cluster = rack // racks_per_cluster
        vendor, model = ("nvidia", "B200") if node % 3 else ("aws", "trn2")
        base = {"cluster": f"c{cluster}", "rack": f"r{rack}", "node": f"n{node:04d}",
                "chip": str(c % chips_per_node), "uuid": f"chip-{c:05d}", "vendor": vendor, "model": model}
        phase = int(rng.integers(1, 999)) + int(rng.integers(0, step_s)) * 1000
        ts = start_ms + phase + np.arange(n, dtype=np.int64) * step_s * 1000
        keep = n if c % 97 != 5 else (2 * n) // 3
        ts = ts[:keep]
        t = np.arange(keep) * step_s
        busy = np.clip(0.6 + 0.3 * np.sin(t / 1800 + c) + rng.normal(0, 0.05, keep), 0, 1)
        temp = 45 + 35 * busy + rng.normal(0, 1.5, keep)
        power = 150 + 850 * busy + rng.normal(0, 20, keep)
        energy = np.cumsum(power * step_s) + rng.uniform(1e6, 1e7)
        ecc_inc = rng.poisson(0.02 + (0.5 if c % 50 == 3 else 0.0), keep).astype(float)
        ecc = np.cumsum(ecc_inc)
        if c % 11 == 0:     # a counter reset half-way (driver reload)
            half = keep // 2
            ecc[half:] -= ecc[half - 1]
        out.append(({"__name__": UTIL, **base}, ts, np.round(busy, 4)))
        out.append(({"__name__": TEMP, **base, "sensor": "gpu"}, ts, np.round(temp, 2)))
        out.append(({"__name__": POWER, **base}, ts, np.round(power, 1)))
        out.append(({"__name__": ENERGY, **base}, ts, np.round(energy, 0)))
        out.append(({"__name__": ECC, **base, "memory": "dram", "type": "corrected", "scope": "volatile"}, ts, ecc))
    return out


def push(url: str, series, *, slice_s: int = 600, batch_series: int = 2000, headers=None) -> int:
    """Remote-write the series in time order (slices of `slice_s`), as a Prometheus agent would.

    Prometheus' TSDB refuses samples older than its head allows, so data is sent oldest first.
    Returns the number of samples sent.
    """
    from collector.receive.remote_write import encode

    lo = min(int(ts[0]) for _, ts, _ in series if len(ts))
    hi = max(int(ts[-1]) for _, ts, _ in series if len(ts))
    sent = 0
    with httpx.Client(timeout=600) as client:
        for t0 in range(lo, hi + 1, slice_s * 1000):
            t1 = t0 + slice_s * 1000
            chunk = []
            for labels, ts, vs in series:
                a, b = np.searchsorted(ts, [t0, t1])
                if b > a:
                    chunk.append((labels, list(zip(ts[a:b].tolist(), vs[a:b].tolist()))))
            for i in range(0, len(chunk), batch_series):
                body = encode(chunk[i:i + batch_series])
                r = client.post(url, content=body, headers={
                    "Content-Encoding": "snappy", "Content-Type": "application/x-protobuf",
                    "X-Prometheus-Remote-Write-Version": "0.1.0", **(headers or {})})
                if r.status_code >= 300:
                    raise RuntimeError(f"remote write to {url}: {r.status_code} {r.text[:300]}")
                sent += sum(len(s) for _, s in chunk[i:i + batch_series])
    return sent


def query_range(base_url: str, query: str, start: float, end: float, step: float, client=None) -> dict:
    c = client or httpx
    r = c.get(base_url + "/api/v1/query_range", params={"query": query, "start": start, "end": end, "step": step},
              timeout=300)
    r.raise_for_status()
    return r.json()["data"]


def query_instant(base_url: str, query: str, time_s: float, client=None) -> dict:
    c = client or httpx
    r = c.get(base_url + "/api/v1/query", params={"query": query, "time": time_s}, timeout=300)
    r.raise_for_status()
    return r.json()["data"]


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    if a == b:
        return True
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)
