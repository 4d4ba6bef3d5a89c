"""The values a PromQL expression evaluates to, over all the steps of a query at once.

A range query with T steps is evaluated column-wise: an instant vector is a (series x steps)
matrix of values plus a presence mask, so binary operators, aggregations and functions are numpy
operations over whole matrices instead of a Python loop per step and per sample. An instant
query is the same thing with T == 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

NAME = "__name__"


class PromQLError(Exception):
    """An error Prometheus would answer with; `kind` is its errorType (bad_data, execution, timeout)."""

    def __init__(self, message: str, kind: str = "execution"):
        super().__init__(message)
        self.kind = kind


def label_key(labels: dict[str, str]) -> tuple:
    return tuple(sorted(labels.items()))


def format_labels(labels: dict[str, str]) -> str:
    """Prometheus' String() of a label set: {__name__="x", a="b"} with sorted names."""
    items = sorted(labels.items())
    return "{" + ", ".join(f'{k}="{v}"' for k, v in items) + "}"


@dataclass
class Vector:
    """An instant vector at every step: labels per series, values and presence (S x T)."""

    labels: list[dict[str, str]]
    values: np.ndarray          # float64 (S, T)
    present: np.ndarray         # bool (S, T)
    # Timestamps (ms) of the samples a plain selector picked, for timestamp(); None otherwise.
    sample_ts: np.ndarray | None = None

    @staticmethod
    def empty(steps: int) -> "Vector":
        return Vector([], np.zeros((0, steps)), np.zeros((0, steps), dtype=bool))

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows) -> "Vector":
        rows = np.asarray(rows, dtype=np.int64)
        return Vector([self.labels[i] for i in rows], self.values[rows], self.present[rows],
                      None if self.sample_ts is None else self.sample_ts[rows])

    def drop_empty(self) -> "Vector":
        keep = np.flatnonzero(self.present.any(axis=1))
        return self if len(keep) == len(self.labels) else self.take(keep)


@dataclass
class Scalar:
    values: np.ndarray          # float64 (T,)


@dataclass
class String:
    value: str


@dataclass
class RangeVector:
    """Samples of many series in one window per step (a matrix selector or a subquery).

    Samples are flat and sorted by (series, ts); `offsets[i]:offsets[i+1]` are series i's.
    The window for step j is (ends[j] - range_ms, ends[j]] (left-open since Prometheus 3).
    Staleness markers are already removed (range functions never see them).
    """

    labels: list[dict[str, str]]
    offsets: np.ndarray         # int64 (S+1,)
    ts: np.ndarray              # int64 ms
    values: np.ndarray          # float64
    ends: np.ndarray            # int64 ms (T,)
    range_ms: int
    bounds: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def windows(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) sample indices (S, T): window j of series i is [lo, hi)."""
        if self.bounds is None:
            T = len(self.ends)
            step = int(self.ends[1] - self.ends[0]) if T > 1 else 1
            if step <= 0 or (T > 2 and (np.diff(self.ends) != step).any()):
                starts = self.ends - self.range_ms
                self.bounds = (self._searched(starts), self._searched(self.ends))
                return self.bounds
            behind, rem = divmod(self.range_ms, step)
            if rem == 0 and behind <= T:
                # Window starts are edges `behind` steps earlier: one count serves both ends.
                upto = self._counted(int(self.ends[0]) - self.range_ms, step, T + behind)
                self.bounds = (upto[:, :T], upto[:, behind:])
            else:
                self.bounds = (self._counted(int(self.ends[0]) - self.range_ms, step, T),
                               self._counted(int(self.ends[0]), step, T))
        return self.bounds

    def _counted(self, first: int, step: int, n: int) -> np.ndarray:
        """(S, n): offsets[i] + the number of series i's samples with ts <= first + j * step.

        Each sample counts from the first edge at or after it, ceil((ts - first) / step), on: one
        bincount over (series, that edge) and a running sum give every count, with no binary
        search per window.
        """
        S = len(self.labels)
        rows = np.repeat(np.arange(S, dtype=np.int64), np.diff(self.offsets))
        from_edge = np.clip(-((first - self.ts) // step), 0, n)
        counts = np.bincount(rows * (n + 1) + from_edge, minlength=S * (n + 1)).reshape(S, n + 1)
        return self.offsets[:-1, None] + np.cumsum(counts[:, :n], axis=1)

    def _searched(self, edges: np.ndarray) -> np.ndarray:
        """The same as _counted for edges that are not evenly spaced."""
        out = np.empty((len(self.labels), len(edges)), dtype=np.int64)
        for i in range(len(self.labels)):
            a, b = self.offsets[i], self.offsets[i + 1]
            out[i] = a + np.searchsorted(self.ts[a:b], edges, side="right")
        return out


def merge_same_labels(vec: Vector) -> Vector:
    """Combine rows with identical label sets; Prometheus errors if they overlap in a step."""
    keys = [label_key(lb) for lb in vec.labels]
    if len(set(keys)) == len(keys):
        return vec
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    labels, vals, pres, sts = [], [], [], []
    for rows in groups.values():
        if len(rows) == 1:
            r = rows[0]
            labels.append(vec.labels[r])
            vals.append(vec.values[r])
            pres.append(vec.present[r])
            if vec.sample_ts is not None:
                sts.append(vec.sample_ts[r])
            continue
        p = vec.present[rows]
        if (p.sum(axis=0) > 1).any():
            raise PromQLError("vector cannot contain metrics with the same labelset")
        pick = p.argmax(axis=0)
        cols = np.arange(p.shape[1])
        labels.append(vec.labels[rows[0]])
        vals.append(vec.values[rows][pick, cols])
        pres.append(p.any(axis=0))
        if vec.sample_ts is not None:
            sts.append(vec.sample_ts[rows][pick, cols])
    T = vec.values.shape[1]
    return Vector(labels, np.array(vals).reshape(len(labels), T), np.array(pres).reshape(len(labels), T),
                  np.array(sts).reshape(len(labels), T) if vec.sample_ts is not None else None)


def drop_name(vec: Vector) -> Vector:
    labels = [{k: v for k, v in lb.items() if k != NAME} for lb in vec.labels]
    return merge_same_labels(Vector(labels, vec.values, vec.present))


def format_value(v: float) -> str:
    """A sample value as Prometheus' JSON writes it (strconv 'f', -1 / NaN / +Inf / -Inf)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    r = repr(float(v))
    if "e" in r or "E" in r:
        return np.format_float_positional(v, trim="-")
    return r[:-2] if r.endswith(".0") else r


_ZERO_DURATION = re.compile(r"0+(ms|s|m|h|d|w|y)")


def duration_seconds(text: str) -> float:
    """Seconds of a Prometheus duration ("90s", "1h30m"), parsed by promql-parser's own grammar.

    promql-parser refuses a zero duration (it is meant for range selectors), but a zero `for:`
    or `step` spelled "0s" is valid elsewhere in Prometheus, so that one case is handled here.
    Raises ValueError for anything else it cannot parse.
    """
    import promql_parser

    text = text.strip()
    if _ZERO_DURATION.fullmatch(text):
        return 0.0
    return promql_parser.parse_duration(text).total_seconds()

