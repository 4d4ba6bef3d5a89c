"""Classic-histogram functions: histogram_quantile and histogram_fraction over `le` buckets.

Native histograms are not stored by the collector; these work on the conventional
`<name>_bucket{le="..."}` series, following Prometheus' bucketQuantile (promql/quantile.go):
buckets sorted by upper bound, equal bounds merged, counts forced monotonic, linear
interpolation inside the bucket where the rank falls.
"""

from __future__ import annotations

import math

import numpy as np

from .values import NAME, Vector, format_value, label_key

SMALL_DELTA = 1e-12


def _parse_le(v: str | None) -> float | None:
    if v is None:
        return None
    try:
        return float(v.strip().replace("Inf", "inf"))
    except ValueError:
        return None


def _almost_equal(a: float, b: float, eps: float) -> bool:
    if a == b:
        return True
    diff = abs(a - b)
    s = abs(a) + abs(b)
    if a == 0 or b == 0 or s < 2.2250738585072014e-308:
        return diff < eps * 2.2250738585072014e-308
    return diff / min(s, 1.7976931348623157e308) < eps


def _prepare(bounds: list[float], counts: list[float]):
    """Sort, merge equal bounds, force monotonic counts. Returns (bounds, counts, forced)."""
    pairs = sorted(zip(bounds, counts), key=lambda p: p[0])
    merged: list[list[float]] = []
    for b, c in pairs:
        if merged and merged[-1][0] == b:
            merged[-1][1] += c
        else:
            merged.append([b, c])
    forced = False
    prev = merged[0][1] if merged else 0.0
    for i in range(1, len(merged)):
        cur = merged[i][1]
        if cur == prev:
            continue
        if _almost_equal(prev, cur, SMALL_DELTA):
            merged[i][1] = prev
            continue
        if cur < prev:
            merged[i][1] = prev
            forced = True
            continue
        prev = cur
    return [m[0] for m in merged], [m[1] for m in merged], forced


def bucket_quantile(q: float, bounds: list[float], counts: list[float]):
    if math.isnan(q):
        return math.nan, False
    if q < 0:
        return -math.inf, False
    if q > 1:
        return math.inf, False
    order = sorted(range(len(bounds)), key=lambda i: bounds[i])
    if not order or not math.isinf(bounds[order[-1]]) or bounds[order[-1]] < 0:
        return math.nan, False
    b, c, forced = _prepare(bounds, counts)
    if len(b) < 2:
        return math.nan, forced
    observations = c[-1]
    if observations == 0 or math.isnan(observations):
        return math.nan, forced
    rank = q * observations
    idx = len(b) - 1
    for i in range(len(b) - 1):
        if c[i] >= rank:
            idx = i
            break
    if idx == len(b) - 1:
        return b[-2], forced
    if idx == 0 and b[0] <= 0:
        return b[0], forced
    start, end, count = 0.0, b[idx], c[idx]
    if idx > 0:
        start = b[idx - 1]
        count -= c[idx - 1]
        rank -= c[idx - 1]
    return start + (end - start) * (rank / count), forced


def bucket_fraction(lower: float, upper: float, bounds: list[float], counts: list[float]) -> float:
    """Fraction of observations in [lower, upper], interpolating linearly inside buckets.

    The first bucket starts at 0 when its bound is positive and at -Inf otherwise; buckets of
    infinite width contribute only when they lie wholly inside [lower, upper].
    """
    order = sorted(range(len(bounds)), key=lambda i: bounds[i])
    if not order or not math.isinf(bounds[order[-1]]):
        return math.nan
    b, c, _ = _prepare(bounds, counts)
    total = c[-1]
    if math.isnan(lower) or math.isnan(upper) or total == 0 or math.isnan(total):
        return math.nan
    if lower >= upper:
        return 0.0
    inside, prev_c = 0.0, 0.0
    prev_b = 0.0 if b[0] > 0 else -math.inf
    for bound, cnt in zip(b, c):
        n = cnt - prev_c
        lo, hi = max(prev_b, lower), min(bound, upper)
        if prev_b >= lower and bound <= upper:
            inside += n
        elif math.isinf(bound) and math.isinf(upper) and upper > 0 and lower < math.inf:
            inside += n     # the +Inf bucket lies inside [lower, +Inf] whatever lower is
        elif math.isinf(prev_b) and math.isinf(lower) and lower < 0 and upper > -math.inf:
            inside += n
        elif hi > lo and not (math.isinf(prev_b) or math.isinf(bound)):
            inside += n * (hi - lo) / (bound - prev_b)
        prev_b, prev_c = bound, cnt
    return inside / total


def _groups(vec: Vector):
    groups: dict[tuple, tuple[dict, list[tuple[int, float]]]] = {}
    bad = []
    for i, lb in enumerate(vec.labels):
        le = _parse_le(lb.get("le"))
        if le is None:
            bad.append(i)
            continue
        g = {k: v for k, v in lb.items() if k not in ("le", NAME)}
        k = label_key(g)
        groups.setdefault(k, (g, []))[1].append((i, le))
    return groups, bad


def _per_bucket_group(vec: Vector, groups: dict, at_step) -> Vector:
    """Apply at_step(t, les, counts) -> float to each histogram's present buckets at each step."""
    T = vec.values.shape[1]
    labels, vals, pres = [], [], []
    for g, members in groups.values():
        rows = [i for i, _ in members]
        les = [le for _, le in members]
        V, P = vec.values[rows], vec.present[rows]
        out = np.zeros(T)
        ok = P.any(axis=0)
        for t in np.flatnonzero(ok):
            sel = P[:, t]
            out[t] = at_step(t, [le for le, s in zip(les, sel) if s], list(V[sel, t]))
        labels.append(g)
        vals.append(out)
        pres.append(ok)
    if not labels:
        return Vector.empty(T)
    return Vector(labels, np.array(vals), np.array(pres)).drop_empty()


def histogram_quantile(ev, q: np.ndarray, vec: Vector) -> Vector:
    groups, bad = _groups(vec)
    if bad:
        name = vec.labels[bad[0]].get(NAME, "")
        ev.infos.append(f'PromQL info: bucket label "le" is missing or has a malformed value of '
                        f'"{vec.labels[bad[0]].get("le", "")}" for metric name "{name}"')

    def at_step(t, les, counts):
        value, forced = bucket_quantile(float(q[t]), les, counts)
        if forced:
            ev.infos.append("PromQL info: input to histogram_quantile needed to be fixed for monotonicity")
        return value

    result = _per_bucket_group(vec, groups, at_step)
    if ((q < 0) | (q > 1) | np.isnan(q)).any():
        bad_q = q[(q < 0) | (q > 1) | np.isnan(q)][0]
        ev.warnings.append(f"PromQL warning: quantile value should be between 0 and 1, got {format_value(float(bad_q))}")
    return result


def histogram_fraction(ev, lower: np.ndarray, upper: np.ndarray, vec: Vector) -> Vector:
    groups, _ = _groups(vec)
    return _per_bucket_group(
        vec, groups, lambda t, les, counts: bucket_fraction(float(lower[t]), float(upper[t]), les, counts))
