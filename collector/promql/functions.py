"""PromQL function calls: range functions (via windows.py) and instant-vector functions."""

from __future__ import annotations

import re

import numpy as np
import promql_parser as pp

from . import windows
from .histograms import histogram_fraction, histogram_quantile
from .values import (NAME, PromQLError, RangeVector, Scalar, Vector, drop_name, format_value, label_key,
                     merge_same_labels)



def _sgn(x):
    return np.sign(x)


MATH = {
    "abs": np.abs, "ceil": np.ceil, "floor": np.floor, "exp": np.exp, "sqrt": np.sqrt,
    "ln": np.log, "log2": np.log2, "log10": np.log10, "sgn": _sgn,
    "sin": np.sin, "cos": np.cos, "tan": np.tan, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan,
    "sinh": np.sinh, "cosh": np.cosh, "tanh": np.tanh, "asinh": np.arcsinh, "acosh": np.arccosh,
    "atanh": np.arctanh, "deg": np.degrees, "rad": np.radians,
}

DATE = ("year", "month", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "hour", "minute")


def _date_part(name: str, seconds: np.ndarray) -> np.ndarray:
    out = np.full(seconds.shape, np.nan)
    ok = np.isfinite(seconds)
    s = np.floor(seconds[ok]).astype(np.int64)
    dt = s.astype("datetime64[s]")
    days = dt.astype("datetime64[D]")
    months = dt.astype("datetime64[M]")
    years = dt.astype("datetime64[Y]")
    if name == "year":
        res = years.astype(np.int64) + 1970
    elif name == "month":
        res = months.astype(np.int64) % 12 + 1
    elif name == "day_of_month":
        res = (days - months.astype("datetime64[D]")).astype(np.int64) + 1
    elif name == "day_of_week":
        res = (days.astype(np.int64) + 4) % 7
    elif name == "day_of_year":
        res = (days - years.astype("datetime64[D]")).astype(np.int64) + 1
    elif name == "days_in_month":
        res = ((months + 1).astype("datetime64[D]") - months.astype("datetime64[D]")).astype(np.int64)
    elif name == "hour":
        res = (s // 3600) % 24
    else:
        res = (s // 60) % 60
    out[ok] = res
    return out


def _expand(template: str, m: re.Match) -> str:
    """Go's regexp.Expand: $1, ${1}, $name, ${name}, $$."""
    out, i = [], 0
    while i < len(template):
        ch = template[i]
        if ch != "$" or i + 1 >= len(template):
            out.append(ch)
            i += 1
            continue
        nxt = template[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
            continue
        if nxt == "{":
            j = template.find("}", i + 2)
            name = template[i + 2:j] if j > 0 else ""
            if j < 0 or not re.fullmatch(r"[A-Za-z0-9_]+", name):
                out.append("$")
                i += 1
                continue
            i = j + 1
        else:
            mm = re.match(r"[A-Za-z0-9_]+", template[i + 1:])
            if not mm:
                out.append("$")
                i += 1
                continue
            name = mm.group(0)
            i += 1 + len(name)
        if name.isdigit():
            idx = int(name)
            out.append((m.group(idx) or "") if idx <= (m.re.groups or 0) else "")
        else:
            out.append((m.groupdict().get(name) or "") if name in m.re.groupindex else "")
    return "".join(out)


def _scope_inline_flags(pattern: str) -> str:
    """RE2 allows `(?i)` anywhere, applying to the rest of the enclosing group; Python only at
    the start. Rewrite each such flag group as a scoped `(?i:...)` closed with its group."""
    out: list[str] = []
    closers: list[int] = []      # per open group: how many scoped groups to close with it
    closers.append(0)
    i = 0
    in_class = False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
            out.append(ch)
            i += 1
            continue
        if ch == "[":
            in_class = True
            out.append(ch)
            i += 1
            if i < len(pattern) and pattern[i] == "]":
                out.append("]")
                i += 1
            continue
        m = re.match(r"\(\?([a-zA-Z-]+)\)", pattern[i:])
        if m and i > 0:
            out.append(f"(?{m.group(1)}:")
            closers[-1] += 1
            i += len(m.group(0))
            continue
        if ch == "(":
            closers.append(0)
        elif ch == ")" and len(closers) > 1:
            out.append(")" * closers.pop())
        out.append(ch)
        i += 1
    out.append(")" * closers[0])
    return "".join(out)


def _go_regex(pattern: str) -> re.Pattern:
    """Compile an RE2 (Go) pattern with Python's re: anchored by fullmatch, `.` matching newline
    as Prometheus' `(?s:...)` wrapping does, inline flags scoped as RE2 scopes them."""
    try:
        return re.compile(_scope_inline_flags(pattern).replace("\\z", "\\Z"), re.DOTALL)
    except re.error as exc:
        raise PromQLError(f"invalid regular expression in label_replace(): {pattern}: {exc}") from None


def _valid_label_name(name: str, ev) -> bool:
    """Prometheus 3 accepts any non-empty UTF-8 label name."""
    if not name or name in ev.invalid_utf8:
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _natural_key(s: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.findall(r"\d+|\D+", s)]


def _absent_labels(node) -> dict[str, str]:
    while isinstance(node, pp.ParenExpr):
        node = node.expr
    if isinstance(node, pp.MatrixSelector):
        node = node.vector_selector
    if not isinstance(node, pp.VectorSelector):
        return {}
    out: dict[str, str] = {}
    seen: set[str] = set()
    ms = node.matchers
    if ms.or_matchers:
        return {}
    for m in ms.matchers:
        if m.name == NAME:
            continue
        if str(m.op).endswith("Equal") and not str(m.op).endswith("NotEqual") and m.name not in seen:
            out[m.name] = m.value
        else:
            out.pop(m.name, None)
        seen.add(m.name)
    return out


def _scalar_arg(ev, node, times) -> np.ndarray:
    val = ev.eval(node, times)
    if isinstance(val, Scalar):
        return val.values
    raise PromQLError("expected scalar argument")


def call(ev, node, times):
    name = node.func.name
    args = list(node.args)
    T = len(times)

    if name in windows.FAST or name in windows.SIMPLE:
        nparams = windows.SIMPLE[name][2] if name in windows.SIMPLE else 0
        # quantile_over_time(q, v) has the scalar first; predict_linear(v, t) and
        # double_exponential_smoothing(v, sf, tf) have it after.
        if name == "quantile_over_time":
            params = [_scalar_arg(ev, args[0], times)]
            rng_node = args[1]
        else:
            rng_node = args[0]
            params = [_scalar_arg(ev, a, times) for a in args[1:1 + nparams]]
            if name == "predict_linear":
                params.append(times.astype(float))
        rv = ev.eval(rng_node, times)
        if not isinstance(rv, RangeVector):
            raise PromQLError(f"expected range vector argument to {name}")
        if name == "quantile_over_time":
            q = params[0]
            if np.isnan(q).any() or (q < 0).any() or (q > 1).any():
                bad = q[np.isnan(q) | (q < 0) | (q > 1)][0]
                ev.warnings.append(f"PromQL warning: quantile value should be between 0 and 1, got {format_value(float(bad))}")
        fn, min_samples, _ = windows.SIMPLE.get(name, (None, 1, 0))
        if name in ("rate", "increase", "irate"):
            for lb in rv.labels:
                metric = lb.get(NAME, "")
                if metric and not metric.endswith(("_total", "_sum", "_count", "_bucket")):
                    ev.infos.append('PromQL info: metric might not be a counter, name does not end in either '
                                    f'"_total", "_sum", "_count", or "_bucket": "{metric}"')
                    break
        lo, hi = rv.windows()
        # Every sample of every window is touched once per step: count it like Prometheus does.
        ev.count_samples(int((hi - lo).sum()))
        quick = windows.fast(name, rv, params)
        if quick is not None:
            values, present = quick
        else:
            values, present = windows.apply(rv, fn, min_samples=min_samples, params=params)
        vec = Vector(rv.labels, values, present).drop_empty()
        if name in windows.KEEP_NAME:
            return vec
        return drop_name(vec)

    if name in ("absent_over_time", "absent"):
        val = ev.eval(args[0], times)
        if isinstance(val, RangeVector):
            lo, hi = val.windows()
            any_present = (hi > lo).any(axis=0) if len(val.labels) else np.zeros(T, dtype=bool)
        else:
            any_present = val.present.any(axis=0) if len(val) else np.zeros(T, dtype=bool)
        return Vector([_absent_labels(args[0])], np.ones((1, T)), ~any_present[None, :]).drop_empty()

    if name == "time":
        return Scalar(times / 1000.0)
    if name == "step":
        return Scalar(np.full(T, ev.step_ms / 1000.0))
    if name == "start":
        return Scalar(np.full(T, ev.start_ms / 1000.0))
    if name == "end":
        return Scalar(np.full(T, ev.end_ms / 1000.0))
    if name == "range":
        return Scalar(np.full(T, (ev.end_ms - ev.start_ms) / 1000.0))
    if name in ("min_of", "max_of"):
        a, b = _scalar_arg(ev, args[0], times), _scalar_arg(ev, args[1], times)
        return Scalar(np.minimum(a, b) if name == "min_of" else np.maximum(a, b))
    if name == "pi":
        return Scalar(np.full(T, np.pi))

    if name == "vector":
        s = _scalar_arg(ev, args[0], times)
        return Vector([{}], s[None, :].copy(), np.ones((1, T), dtype=bool))

    if name == "scalar":
        vec = ev.eval(args[0], times)
        count = vec.present.sum(axis=0) if len(vec) else np.zeros(T, dtype=int)
        if len(vec) == 0:
            return Scalar(np.full(T, np.nan))
        pick = vec.present.argmax(axis=0)
        vals = vec.values[pick, np.arange(T)]
        return Scalar(np.where(count == 1, vals, np.nan))

    if name in DATE:
        if args:
            vec = ev.eval(args[0], times)
            return drop_name(Vector(vec.labels, _date_part(name, vec.values), vec.present))
        return Vector([{}], _date_part(name, times / 1000.0)[None, :], np.ones((1, T), dtype=bool))

    if name == "timestamp":
        ev.want_sample_ts, before = True, ev.want_sample_ts
        try:
            vec = ev.eval(args[0], times)
        finally:
            ev.want_sample_ts = before
        if vec.sample_ts is not None:
            vals = vec.sample_ts / 1000.0
        else:
            vals = np.broadcast_to(times / 1000.0, vec.values.shape).copy()
        return drop_name(Vector(vec.labels, vals, vec.present))

    if name in MATH:
        vec = ev.eval(args[0], times)
        with np.errstate(all="ignore"):
            vals = MATH[name](vec.values)
        return drop_name(Vector(vec.labels, vals, vec.present))

    if name == "round":
        vec = ev.eval(args[0], times)
        to = _scalar_arg(ev, args[1], times) if len(args) > 1 else np.ones(T)
        with np.errstate(all="ignore"):
            inv = 1.0 / to
            vals = np.floor(vec.values * inv + 0.5) / inv
        return drop_name(Vector(vec.labels, vals, vec.present))

    if name in ("clamp", "clamp_min", "clamp_max"):
        vec = ev.eval(args[0], times)
        if name == "clamp":
            lo, hi = _scalar_arg(ev, args[1], times), _scalar_arg(ev, args[2], times)
        elif name == "clamp_min":
            lo, hi = _scalar_arg(ev, args[1], times), np.full(T, np.inf)
        else:
            lo, hi = np.full(T, -np.inf), _scalar_arg(ev, args[1], times)
        vals = np.maximum(lo, np.minimum(hi, vec.values))
        present = vec.present & ~(hi < lo)[None, :] if name == "clamp" else vec.present
        return drop_name(Vector(vec.labels, vals, present).drop_empty())

    if name == "label_replace":
        vec = ev.eval(args[0], times)
        dst, repl, src, regex = (ev.eval(a, times).value for a in args[1:5])
        pattern = _go_regex(regex)
        if not _valid_label_name(dst, ev):
            raise PromQLError(f"invalid destination label name in label_replace(): {dst}")
        labels = []
        for lb in vec.labels:
            m = pattern.fullmatch(lb.get(src, ""))
            if m is None:
                labels.append(lb)
                continue
            new = dict(lb)
            value = _expand(repl, m)
            if value:
                new[dst] = value
            else:
                new.pop(dst, None)
            labels.append(new)
        return merge_same_labels(Vector(labels, vec.values, vec.present, vec.sample_ts))

    if name == "label_join":
        vec = ev.eval(args[0], times)
        strs = [ev.eval(a, times).value for a in args[1:]]
        dst, sep, srcs = strs[0], strs[1], strs[2:]
        if not _valid_label_name(dst, ev):
            raise PromQLError(f"invalid destination label name in label_join(): {dst}")
        for s in srcs:
            if not _valid_label_name(s, ev):
                raise PromQLError(f"invalid source label name in label_join(): {s}")
        labels = []
        for lb in vec.labels:
            new = dict(lb)
            value = sep.join(lb.get(s, "") for s in srcs)
            if value:
                new[dst] = value
            else:
                new.pop(dst, None)
            labels.append(new)
        return merge_same_labels(Vector(labels, vec.values, vec.present, vec.sample_ts))

    if name in ("sort", "sort_desc"):
        vec = ev.eval(args[0], times)
        if T == 1 and len(vec):
            v = vec.values[:, 0]
            nan = np.isnan(v)
            key = np.where(nan, 0, v if name == "sort" else -v)
            order = np.lexsort((key, nan))
            vec = vec.take(order)
        return Vector(vec.labels, vec.values, vec.present)

    if name in ("sort_by_label", "sort_by_label_desc"):
        vec = ev.eval(args[0], times)
        names = [ev.eval(a, times).value for a in args[1:]]
        keys = [([_natural_key(lb.get(n, "")) for n in names], label_key(lb)) for lb in vec.labels]
        order = sorted(range(len(vec)), key=lambda i: keys[i], reverse=name.endswith("desc"))
        return vec.take(order) if len(vec) else vec

    if name == "histogram_quantile":
        q = _scalar_arg(ev, args[0], times)
        return histogram_quantile(ev, q, ev.eval(args[1], times))

    if name == "histogram_quantiles":
        vec = ev.eval(args[0], times)
        label = ev.eval(args[1], times).value
        parts = []
        for a in args[2:]:
            q = _scalar_arg(ev, a, times)
            res = histogram_quantile(ev, q, vec)
            qs = repr(float(q[0])) if np.isfinite(q[0]) else format_value(float(q[0]))
            parts.append(Vector([{**lb, label: qs} for lb in res.labels], res.values, res.present))
        if not parts:
            return Vector.empty(T)
        return merge_same_labels(Vector([lb for v in parts for lb in v.labels],
                                        np.concatenate([v.values for v in parts]),
                                        np.concatenate([v.present for v in parts])))

    if name == "histogram_fraction":
        lower = _scalar_arg(ev, args[0], times)
        upper = _scalar_arg(ev, args[1], times)
        return histogram_fraction(ev, lower, upper, ev.eval(args[2], times))

    if name.startswith("histogram_"):
        # The other histogram_* functions only apply to native histograms, which this
        # store does not hold: over float series they return nothing (as Prometheus does).
        ev.eval(args[-1], times)
        return Vector.empty(T)

    raise PromQLError(f"function {name!r} is not supported")

