"""PromQL evaluation over the DuckDB store, with Prometheus 3.x semantics.

The query is parsed by `promql_parser` (the Rust promql-parser crate's binding) and evaluated
bottom-up over *all steps at once*: every node gets the array of evaluation timestamps and returns
a Scalar (T,), an instant Vector (S x T matrices) or a RangeVector (flat samples + per-step
windows). Series selection and time slicing are pushed into DuckDB (Store.select_series /
Store.fetch); everything above that is numpy over whole matrices.

Entry points: Engine(store, limits).instant(query, time_s) and .range(query, start, end, step).
"""

from __future__ import annotations

import heapq
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import promql_parser as pp

from collector.store.core import Matcher, hour_of

from . import functions
from .aggregate import aggregate
from .values import (NAME, PromQLError, RangeVector, Scalar, String, Vector, drop_name, label_key,
                     merge_same_labels, format_value)

DEFAULT_LOOKBACK_S = 300.0
DEFAULT_SUBQUERY_STEP_MS = 60_000   # Prometheus' default evaluation interval for `[r:]`
SERIES_CACHE_ENTRIES = 512          # selector -> selected series, shared by the engine's queries
SMALL_READ_ROWS = 20_000             # Evaluation.load: fetchnumpy below, Arrow above


@dataclass
class Limits:
    """Per-query limits (the collector config's `query` section)."""

    timeout_s: float = 120.0
    max_samples: int = 50_000_000
    max_points_per_series: int = 11_000
    lookback_delta_s: float = DEFAULT_LOOKBACK_S

    @classmethod
    def from_config(cls, section: Any) -> "Limits":
        if section is None:
            return cls()
        if isinstance(section, Limits):
            return section
        known = {f: section[f] for f in cls.__dataclass_fields__ if f in section}
        unknown = set(section) - set(known)
        if unknown:
            raise ValueError(f"query: unknown settings {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        for name, value in known.items():
            # Values may come from YAML or from environment overrides (strings, "5m").
            if name.endswith("_s"):
                from collector.config import parse_duration
                known[name] = parse_duration(value, f"query.{name}")
            else:
                known[name] = int(value)
        lim = cls(**known)
        if lim.timeout_s <= 0 or lim.max_samples <= 0 or lim.max_points_per_series <= 0 or lim.lookback_delta_s <= 0:
            raise ValueError("query: limits must be positive")
        return lim


@dataclass
class Result:
    """A query answer. type: vector | matrix | scalar | string.

    vector: list of (labels, value) at `time_s`; matrix: list of (labels, ts_ms array, values);
    scalar: float at time_s; string: str at time_s.
    """

    type: str
    value: Any
    time_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- parsing

_NEG_AT = re.compile(r"@\s*-\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)")
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NEG_AT_BASE_S = 100_000_000_000


_GO_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[0-7]{3}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL)
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def invalid_utf8_literals(query: str) -> frozenset[str]:
    r"""The quoted string literals of `query` that Go would decode to invalid UTF-8, as the parser
    binding hands them over.

    Go's \xNN and octal escapes are single bytes, so "\xff" is the byte 0xFF, which is not a
    valid label name; the binding gives it to Python as the valid character U+00FF. Knowing
    which decoded strings came from such literals lets label_replace/label_join refuse them as
    Prometheus does."""
    found = set()
    for m in _STRINGS.finditer(query):
        literal = m.group(0)
        if literal[0] == "`" or "\\" not in literal:
            continue
        raw, text = bytearray(), []
        pos = 1
        for e in _GO_ESCAPE.finditer(literal, 1, len(literal) - 1):
            plain = literal[pos:e.start()]
            raw += plain.encode()
            text.append(plain)
            code = e.group(1)
            if code[0] == "x" or code[0] in "01234567" and len(code) == 3:
                byte = int(code[1:], 16) if code[0] == "x" else int(code, 8)
                raw.append(byte)
                text.append(chr(byte))
            else:
                ch = chr(int(code[1:], 16)) if code[0] in "uU" and len(code) > 1 else _SIMPLE_ESCAPES.get(code, code)
                raw += ch.encode()
                text.append(ch)
            pos = e.end()
        tail = literal[pos:-1]
        raw += tail.encode()
        text.append(tail)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            found.add("".join(text))
    return frozenset(found)


def parse(query: str):
    """Parse a query; returns (ast, negative-@ map).

    promql_parser converts `@ t` to a SystemTime and panics for t < 0, so negative @ values are
    swapped for placeholders far in the future before parsing and mapped back at evaluation.
    """
    neg: dict[int, int] = {}
    if "@" in query:
        parts, last = [], 0
        for m in _STRINGS.finditer(query):
            parts.append((False, query[last:m.start()]))
            parts.append((True, m.group(0)))
            last = m.end()
        parts.append((False, query[last:]))

        def swap(m):
            placeholder = _NEG_AT_BASE_S + len(neg)
            neg[placeholder * 1000] = -round(float(m.group(1)) * 1000)
            return f"@ {placeholder}"

        query = "".join(p if is_str else _NEG_AT.sub(swap, p) for is_str, p in parts)
    try:
        return pp.parse(query), neg
    except BaseException as exc:  # the binding raises ValueError, or a pyo3 PanicException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise PromQLError(f"invalid parameter \"query\": {exc}", "bad_data") from None


def _duration_ms(td) -> int:
    if td is None:
        return 0
    return round(td.total_seconds() * 1000)


ARITH = {"+", "-", "*", "/", "%", "^", "atan2"}
COMPARISON = {"==", "!=", ">", "<", ">=", "<="}
SET_OPS = {"and", "or", "unless"}


def arith(op: str, a, b):
    with np.errstate(all="ignore"):
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            return np.divide(a, b)
        if op == "%":
            return np.fmod(a, b)
        if op == "^":
            return np.power(np.asarray(a, dtype=float), b)
        if op == "atan2":
            return np.arctan2(a, b)
        if op == "==":
            return a == b
        if op == "!=":
            return a != b
        if op == ">":
            return a > b
        if op == "<":
            return a < b
        if op == ">=":
            return a >= b
        if op == "<=":
            return a <= b
    raise PromQLError(f"unknown binary operator {op!r}")


def selector_matchers(vs) -> list[list[Matcher]]:
    """Store matchers of a vector selector: one list per `or` alternative (usually one)."""
    ops = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}
    groups = []
    base = [Matcher(NAME, "=", vs.name)] if vs.name else []
    ms = vs.matchers
    alternatives = ms.or_matchers if ms.or_matchers else [ms.matchers]
    for alt in alternatives:
        group = list(base)
        for m in alt:
            group.append(Matcher(m.name, ops[str(m.op).rsplit(".", 1)[-1]], m.value))
        groups.append(group)
    return groups


# --------------------------------------------------------------------------- evaluation

class _Watchdog:
    """One thread that interrupts queries past their deadline.

    A threading.Timer per query started and stopped a thread for every evaluation (about 1 ms
    of a 10 ms alert rule, benchmarks/rules_eval.py); this thread is started once and sleeps
    until the earliest deadline.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._actions: dict[int, Any] = {}
        self._seq = 0
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, action) -> int:
        """Call action() at time.monotonic() >= deadline unless cancel(token) came first."""
        with self._cond:
            self._seq += 1
            token = self._seq
            self._actions[token] = action
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="promql-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][1] == token:
                self._cond.notify()
        return token

    def cancel(self, token: int) -> None:
        with self._cond:
            self._actions.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._actions:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                action = self._actions.pop(token, None)
            if action is not None:
                try:
                    action()
                except Exception:  # noqa: BLE001 - the query may have just finished and closed its cursor
                    pass


_WATCHDOG = _Watchdog()


class Evaluation:
    """State of one query: time range, store cursor, limits, counters."""

    def __init__(self, engine: "Engine", start_ms: int, end_ms: int, step_ms: int, neg_at: dict[int, int],
                 invalid_utf8: frozenset[str] = frozenset()):
        self.engine = engine
        self.invalid_utf8 = invalid_utf8   # string literals that are not UTF-8 in Go (label names)
        self.store = engine.store
        self.cur = engine.store.cursor()
        self.limits = engine.limits
        self.start_ms, self.end_ms, self.step_ms = start_ms, end_ms, step_ms
        self.neg_at = neg_at
        self.lookback_ms = round(self.limits.lookback_delta_s * 1000)
        self.deadline = time.monotonic() + self.limits.timeout_s
        self.samples = 0
        self.want_sample_ts = False
        self.warnings: list[str] = []
        self.infos: list[str] = []
        self._series_cache = engine.series_cache

    def run(self, ast, times: np.ndarray):
        """Evaluate the query, interrupting a DuckDB read that is still running at the deadline."""
        token = _WATCHDOG.watch(self.deadline, self.cur.interrupt)
        try:
            return self.eval(ast, times)
        except duckdb.InterruptException:
            raise PromQLError("query timed out in expression evaluation", "timeout") from None
        finally:
            _WATCHDOG.cancel(token)
            self.cur.close()

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise PromQLError("query timed out in expression evaluation", "timeout")

    def count_samples(self, n: int) -> None:
        self.samples += n
        if self.samples > self.limits.max_samples:
            raise PromQLError("query processing would load too many samples into memory in query execution")

    # ---------------------------------------------------------------- dispatch
    def eval(self, node, times: np.ndarray):
        self.check_deadline()
        kind = type(node).__name__
        method = getattr(self, "eval_" + kind, None)
        if method is None:
            raise PromQLError(f"unsupported expression type {kind}")
        return method(node, times)

    def eval_NumberLiteral(self, node, times):
        return Scalar(np.full(len(times), float(node.val)))

    def eval_StringLiteral(self, node, times):
        return String(node.val)

    def eval_ParenExpr(self, node, times):
        return self.eval(node.expr, times)

    def eval_UnaryExpr(self, node, times):
        val = self.eval(node.expr, times)
        if isinstance(val, Scalar):
            return Scalar(-val.values)
        if isinstance(val, Vector):
            return drop_name(Vector(val.labels, -val.values, val.present))
        raise PromQLError("unary expression only allowed on expressions of type scalar or instant vector")

    # ---------------------------------------------------------------- selectors
    def at_times(self, at, offset, times: np.ndarray) -> np.ndarray:
        """Evaluation timestamps after applying `@` and `offset`."""
        if at is not None:
            kind = str(at.type).rsplit(".", 1)[-1]
            if kind == "Start":
                base = self.start_ms
            elif kind == "End":
                base = self.end_ms
            else:
                base = round(at.at.timestamp() * 1000)
                base = self.neg_at.get(base, base)
            times = np.full(len(times), base, dtype=np.int64)
        return times - _duration_ms(offset)

    def select(self, vs) -> list[tuple[int, dict[str, str]]]:
        """Series of a selector, sorted by label set as Prometheus' storage returns them."""
        groups = selector_matchers(vs)
        key = tuple(tuple(g) for g in groups)
        # Series rows are never deleted and new ones only add to the count, so a cached selection
        # is valid while the store's series count is unchanged (dashboards re-ask the same ones).
        count = self.store.series_count()
        hit = self._series_cache.get(key)
        if hit is not None and hit[0] == count:
            return hit[1]
        found: dict[int, dict[str, str]] = {}
        for group in groups:
            for m in group:
                if m.op in ("=~", "!~"):
                    # DuckDB evaluates the matcher with RE2, Prometheus' regex engine: ask it.
                    try:
                        self.cur.execute("SELECT regexp_full_match('', ?)", [m.value]).fetchone()
                    except Exception as exc:  # noqa: BLE001 - duckdb raises its own error classes
                        raise PromQLError(f"invalid regular expression {m.value!r}: {exc}", "bad_data") from None
            for sid, metric, labels in self.store.select_series(group, self.cur):
                found[sid] = {NAME: metric, **labels}
        out = sorted(found.items(), key=lambda kv: label_key(kv[1]))
        with self.engine.cache_lock:
            if len(self._series_cache) >= SERIES_CACHE_ENTRIES:
                self._series_cache.pop(next(iter(self._series_cache)))
            self._series_cache[key] = (count, out)
        return out

    def load(self, series: list[tuple[int, dict]], start_ms: int, end_ms: int):
        """Samples of the series in [start_ms, end_ms]: offsets (S+1,), ts, values, stale.

        Rows come back in `series` order (label order), each series' samples sorted by time.
        DuckDB filters by series and time; the ordering is done here rather than by an ORDER BY
        (see _label_order).
        """
        ids = np.array([sid for sid, _ in series], dtype=np.int64)
        sql = ("SELECT series_id, ts, value FROM samples_by_hour "
               # The BETWEEN on series_id lets DuckDB skip row groups by their min/max statistics
               # once compaction has clustered samples by series. Compacted ts is computed (see
               # collector.store.core), so time prunes on `hour`: a 1 h panel over a 6 h store
               # read in half the CPU time.
               "WHERE series_id BETWEEN ? AND ? AND series_id IN (SELECT unnest(?::INTEGER[])) "
               "AND hour BETWEEN ? AND ? AND ts BETWEEN ? AND ?")
        params = [int(ids.min()), int(ids.max()), ids.tolist(), hour_of(start_ms), hour_of(end_ms),
                  int(start_ms), int(end_ms)]
        # Two ways out of DuckDB, each faster on its side of a few ten thousand rows (measured
        # with benchmarks/rules_eval.py and benchmarks/query.py): execute().fetchnumpy() saves the
        # relation API's second bind (~2 ms, most of a small alert-rule read), Arrow hands large
        # columns over without a per-value conversion (3x faster at a million rows). The row
        # count is guessed at one sample a minute, Prometheus' default scrape interval.
        if len(ids) * ((int(end_ms) - int(start_ms)) // 60_000 + 1) <= SMALL_READ_ROWS:
            res = self.cur.execute(sql, params).fetchnumpy()
            sids = np.asarray(res["series_id"], dtype=np.int64)
            ts = np.asarray(res["ts"], dtype=np.int64)
            values = res["value"]
            if np.ma.isMaskedArray(values):              # NULL (stale) comes back masked
                stale = np.ma.getmaskarray(values)
                values = values.filled(np.nan)
            else:
                stale = np.zeros(len(values), dtype=bool)
            values = np.asarray(values, dtype=np.float64)
        else:
            table = self.cur.sql(sql, params=params).to_arrow_table()
            sids = np.asarray(table.column("series_id").to_numpy(), dtype=np.int64)
            ts = np.asarray(table.column("ts").to_numpy(), dtype=np.int64)
            col = table.column("value")
            values = np.asarray(col.to_numpy(), dtype=np.float64)    # NULL (stale) -> NaN
            stale = col.is_null().to_numpy() if col.null_count else np.zeros(len(values), dtype=bool)
        self.count_samples(len(ts))
        return _label_order(ids, sids, ts, values, stale, int(start_ms), int(end_ms))

    def eval_VectorSelector(self, node, times):
        t = self.at_times(node.at, node.offset, times)
        series = self.select(node)
        S, T = len(series), len(times)
        if S == 0:
            return Vector.empty(T)
        offsets, ts, vals, stale = self.load(series, int(t.min()) - self.lookback_ms + 1, int(t.max()))
        if not len(ts):
            return Vector.empty(T)
        # A step picks the last sample of its lookback window (t - lookback, t]: the windows are
        # found as a range selector's are, by counting (RangeVector.windows).
        lo, hi = RangeVector([lb for _, lb in series], offsets, ts, vals, t, self.lookback_ms).windows()
        has = hi > offsets[:-1, None]                # a sample of this series at or before t
        idx = np.where(has, hi - 1, 0)
        present = has & (hi > lo) & ~stale[idx]
        values = np.where((offsets[:-1] == offsets[1:])[:, None], 0.0, vals[idx])
        # Sample timestamps are kept only under timestamp(): an (S x T) int64 matrix is not free.
        sample_ts = ts[idx] if self.want_sample_ts else None
        return Vector([lb for _, lb in series], values, present, sample_ts).drop_empty()

    def eval_MatrixSelector(self, node, times):
        vs = node.vector_selector
        t = self.at_times(vs.at, vs.offset, times)
        rng = _duration_ms(node.range)
        series = self.select(vs)
        if not series:
            return RangeVector([], np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0), t, rng)
        offsets, ts, vals, stale = self.load(series, int(t.min()) - rng + 1, int(t.max()))
        if stale.any():
            keep = ~stale
            counts = np.add.reduceat(keep.astype(np.int64), offsets[:-1]) if len(keep) else np.zeros(len(series), dtype=np.int64)
            counts = np.where(np.diff(offsets) == 0, 0, counts)
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            ts, vals = ts[keep], vals[keep]
        return RangeVector([lb for _, lb in series], offsets, ts, vals, t, rng)

    def eval_SubqueryExpr(self, node, times):
        t = self.at_times(node.at, node.offset, times)
        rng = _duration_ms(node.range)
        step = _duration_ms(node.step) if node.step is not None else (
            self.step_ms if self.step_ms > 0 else DEFAULT_SUBQUERY_STEP_MS)
        if step <= 0:
            raise PromQLError("subquery step must be positive", "bad_data")
        lo = int(t.min()) - rng
        first = (lo // step) * step
        if first <= lo:
            first += step
        last = (int(t.max()) // step) * step
        inner_times = np.arange(first, last + 1, step, dtype=np.int64) if last >= first else np.zeros(0, dtype=np.int64)
        if len(inner_times) > 10 * self.limits.max_points_per_series * max(1, len(times)):
            raise PromQLError("subquery resolution too fine for its range", "execution")
        if len(inner_times) == 0:
            return RangeVector([], np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0), t, rng)
        inner = self.eval(node.expr, inner_times)
        if isinstance(inner, Scalar):
            inner = Vector([{}], inner.values[None, :], np.ones((1, len(inner_times)), dtype=bool))
        if not isinstance(inner, Vector):
            raise PromQLError("subquery is only allowed on instant vector, got range vector", "bad_data")
        inner = inner.drop_empty()
        counts = inner.present.sum(axis=1)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        rows, cols = np.nonzero(inner.present)
        self.count_samples(len(rows))
        return RangeVector(inner.labels, offsets, inner_times[cols], inner.values[rows, cols], t, rng)

    # ---------------------------------------------------------------- calls
    def eval_Call(self, node, times):
        return functions.call(self, node, times)

    def eval_AggregateExpr(self, node, times):
        return aggregate(self, node, times)

    # ---------------------------------------------------------------- binary operators
    def eval_BinaryExpr(self, node, times):
        op = str(node.op).lower()
        lhs = self.eval(node.lhs, times)
        rhs = self.eval(node.rhs, times)
        mod = node.modifier
        return_bool = bool(mod and mod.return_bool)
        if isinstance(lhs, Scalar) and isinstance(rhs, Scalar):
            res = arith(op, lhs.values, rhs.values)
            return Scalar(res.astype(float))
        if isinstance(lhs, Vector) and isinstance(rhs, Vector):
            if op in SET_OPS:
                return self.set_op(op, lhs, rhs, mod)
            return self.vector_binop(op, lhs, rhs, mod, return_bool)
        if isinstance(lhs, Vector) and isinstance(rhs, Scalar):
            return self.vector_scalar(op, lhs, rhs.values[None, :], False, return_bool)
        if isinstance(lhs, Scalar) and isinstance(rhs, Vector):
            return self.vector_scalar(op, rhs, lhs.values[None, :], True, return_bool)
        raise PromQLError(f"binary expression must contain only scalar and instant vector types")

    def vector_scalar(self, op, vec: Vector, scalar, swapped: bool, return_bool: bool) -> Vector:
        a, b = (scalar, vec.values) if swapped else (vec.values, scalar)
        res = arith(op, a, b)
        if op in COMPARISON:
            if return_bool:
                return drop_name(Vector(vec.labels, res.astype(float), vec.present))
            return Vector(vec.labels, vec.values, vec.present & res, vec.sample_ts).drop_empty()
        return drop_name(Vector(vec.labels, res, vec.present))

    @staticmethod
    def signature_fn(matching):
        if matching is None:
            return lambda lb: tuple(sorted((k, v) for k, v in lb.items() if k != NAME))
        names = list(matching.labels)
        if str(matching.type).endswith("Include"):
            names = sorted(set(names))
            return lambda lb: tuple(lb.get(n, "") for n in names)
        excluded = set(names) | {NAME}
        return lambda lb: tuple(sorted((k, v) for k, v in lb.items() if k not in excluded))

    def set_op(self, op, lhs: Vector, rhs: Vector, mod) -> Vector:
        sig = self.signature_fn(mod.matching if mod else None)
        T = lhs.values.shape[1]
        rsig: dict[tuple, np.ndarray] = {}
        for lb, p in zip(rhs.labels, rhs.present):
            k = sig(lb)
            rsig[k] = rsig[k] | p if k in rsig else p.copy()
        none = np.zeros(T, dtype=bool)
        if op in ("and", "unless"):
            mask = np.array([rsig.get(sig(lb), none) for lb in lhs.labels], dtype=bool).reshape(len(lhs), T)
            keep = lhs.present & (mask if op == "and" else ~mask)
            return Vector(lhs.labels, lhs.values, keep, lhs.sample_ts).drop_empty()
        lsig: dict[tuple, np.ndarray] = {}
        for lb, p in zip(lhs.labels, lhs.present):
            k = sig(lb)
            lsig[k] = lsig[k] | p if k in lsig else p.copy()
        rmask = np.array([lsig.get(sig(lb), none) for lb in rhs.labels], dtype=bool).reshape(len(rhs), T)
        out = Vector(lhs.labels + rhs.labels, np.concatenate([lhs.values, rhs.values]),
                     np.concatenate([lhs.present, rhs.present & ~rmask]))
        return merge_same_labels(out.drop_empty())

    def vector_binop(self, op, lhs: Vector, rhs: Vector, mod, return_bool: bool) -> Vector:
        card = str(mod.card).rsplit(".", 1)[-1] if mod else "OneToOne"
        matching = mod.matching if mod else None
        include = list(mod.group_labels or []) if mod and card != "OneToOne" else []
        sig = self.signature_fn(matching)
        many, one = (rhs, lhs) if card == "OneToMany" else (lhs, rhs)
        T = lhs.values.shape[1]
        # For each signature: which "one"-side row is present at each step (-1: none).
        by_sig: dict[tuple, list[int]] = {}
        for j, lb in enumerate(one.labels):
            by_sig.setdefault(sig(lb), []).append(j)
        chosen: dict[tuple, np.ndarray] = {}
        for k, rows in by_sig.items():
            p = one.present[rows]
            if len(rows) > 1 and (p.sum(axis=0) > 1).any():
                side = "right" if card != "OneToMany" else "left"
                dup = ", ".join(_fmt(one.labels[r]) for r in rows[:2])
                raise PromQLError(
                    f"found duplicate series for the match group {_fmt_sig(matching, one.labels[rows[0]])} on the "
                    f"{side} hand-side of the operation: [{dup}];many-to-many matching not allowed: "
                    "matching labels must be unique on one side")
            pick = np.where(p.any(axis=0), np.asarray(rows)[p.argmax(axis=0)], -1)
            chosen[k] = pick
        if card == "OneToOne":
            counts: dict[tuple, np.ndarray] = {}
            for i, lb in enumerate(many.labels):
                k = sig(lb)
                if k in chosen:
                    c = many.present[i] & (chosen[k] >= 0)
                    counts[k] = counts[k] + c if k in counts else c.astype(int)
            if any((c > 1).any() for c in counts.values()):
                raise PromQLError("multiple matches for labels: many-to-one matching must be explicit (group_left/group_right)")
        out_labels, out_vals, out_pres = [], [], []
        drop = op in ARITH or return_bool
        on = matching is not None and str(matching.type).endswith("Include")
        cols = np.arange(T)
        for i, lb in enumerate(many.labels):
            pick = chosen.get(sig(lb))
            if pick is None:
                continue
            pres = many.present[i] & (pick >= 0)
            if not pres.any():
                continue
            safe = np.maximum(pick, 0)
            ov = one.values[safe, cols]
            mv = many.values[i]
            lv, rv = (ov, mv) if card == "OneToMany" else (mv, ov)
            res = arith(op, lv, rv)
            if op in COMPARISON:
                if return_bool:
                    val = res.astype(float)
                else:
                    val = lv
                    pres = pres & res
            else:
                val = res
            # Result labels: computed per distinct "one" row (include labels come from it).
            for j in np.unique(pick[pres]):
                sel = pres & (pick == j)
                labels = dict(lb)
                if drop:
                    labels.pop(NAME, None)
                if card == "OneToOne" and matching is not None:
                    names = set(matching.labels)
                    labels = {k: v for k, v in labels.items() if (k in names) == on}
                for name in include:
                    v = one.labels[j].get(name, "")
                    if v:
                        labels[name] = v
                    else:
                        labels.pop(name, None)
                out_labels.append(labels)
                out_vals.append(np.where(sel, val, 0.0))
                out_pres.append(sel)
        if not out_labels:
            return Vector.empty(T)
        vec = Vector(out_labels, np.array(out_vals, dtype=float), np.array(out_pres, dtype=bool))
        keys = [label_key(lb) for lb in out_labels]
        if card != "OneToOne" and len(set(keys)) != len(keys):
            seen: dict[tuple, np.ndarray] = {}
            for k, p in zip(keys, out_pres):
                if k in seen and (seen[k] & p).any():
                    raise PromQLError("multiple matches for labels: grouping labels must ensure unique matches")
                seen[k] = seen.get(k, np.zeros(T, dtype=bool)) | p
        return merge_same_labels(vec)


def _label_order(ids: np.ndarray, sids: np.ndarray, ts: np.ndarray, values: np.ndarray, stale: np.ndarray,
                 start_ms: int, end_ms: int):
    """Samples regrouped so that series ids[i]'s come i-th, each series sorted by time:
    (offsets (S+1,), ts, values, stale).

    Compaction stores samples sorted by (series_id, ts) a chunk at a time (an hour, or a day
    after the daily merge), and DuckDB's parallel scan hands row groups back in any order, so the
    rows come as a few thousand blocks: one series, increasing time. Sorting those blocks by
    (row, first ts) and moving them whole is one gather, where a stable argsort of every sample
    was a fifth of a dashboard query. Blocks of one series that overlap in time (late samples
    not yet compacted) fall back to that argsort on (row, ts).
    """
    n = len(sids)
    row_of = np.zeros(int(ids.max()) + 1 if len(ids) else 1, dtype=np.int64)
    row_of[ids] = np.arange(len(ids))
    if n:
        brk = np.empty(n, dtype=bool)
        brk[0] = True
        np.not_equal(sids[1:], sids[:-1], out=brk[1:])
        brk[1:] |= ts[1:] <= ts[:-1]
        first = np.flatnonzero(brk)
        last = np.append(first[1:], n) - 1
        block_row = row_of[sids[first]]
        order = np.lexsort((ts[first], block_row))
        first, last, block_row = first[order], last[order], block_row[order]
        same_row = block_row[1:] == block_row[:-1]
        if not (same_row & (ts[first[1:]] <= ts[last[:-1]])).any():
            sizes = last - first + 1
            offsets = np.searchsorted(block_row, np.arange(len(ids) + 1), side="left")
            offsets = np.append(0, np.cumsum(sizes))[offsets]
            if len(first) == 1 or (first[1:] == last[:-1] + 1).all():
                return offsets, ts, values, stale
            dest = np.cumsum(sizes) - sizes
            take = np.arange(n, dtype=np.int64) + np.repeat(first - dest, sizes)
            return offsets, ts[take], values[take], stale[take]
    rows = row_of[sids]
    span = end_ms - start_ms + 1
    if len(ids) * span < 2 ** 62:
        order = np.argsort(rows * span + (ts - start_ms), kind="stable")
    else:
        order = np.lexsort((ts, rows))
    rows, ts, values, stale = rows[order], ts[order], values[order], stale[order]
    offsets = np.searchsorted(rows, np.arange(len(ids) + 1), side="left").astype(np.int64)
    return offsets, ts, values, stale


def _fmt(labels: dict) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _fmt_sig(matching, labels: dict) -> str:
    if matching is not None and str(matching.type).endswith("Include"):
        return _fmt({k: labels[k] for k in matching.labels if labels.get(k)})
    excluded = set(matching.labels if matching is not None else ()) | {NAME}
    return _fmt({k: v for k, v in labels.items() if k not in excluded})


# --------------------------------------------------------------------------- the engine

class Engine:
    """PromQL over a Store. Thread-safe: every query uses its own cursor."""

    def __init__(self, store, limits: Limits | dict | None = None):
        self.store = store
        self.limits = Limits.from_config(limits)
        self.series_cache: dict[tuple, tuple[int, list]] = {}
        self.cache_lock = threading.Lock()

    def instant(self, query: str, time_s: float) -> Result:
        ast, neg = parse(query)
        t = round(time_s * 1000)
        ev = Evaluation(self, t, t, 0, neg, invalid_utf8_literals(query))
        val = ev.run(ast, np.array([t], dtype=np.int64))
        return self._instant_result(ast, val, t, ev)

    def range(self, query: str, start_s: float, end_s: float, step_s: float) -> Result:
        if step_s <= 0:
            raise PromQLError("zero or negative query resolution step widths are not accepted. "
                              "Try a positive integer", "bad_data")
        if end_s < start_s:
            raise PromQLError("end timestamp must not be before start time", "bad_data")
        start, end, step = round(start_s * 1000), round(end_s * 1000), round(step_s * 1000)
        if (end - start) // step + 1 > self.limits.max_points_per_series:
            raise PromQLError(f"exceeded maximum resolution of {self.limits.max_points_per_series:,} points per "
                              "timeseries. Try decreasing the query resolution (?step=XX)", "bad_data")
        ast, neg = parse(query)
        times = np.arange(start, end + 1, step, dtype=np.int64)
        ev = Evaluation(self, start, end, step, neg, invalid_utf8_literals(query))
        val = ev.run(ast, times)
        if isinstance(val, (String, RangeVector)):
            kind = "string" if isinstance(val, String) else "range vector"
            raise PromQLError(f"invalid expression type \"{kind}\" for range query, must be Scalar or instant Vector",
                              "bad_data")
        if isinstance(val, Scalar):
            val = Vector([{}], val.values[None, :], np.ones((1, len(times)), dtype=bool))
        out = []
        for lb, v, p in zip(val.labels, val.values, val.present):
            if p.any():
                out.append((lb, times[p], v[p]))
        out.sort(key=lambda s: label_key(s[0]))
        if _top_function(ast) in ("sort", "sort_desc", "sort_by_label", "sort_by_label_desc"):
            ev.warnings.append("PromQL warning: sort is ineffective for range queries since results are "
                               "always ordered by labels")
        return Result("matrix", out, end / 1000, ev.warnings, ev.infos)

    def _instant_result(self, ast, val, t: int, ev: Evaluation) -> Result:
        if isinstance(val, Scalar):
            return Result("scalar", float(val.values[0]), t / 1000, ev.warnings, ev.infos)
        if isinstance(val, String):
            return Result("string", val.value, t / 1000, ev.warnings, ev.infos)
        if isinstance(val, RangeVector):
            lo, hi = val.windows()
            out = []
            for i, lb in enumerate(val.labels):
                a, b = lo[i, 0], hi[i, 0]
                if b > a:
                    out.append((lb, val.ts[a:b], val.values[a:b]))
            return Result("matrix", out, t / 1000, ev.warnings, ev.infos)
        rows = [(lb, float(v[0])) for lb, v, p in zip(val.labels, val.values, val.present) if p[0]]
        return Result("vector", rows, t / 1000, ev.warnings, ev.infos)


def _top_function(ast) -> str | None:
    while isinstance(ast, pp.ParenExpr):
        ast = ast.expr
    if isinstance(ast, pp.Call):
        return ast.func.name
    return None
