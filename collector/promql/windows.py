"""Functions over range vectors (rate, *_over_time, ...), vectorised over every window at once.

Each window (series i, step j) is a slice [lo, hi) of the flat sample arrays. The windows are
gathered into a padded (rows, W) matrix — W the largest window — so one numpy expression
computes a function for every window of a chunk of rows; padding is masked out. Chunks keep the
gathered matrix within a fixed number of cells whatever the query size.
"""

from __future__ import annotations

import numpy as np

from .values import PromQLError, RangeVector

CHUNK_CELLS = 4_000_000


def _gather(rv: RangeVector, lo: np.ndarray, hi: np.ndarray):
    """Yield (rows, X, TS, M): gathered values, timestamps and validity for row slices."""
    n = lo.size
    flat_lo, flat_hi = lo.ravel(), hi.ravel()
    width = int((flat_hi - flat_lo).max()) if n else 0
    width = max(width, 1)
    per = max(1, CHUNK_CELLS // width)
    cols = np.arange(width)
    last = max(len(rv.values) - 1, 0)
    for start in range(0, n, per):
        stop = min(n, start + per)
        idx = flat_lo[start:stop, None] + cols
        valid = idx < flat_hi[start:stop, None]
        idx = np.minimum(idx, last)
        if len(rv.values):
            X = rv.values[idx]
            TS = rv.ts[idx]
        else:
            X = np.zeros(idx.shape)
            TS = np.zeros(idx.shape, dtype=np.int64)
        yield slice(start, stop), X, TS, valid


def apply(rv: RangeVector, fn, *, min_samples: int = 1, params: list | None = None):
    """Run fn(X, TS, M, count, params_for_rows, ends_for_rows) over all windows.

    Returns (values, present) of shape (S, T); a window with fewer than min_samples samples
    yields no output. `params` are per-step arrays (T,) broadcast to rows.
    """
    lo, hi = rv.windows()
    S, T = lo.shape
    out = np.full(S * T, np.nan)
    count = (hi - lo).ravel()
    ends = np.broadcast_to(rv.ends, (S, T)).ravel()
    flat_params = [np.broadcast_to(p, (S, T)).ravel() for p in (params or [])]
    for rows, X, TS, M in _gather(rv, lo, hi):
        c = count[rows]
        with np.errstate(all="ignore"):
            out[rows] = fn(X, TS, M, c, [p[rows] for p in flat_params], ends[rows])
    present = count >= min_samples
    return out.reshape(S, T), present.reshape(S, T)


def _first_last(X, TS, M, c):
    rows = np.arange(len(c))
    last = np.maximum(c - 1, 0)
    return X[:, 0], X[rows, last], TS[:, 0], TS[rows, last], rows, last


def kahan_sum(X, M):
    """Kahan-Babuska summation along axis 1 (Prometheus sums with it since 3.0)."""
    Z = np.where(M, X, 0.0)
    s = np.zeros(len(Z))
    comp = np.zeros(len(Z))
    if Z.shape[1] > 64:
        # Wide windows: a plain pairwise sum is accurate enough and much faster.
        return Z.sum(axis=1)
    for k in range(Z.shape[1]):
        x = Z[:, k]
        t = s + x
        big = np.abs(s) >= np.abs(x)
        comp += np.where(big, (s - t) + x, (x - t) + s)
        s = t
    # Infinite sums make the compensation NaN; Prometheus returns the plain sum then.
    res = s + comp
    return np.where(np.isinf(s), s, res)


def sum_over_time(X, TS, M, c, p, e):
    return kahan_sum(X, M)


def avg_over_time(X, TS, M, c, p, e):
    s = kahan_sum(X, M)
    res = s / c
    # On overflow to +-Inf Prometheus switches to an incremental mean; emulate via scaled sum.
    over = np.isinf(s) & ~np.isinf(np.where(M, X, 0)).any(axis=1)
    if over.any():
        res[over] = (np.where(M[over], X[over] / c[over, None], 0)).sum(axis=1)
    return res


def _masked_extreme(X, M, fill, op):
    Z = np.where(M, X, fill)
    res = op.reduce(Z, axis=1)
    allnan = ~(M & ~np.isnan(X)).any(axis=1)
    return np.where(allnan, np.nan, res)


def min_over_time(X, TS, M, c, p, e):
    return _masked_extreme(X, M, np.inf, np.fmin)


def max_over_time(X, TS, M, c, p, e):
    return _masked_extreme(X, M, -np.inf, np.fmax)


def welford(X, M):
    """Mean and variance along axis 1 the way Prometheus accumulates them (Welford's update,
    Kahan-compensated), so constant inputs give exactly 0 and large offsets stay accurate."""
    rows = X.shape[0]
    count = np.zeros(rows)
    mean = np.zeros(rows)
    c_mean = np.zeros(rows)
    aux = np.zeros(rows)
    c_aux = np.zeros(rows)
    for k in range(X.shape[1]):
        m = M[:, k]
        if not m.any():
            continue
        x = np.where(m, X[:, k], 0.0)
        cnt = count + m
        delta = x - (mean + c_mean)
        step = np.where(m, delta / np.maximum(cnt, 1), 0.0)
        mean, c_mean = _kahan_inc(step, mean, c_mean)
        inc = np.where(m, delta * (x - (mean + c_mean)), 0.0)
        aux, c_aux = _kahan_inc(inc, aux, c_aux)
        count = cnt
    return mean + c_mean, (aux + c_aux) / count


def _kahan_inc(inc, total, comp):
    t = total + inc
    big = np.abs(total) >= np.abs(inc)
    comp = comp + np.where(big, (total - t) + inc, (inc - t) + total)
    bad = np.isinf(t)
    return t, np.where(bad, 0.0, comp)


def stdvar_over_time(X, TS, M, c, p, e):
    return welford(X, M)[1]


def stddev_over_time(X, TS, M, c, p, e):
    return np.sqrt(stdvar_over_time(X, TS, M, c, p, e))


def quantiles(X, M, c, q):
    """Prometheus' quantile: linear interpolation between ranks q*(n-1) of the sorted values."""
    Z = np.sort(np.where(M, X, np.inf), axis=1)
    # Go's sort.Float64s puts NaN first; numpy puts it last: rotate NaNs to the front.
    nan_count = np.isnan(Z).sum(axis=1)
    if nan_count.any():
        for r in np.flatnonzero(nan_count):
            n = c[r]
            row = Z[r, :n]
            Z[r, :n] = np.concatenate([row[np.isnan(row)], row[~np.isnan(row)]])
    n = c.astype(float)
    qq = np.where(np.isnan(q), 0.0, np.clip(q, 0, 1))
    rank = qq * (n - 1)
    top = np.maximum(n - 1, 0).astype(np.int64)
    lower = np.clip(np.floor(rank), 0, top).astype(np.int64)
    upper = np.minimum(lower + 1, top)
    weight = rank - np.floor(rank)
    rows = np.arange(len(c))
    res = Z[rows, lower] * (1 - weight) + Z[rows, upper] * weight
    res = np.where(weight == 0, Z[rows, lower], res)
    res = np.where(q < 0, -np.inf, res)
    res = np.where(q > 1, np.inf, res)
    return np.where(np.isnan(q), np.nan, res)


def quantile_over_time(X, TS, M, c, p, e):
    return quantiles(X, M, c, p[0])


def mad_over_time(X, TS, M, c, p, e):
    med = quantiles(X, M, c, np.full(len(c), 0.5))
    dev = np.abs(X - med[:, None])
    res = quantiles(dev, M, c, np.full(len(c), 0.5))
    return np.where((np.isnan(X) & M).any(axis=1), np.nan, res)


def _ts_of(pick):
    def fn(X, TS, M, c, p, e):
        rows = np.arange(len(c))
        if pick == "last":
            idx = np.maximum(c - 1, 0)
        elif pick == "first":
            idx = np.zeros(len(c), dtype=np.int64)
        else:
            fill = np.inf if pick == "min" else -np.inf
            Z = np.where(M & ~np.isnan(X), X, fill)
            # the last occurrence of the extreme value, as Prometheus' <= / >= scan keeps it
            rev = Z[:, ::-1]
            idx = Z.shape[1] - 1 - (rev.argmin(axis=1) if pick == "min" else rev.argmax(axis=1))
        return TS[rows, idx] / 1000.0
    return fn


def changes(X, TS, M, c, p, e):
    prev, cur = X[:, :-1], X[:, 1:]
    changed = ~((cur == prev) | (np.isnan(cur) & np.isnan(prev)))
    return (changed & M[:, 1:]).sum(axis=1).astype(float)


def resets(X, TS, M, c, p, e):
    return ((X[:, 1:] < X[:, :-1]) & M[:, 1:]).sum(axis=1).astype(float)


def _regression(X, TS, M, c, intercept_ts):
    """Least-squares slope and intercept, x in seconds relative to intercept_ts (Prometheus)."""
    x = np.where(M, (TS - intercept_ts[:, None]) / 1000.0, 0.0)
    y = np.where(M, X, 0.0)
    n = c.astype(float)
    sx, sy = x.sum(axis=1), y.sum(axis=1)
    sxy, sxx = (x * y).sum(axis=1), (x * x).sum(axis=1)
    const_y = np.all(np.where(M, X == X[:, :1], True), axis=1)
    cov = sxy - sx * sy / n
    var = sxx - sx * sx / n
    slope = cov / var
    intercept = sy / n - slope * sx / n
    slope = np.where(const_y, 0.0, slope)
    intercept = np.where(const_y, X[:, 0], intercept)
    return slope, intercept


def deriv(X, TS, M, c, p, e):
    return _regression(X, TS, M, c, TS[:, 0])[0]


def predict_linear(X, TS, M, c, p, ends):
    # Prometheus regresses around the step's own time (before @ and offset): p[1].
    slope, intercept = _regression(X, TS, M, c, p[1].astype(np.int64))
    return slope * p[0] + intercept


def double_exponential_smoothing(X, TS, M, c, p, e):
    """Holt-Winters double exponential smoothing, step by step as Prometheus does it."""
    sf, tf = p[0], p[1]
    for factor, what in ((sf, "smoothing factor"), (tf, "trend factor")):
        bad = (factor <= 0) | (factor >= 1)
        if bad.any():
            raise PromQLError(f"invalid {what}. Expected: 0 < {what[:1]}f < 1, got: {factor[bad][0]}")
    out = np.full(len(c), np.nan)
    for r in range(len(c)):
        vals = X[r, : c[r]]
        if len(vals) < 2:
            continue
        s0, s1, b = 0.0, vals[0], vals[1] - vals[0]
        for i in range(1, len(vals)):
            if i > 1:
                b = tf[r] * (s1 - s0) + (1 - tf[r]) * b
            s0, s1 = s1, sf[r] * vals[i] + (1 - sf[r]) * (s1 + b)
        out[r] = s1
    return out


def _pairs_prefix(rv: RangeVector, indicator) -> np.ndarray:
    """Inclusive prefix sums of indicator(prev, cur) over consecutive samples of one series."""
    v = rv.values
    contrib = np.zeros(len(v))
    if len(v) > 1:
        c = indicator(v[:-1], v[1:])
        # pairs that straddle two series do not count
        first_of_series = np.zeros(len(v), dtype=bool)
        first_of_series[rv.offsets[:-1][rv.offsets[:-1] < len(v)]] = True
        contrib[1:] = np.where(first_of_series[1:], 0.0, c)
    return np.cumsum(contrib)


def _sparse_table_extreme(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, op):
    """min/max over every window from a sparse table: level k holds op over [i, i + 2**k), so a
    window [lo, hi) is op(level_k[lo], level_k[hi - 2**k]) with 2**k <= hi - lo < 2**(k+1).
    fmin/fmax skip NaN unless all are NaN: Prometheus' rule for min/max_over_time."""
    cnt = hi - lo
    width = int(cnt.max()) if cnt.size else 0
    levels = [v]
    k = 1
    while (1 << k) <= width:
        prev = levels[-1]
        half = 1 << (k - 1)
        nxt = prev.copy()
        nxt[:-half] = op(prev[:-half], prev[half:])
        levels.append(nxt)
        k += 1
    present = cnt > 0
    safe = np.maximum(cnt, 1)
    lvl = np.floor(np.log2(safe)).astype(np.int64)
    out = np.empty(cnt.shape)
    last = len(v) - 1
    for k, table in enumerate(levels):
        sel = present & (lvl == k)
        if sel.any():
            a = np.minimum(lo[sel], last)
            b = np.minimum(hi[sel] - (1 << k), last)
            out[sel] = op(table[a], table[b])
    out[~present] = 0.0
    return out, present


def fast(name: str, rv: RangeVector, params: list):
    """Functions that need only the window's ends and prefix sums: no gathering.

    Returns (values, present) or None when `name` has no fast path. These are exact or
    (rate's counter-reset correction) a difference of prefix sums that holds integers and a few
    reset values, so they agree with the gathered path within far less than promqltest's 1e-6.
    """
    if name not in FAST:
        return None
    lo, hi = rv.windows()
    cnt = hi - lo
    v, ts = rv.values, rv.ts
    if len(v) == 0:
        return np.zeros(cnt.shape), np.zeros(cnt.shape, dtype=bool)
    if name in ("min_over_time", "max_over_time"):
        return _sparse_table_extreme(v, lo, hi, np.fmin if name == "min_over_time" else np.fmax)
    last = np.clip(hi - 1, 0, len(v) - 1)
    first = np.clip(lo, 0, len(v) - 1)
    with np.errstate(all="ignore"):
        if name == "count_over_time":
            return cnt.astype(float), cnt > 0
        if name == "present_over_time":
            return np.ones(cnt.shape), cnt > 0
        if name == "last_over_time":
            return v[last], cnt > 0
        if name == "first_over_time":
            return v[first], cnt > 0
        if name in ("resets", "changes"):
            if name == "resets":
                pref = _pairs_prefix(rv, lambda a, b: (b < a).astype(float))
            else:
                pref = _pairs_prefix(rv, lambda a, b: (~((a == b) | (np.isnan(a) & np.isnan(b)))).astype(float))
            return np.where(cnt > 0, pref[last] - pref[first], 0.0), cnt > 0
        if name in ("irate", "idelta"):
            prev = np.clip(hi - 2, 0, len(v) - 1)
            lv, pv = v[last], v[prev]
            if name == "idelta":
                return lv - pv, cnt >= 2
            dt = (ts[last] - ts[prev]) / 1000.0
            return np.where(lv < pv, lv, lv - pv) / dt, cnt >= 2
        is_counter, is_rate = EXTRAPOLATED[name]
        first_v, last_v = v[first], v[last]
        first_t, last_t = ts[first], ts[last]
        result = last_v - first_v
        if is_counter:
            pref = _pairs_prefix(rv, lambda a, b: np.where(b < a, a, 0.0))
            result = result + (pref[last] - pref[first])
        ends = np.broadcast_to(rv.ends, cnt.shape)
        c = cnt.astype(float)
        range_start = ends - rv.range_ms
        to_start = (first_t - range_start) / 1000.0
        to_end = (ends - last_t) / 1000.0
        sampled = (last_t - first_t) / 1000.0
        avg_gap = sampled / np.maximum(c - 1, 1)
        threshold = avg_gap * 1.1
        to_start = np.where(to_start >= threshold, avg_gap / 2, to_start)
        if is_counter:
            to_zero = np.where((result > 0) & (first_v >= 0), sampled * (first_v / result), to_start)
            to_start = np.minimum(to_start, to_zero)
        to_end = np.where(to_end >= threshold, avg_gap / 2, to_end)
        factor = (sampled + to_start + to_end) / sampled
        if is_rate:
            factor = factor / (rv.range_ms / 1000.0)
        return result * factor, cnt >= 2


# name -> (function, minimum samples, number of leading scalar parameters)
SIMPLE = {
    "sum_over_time": (sum_over_time, 1, 0),
    "avg_over_time": (avg_over_time, 1, 0),
    "min_over_time": (min_over_time, 1, 0),
    "max_over_time": (max_over_time, 1, 0),
    "stddev_over_time": (stddev_over_time, 1, 0),
    "stdvar_over_time": (stdvar_over_time, 1, 0),
    "quantile_over_time": (quantile_over_time, 1, 1),
    "mad_over_time": (mad_over_time, 1, 0),
    "deriv": (deriv, 2, 0),
    "predict_linear": (predict_linear, 2, 1),
    "ts_of_min_over_time": (_ts_of("min"), 1, 0),
    "ts_of_max_over_time": (_ts_of("max"), 1, 0),
    "ts_of_first_over_time": (_ts_of("first"), 1, 0),
    "ts_of_last_over_time": (_ts_of("last"), 1, 0),
    "double_exponential_smoothing": (double_exponential_smoothing, 2, 2),
}
EXTRAPOLATED = {"rate": (True, True), "increase": (True, False), "delta": (False, False)}
# Computed from window ends and prefix sums only (see fast()): no gathering needed.
FAST = {"rate", "increase", "delta", "irate", "idelta", "count_over_time", "last_over_time",
        "present_over_time", "resets", "changes", "first_over_time", "min_over_time", "max_over_time"}
# Functions over a range vector that keep the metric name.
KEEP_NAME = {"last_over_time", "first_over_time"}
