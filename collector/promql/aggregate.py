"""Aggregation operators (sum, avg, topk, quantile, count_values, limitk, ...), all steps at once.

Series are grouped once (labels do not change between steps); each group's (n x T) matrix is
reduced with numpy, so a range query costs one reduction per group, not one per step.
"""

from __future__ import annotations

import numpy as np

from .values import NAME, PromQLError, Scalar, String, Vector, format_value, label_key
from .windows import kahan_sum, quantiles, welford
from .xxhash import xxh64


def _group_labels(mod, labels: dict[str, str]) -> dict[str, str]:
    if mod is None:
        return {}
    names = list(mod.labels)
    if str(mod.type).endswith("Without"):
        drop = set(names) | {NAME}
        return {k: v for k, v in labels.items() if k not in drop}
    return {k: labels[k] for k in names if labels.get(k)}


def aggregate(ev, node, times):
    op = str(node.op).lower()
    T = len(times)
    param = None
    if node.param is not None:
        param = ev.eval(node.param, times)
    vec = ev.eval(node.expr, times)
    if not isinstance(vec, Vector):
        raise PromQLError(f"expected instant vector in aggregation {op}")
    mod = node.modifier
    groups: dict[tuple, list[int]] = {}
    glabels: dict[tuple, dict[str, str]] = {}
    for i, lb in enumerate(vec.labels):
        g = _group_labels(mod, lb)
        k = label_key(g)
        groups.setdefault(k, []).append(i)
        glabels[k] = g

    if op in ("topk", "bottomk", "limitk", "limit_ratio"):
        return _select(ev, op, vec, groups, param, T)
    if op == "count_values":
        return _count_values(vec, groups, glabels, param, T)
    if op == "quantile":
        q = param.values
        if np.isnan(q).any() or (q < 0).any() or (q > 1).any():
            bad = q[np.isnan(q) | (q < 0) | (q > 1)][0]
            ev.warnings.append(f"PromQL warning: quantile value should be between 0 and 1, got {format_value(float(bad))}")

    out_labels, out_vals, out_pres = [], [], []
    for k, rows in groups.items():
        V = vec.values[rows]
        P = vec.present[rows]
        n = P.sum(axis=0)
        present = n > 0
        with np.errstate(all="ignore"):
            if op == "sum":
                val = kahan_sum(V.T, P.T)
            elif op == "avg":
                s = kahan_sum(V.T, P.T)
                val = s / n
                over = np.isinf(s) & ~np.isinf(np.where(P, V, 0)).any(axis=0)
                if over.any():
                    val[over] = np.where(P[:, over], V[:, over] / n[over], 0).sum(axis=0)
            elif op == "count":
                val = n.astype(float)
            elif op == "group":
                val = np.ones(T)
            elif op in ("min", "max"):
                fill, red = (np.inf, np.fmin) if op == "min" else (-np.inf, np.fmax)
                val = red.reduce(np.where(P, V, fill), axis=0)
                allnan = ~(P & ~np.isnan(V)).any(axis=0)
                val = np.where(allnan, np.nan, val)
            elif op in ("stddev", "stdvar"):
                var = welford(V.T, P.T)[1]
                val = np.sqrt(var) if op == "stddev" else var
            elif op == "quantile":
                val = quantiles(V.T, P.T, n, param.values)
            else:
                raise PromQLError(f"unsupported aggregation {op!r}")
        out_labels.append(glabels[k])
        out_vals.append(np.where(present, val, 0.0))
        out_pres.append(present)
    if not out_labels:
        return Vector.empty(T)
    return Vector(out_labels, np.array(out_vals, dtype=float), np.array(out_pres, dtype=bool)).drop_empty()


def _k_param(param, T, what="Parameter") -> np.ndarray:
    if not isinstance(param, Scalar):
        raise PromQLError("expected scalar parameter")
    k = param.values
    if np.isnan(k).any():
        raise PromQLError(f"{what} value is NaN")
    return k


def _select(ev, op, vec: Vector, groups, param, T) -> Vector:
    """topk / bottomk / limitk / limit_ratio: keep the input series' labels, filter per step."""
    keep = np.zeros_like(vec.present)
    if op == "limit_ratio":
        r = _k_param(param, T, "Ratio")
        if ((r < -1) | (r > 1)).any():
            bad = r[(r < -1) | (r > 1)][0]
            ev.warnings.append(f"PromQL warning: ratio value should be between -1 and 1, got {bad:g}, capping to {max(-1, min(1, bad)):g}")
        r = np.clip(r, -1, 1)
        offsets = np.array([xxh64_labels(lb) / float(2 ** 64) for lb in vec.labels])
        if len(offsets):
            sel = np.where(r[None, :] >= 0, offsets[:, None] < r[None, :], offsets[:, None] >= 1.0 + r[None, :])
            keep = vec.present & sel
        return Vector(vec.labels, vec.values, keep).drop_empty()
    k = _k_param(param, T)
    k = np.clip(k, -1, 2 ** 62).astype(np.int64)
    order_rows: list[int] = []
    for rows in groups.values():
        rows = np.asarray(rows)
        V = vec.values[rows]
        P = vec.present[rows]
        if op == "limitk":
            rank = np.cumsum(P, axis=0)
            keep[rows] = P & (rank <= k[None, :])
            order_rows.extend(rows)
            continue
        nan = np.isnan(V)
        # Sort key per step: NaN last for both; absent after everything.
        key = np.where(nan, np.inf, -V if op == "topk" else V)
        # One sort for all steps: by presence, then NaN last, then value; ties keep input order.
        tie = np.broadcast_to(np.arange(len(rows))[:, None], V.shape)
        idx = np.lexsort((tie, key, nan, ~P), axis=0)
        ranks = np.empty_like(idx)
        np.put_along_axis(ranks, idx, np.arange(len(rows))[:, None].repeat(T, axis=1), axis=0)
        keep[rows] = P & (ranks < k[None, :])
        if T == 1:
            order_rows.extend(rows[idx[:, 0]])
        else:
            order_rows.extend(rows)
    out = Vector(vec.labels, vec.values, keep, vec.sample_ts)
    if T == 1 and order_rows:
        out = out.take(order_rows)
    return out.drop_empty()


def _count_values(vec: Vector, groups, glabels, param, T) -> Vector:
    if not isinstance(param, String):
        raise PromQLError("expected string parameter in count_values")
    label = param.value
    if not label:
        raise PromQLError(f"invalid label name {label!r}")
    series: dict[tuple, int] = {}
    labels_out: list[dict[str, str]] = []
    counts: list[np.ndarray] = []
    for k, rows in groups.items():
        V = vec.values[rows]
        P = vec.present[rows]
        for t in range(T):
            for v in V[P[:, t], t]:
                lb = dict(glabels[k])
                lb[label] = format_value(float(v))
                key = label_key(lb)
                if key not in series:
                    series[key] = len(labels_out)
                    labels_out.append(lb)
                    counts.append(np.zeros(T))
                counts[series[key]][t] += 1
    if not labels_out:
        return Vector.empty(T)
    C = np.array(counts)
    return Vector(labels_out, C, C > 0)


def xxh64_labels(labels: dict[str, str]) -> int:
    """Prometheus' labels.Hash(): xxhash64 of name 0xff value 0xff ... in label-name order."""
    buf = bytearray()
    for k, v in sorted(labels.items()):
        buf += k.encode() + b"\xff" + v.encode() + b"\xff"
    return xxh64(bytes(buf))
