"""One compiled pass over an ingest request's wire bytes (the ingest hot path): an OTLP
ExportMetricsServiceRequest (`walk`, `WirePath`) or a Prometheus remote-write WriteRequest
(`walk_remote_write`, `RemoteWritePath`, at the end of this file).

Why: parsing the request with upb and then walking every point in Python cost ~3 us per point,
most of the collector's CPU at fleet rates. `walk` reads the whole request once in numba and
returns numpy arrays: per point its metric, span, timestamp, value and a 128-bit hash of its
series identity (resource bytes + metric name/unit/kind + the point's attribute bytes). The
receiver then finds the series ids of known hashes with np.searchsorted, so a known point costs
no Python at all.

The walker accepts only what it fully understands: gauges and cumulative/unspecified sums with
the fields opentelemetry-proto defines. For anything else (histograms, summaries, delta sums, a
metric without data or with two data fields, unknown or mis-typed fields outside a point,
malformed or non-UTF-8 bytes) it answers FALLBACK and the request takes the general upb path,
which also produces every error message; so the walker never accepts a body upb would refuse.
Inside a point, stale flags, exemplars and unknown fields only mark that point "not cacheable":
its series is then resolved from the upb-parsed point, exactly as the general path does.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from google.protobuf.message import DecodeError
from numba import njit
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.metrics.v1.metrics_pb2 import NumberDataPoint

from collector.receive.remote_write import MESSAGES, STALE_NAN_BITS, series_labels
from collector.store.writer import INVALID, TS_LIMIT

OK, FALLBACK = 0, 1
GAUGE, COUNTER, UPDOWN = 0, 1, 2      # metric kinds; the names' instrument for prometheus_name
DELTA = 1                             # AggregationTemporality
FLAG_NO_RECORDED_VALUE = 1

_P1 = np.uint64(0xBF58476D1CE4E5B9)   # splitmix64's multipliers: good bit spread
_P2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, inline="always")
def _varint(buf, i, end):
    """(value, next index) of a varint of at most 5 bytes (every tag, length, enum, bool and
    flags value a valid request holds, minimal or not); next index -1 otherwise. Stricter than
    upb on purpose: what this refuses goes to upb."""
    value = np.uint64(0)
    shift = np.uint64(0)
    while i < end and shift < 35:
        b = buf[i]
        i += 1
        value |= np.uint64(b & 0x7F) << shift
        if b < 0x80:
            if value >> np.uint64(32):
                return value, -1
            return value, i
        shift += np.uint64(7)
    return value, -1


@njit(cache=True, inline="always")
def _u64(buf, i):
    v = np.uint64(0)
    for k in range(7, -1, -1):
        v = (v << np.uint64(8)) | np.uint64(buf[i + k])
    return v


@njit(cache=True)
def _utf8_ok(buf, i, end):
    """Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF), as upb checks it."""
    while i < end:
        b = buf[i]
        if b < 0x80:
            i += 1
            continue
        if 0xC2 <= b <= 0xDF:
            n = 1
        elif 0xE0 <= b <= 0xEF:
            n = 2
        elif 0xF0 <= b <= 0xF4:
            n = 3
        else:
            return False
        if i + n >= end:
            return False
        c1 = buf[i + 1]
        if b == 0xE0 and c1 < 0xA0 or b == 0xED and c1 > 0x9F or \
                b == 0xF0 and c1 < 0x90 or b == 0xF4 and c1 > 0x8F:
            return False
        for k in range(1, n + 1):
            if buf[i + k] & 0xC0 != 0x80:
                return False
        i += n + 1
    return True


@njit(cache=True, inline="always")
def _mix(h1, h2, buf, i, end):
    """Two independently seeded multiply-xorshift chains over buf[i:end], 8 bytes a step, then
    the length (so concatenated parts cannot alias)."""
    while i + 8 <= end:
        w = _u64(buf, i)
        h1 = (h1 ^ w) * _P1
        h1 ^= h1 >> np.uint64(29)
        h2 = (h2 ^ w) * _P2
        h2 ^= h2 >> np.uint64(31)
        i += 8
    w = np.uint64(end - i + 1) << np.uint64(56)   # the tail's length, then its bytes
    for k in range(i, end):
        w |= np.uint64(buf[k]) << np.uint64(8 * (k - i))
    h1 = (h1 ^ w) * _P1
    h1 ^= h1 >> np.uint64(29)
    h2 = (h2 ^ w) * _P2
    h2 ^= h2 >> np.uint64(31)
    return h1, h2


@njit(cache=True)
def _grow(a):
    out = np.empty((a.shape[0] * 2,) + a.shape[1:], a.dtype)
    out[:a.shape[0]] = a
    return out


@njit(cache=True)
def _len_field(buf, i, end):
    """(start, end) of the length-delimited payload at buf[i]; (-1, -1) when malformed."""
    ln, i = _varint(buf, i, end)
    if i < 0 or ln > np.uint64(end - i):
        return -1, -1
    return i, i + np.int64(ln)


@njit(cache=True, inline="always")
def _field1(buf, i, end):
    """(start, end) of the payload of the field at buf[i] when it is field 1, length-delimited
    (the one repeated field of both request types); (-1, -1) for anything else or malformed."""
    tag, i = _varint(buf, i, end)
    if i < 0 or tag != 0x0A:
        return -1, -1
    return _len_field(buf, i, end)


@njit(cache=True)
def _header(buf, s, e):
    """Check the fields of a ResourceMetrics or ScopeMetrics (same layout: 1 its Resource or
    InstrumentationScope, 2 its children, 3 schema_url); returns the span of field 1, (-1, -1)
    when absent, or (-2, -2) to fall back (anything else, bad UTF-8, or a second field 1, which
    upb would merge)."""
    span_s = span_e = -1
    j = s
    while j < e:
        t, j = _varint(buf, j, e)
        if j < 0 or t & 7 != 2:
            return -2, -2
        fs, fe = _len_field(buf, j, e)
        if fs < 0:
            return -2, -2
        j = fe
        if t == 0x0A:
            if span_s >= 0:
                return -2, -2
            span_s, span_e = fs, fe
        elif t == 0x1A:
            if not _utf8_ok(buf, fs, fe):
                return -2, -2
        elif t != 0x12:
            return -2, -2
    return span_s, span_e


@njit(cache=True, nogil=True)   # other requests' Python runs meanwhile (the second core)
def walk(buf, seed1, seed2):
    """Walk a request; returns (status, resources, scopes, metrics, points, p_ts, p_value, p_h1, p_h2).

    resources: int64 (R, 2) spans of each ResourceMetrics' Resource (-1, -1 when absent);
    scopes: int64 (S, 2) spans of InstrumentationScope messages (validated by the caller);
    metrics: int64 (M, 6): resource index, name start/end, unit start/end, kind;
    points: int64 (P, 5): metric index, point start/end, flags, 1 when not cacheable;
    p_ts: raw time_unix_nano (uint64, 0 = absent); p_value: float64; p_h1/p_h2: series hash."""
    n = buf.shape[0]
    resources = np.empty((4, 2), np.int64)
    scopes = np.empty((4, 2), np.int64)
    metrics = np.empty((64, 6), np.int64)
    cap = max(64, n // 64)
    points = np.empty((cap, 5), np.int64)
    p_ts = np.empty(cap, np.uint64)
    p_value = np.empty(cap, np.float64)
    p_h1 = np.empty(cap, np.uint64)
    p_h2 = np.empty(cap, np.uint64)
    nr = ns = nm = np_ = 0
    word = np.empty(1, np.uint64)      # reinterprets a fixed64 as double / int64
    as_double = word.view(np.float64)
    as_int = word.view(np.int64)
    fail = (FALLBACK, resources[:0], scopes[:0], metrics[:0], points[:0], p_ts[:0], p_value[:0], p_h1[:0], p_h2[:0])
    i = 0
    while i < n:
        rm_s, rm_e = _field1(buf, i, n)       # only field 1: resource_metrics
        if rm_s < 0:
            return fail
        i = rm_e
        if nr == resources.shape[0]:
            resources = _grow(resources)
        r = nr
        nr += 1
        # the resource (its hash seeds every point's); scope_metrics follow in pass 2
        res_s, res_e = _header(buf, rm_s, rm_e)
        if res_s == -2:
            return fail
        resources[r, 0] = res_s
        resources[r, 1] = res_e
        rh1, rh2 = seed1, seed2
        if resources[r, 0] >= 0:
            rh1, rh2 = _mix(rh1, rh2, buf, resources[r, 0], resources[r, 1])
        else:
            rh1, rh2 = _mix(rh1, rh2, buf, 0, 0)
        # pass 2: scope_metrics
        j = rm_s
        while j < rm_e:
            t, j = _varint(buf, j, rm_e)
            s, e = _len_field(buf, j, rm_e)
            j = e
            if t != 0x12:
                continue
            sc_s, sc_e = _header(buf, s, e)
            if sc_s == -2:
                return fail
            if sc_s >= 0:
                if ns == scopes.shape[0]:
                    scopes = _grow(scopes)
                scopes[ns, 0] = sc_s
                scopes[ns, 1] = sc_e
                ns += 1
            k = s
            while k < e:
                t2, k = _varint(buf, k, e)
                s2, e2 = _len_field(buf, k, e)
                k = e2
                if t2 != 0x12:
                    continue
                # one Metric: name 1, description 2, unit 3, gauge 5, sum 7; anything else -> upb
                if nm == metrics.shape[0]:
                    metrics = _grow(metrics)
                m = nm
                nm += 1
                metrics[m, 0] = r
                metrics[m, 1] = metrics[m, 2] = s2
                metrics[m, 3] = metrics[m, 4] = s2
                data_s = data_e = -1
                kind = -1
                q = s2
                while q < e2:
                    t3, q = _varint(buf, q, e2)
                    if q < 0 or t3 & 7 != 2:
                        return fail
                    s3, e3 = _len_field(buf, q, e2)
                    if s3 < 0:
                        return fail
                    q = e3
                    if t3 == 0x0A or t3 == 0x12 or t3 == 0x1A:
                        if not _utf8_ok(buf, s3, e3):
                            return fail
                        if t3 == 0x0A:
                            metrics[m, 1] = s3
                            metrics[m, 2] = e3
                        elif t3 == 0x1A:
                            metrics[m, 3] = s3
                            metrics[m, 4] = e3
                    elif t3 == 0x2A or t3 == 0x3A:
                        if kind >= 0:          # two data fields: upb merges or keeps the last
                            return fail
                        kind = GAUGE if t3 == 0x2A else COUNTER
                        data_s = s3
                        data_e = e3
                    else:
                        return fail
                if kind < 0:
                    return fail
                # the Sum's temporality and monotonic flag may follow its points; a Sum without
                # is_monotonic is not monotonic
                mono = False
                q = data_s
                while q < data_e:
                    t3, q = _varint(buf, q, data_e)
                    if q < 0:
                        return fail
                    if t3 == 0x0A:
                        s3, e3 = _len_field(buf, q, data_e)
                        if s3 < 0:
                            return fail
                        q = e3
                    elif kind != GAUGE and (t3 == 0x10 or t3 == 0x18):
                        v, q = _varint(buf, q, data_e)
                        if q < 0:
                            return fail
                        if t3 == 0x10 and v == DELTA:
                            return fail
                        if t3 == 0x18:
                            mono = v != 0
                    else:
                        return fail
                if kind != GAUGE:
                    kind = COUNTER if mono else UPDOWN
                metrics[m, 5] = kind
                mh1, mh2 = _mix(rh1, rh2, buf, metrics[m, 1], metrics[m, 2])
                mh1, mh2 = _mix(mh1, mh2, buf, metrics[m, 3], metrics[m, 4])
                mh1 = (mh1 ^ np.uint64(kind + 1)) * _P1
                mh2 = (mh2 ^ np.uint64(kind + 1)) * _P2
                # the points
                q = data_s
                while q < data_e:
                    t3, q = _varint(buf, q, data_e)
                    if t3 != 0x0A:
                        q = _varint(buf, q, data_e)[1]
                        continue
                    ps, pe = _len_field(buf, q, data_e)
                    q = pe
                    if np_ == p_ts.shape[0]:
                        points = _grow(points)
                        p_ts = _grow(p_ts)
                        p_value = _grow(p_value)
                        p_h1 = _grow(p_h1)
                        p_h2 = _grow(p_h2)
                    h1, h2 = mh1, mh2
                    ts = np.uint64(0)
                    value = 0.0
                    flags = 0
                    slow = 0
                    attrs = 0
                    w = ps
                    while w < pe:
                        ft, w = _varint(buf, w, pe)
                        if w < 0:
                            return fail
                        wire = ft & 7
                        field = ft >> np.uint64(3)
                        if field == 2 or field == 3 or field == 4 or field == 6:   # fixed64
                            if wire != 1 or w + 8 > pe:
                                return fail
                            raw = _u64(buf, w)
                            if field == 3:
                                ts = raw
                            elif field == 4:
                                word[0] = raw
                                value = as_double[0]
                            elif field == 6:
                                word[0] = raw
                                value = float(as_int[0])
                            w += 8
                        elif field == 7:       # an attribute: part of the series identity
                            if wire != 2:
                                return fail
                            s4, e4 = _len_field(buf, w, pe)
                            if s4 < 0:
                                return fail
                            h1, h2 = _mix(h1, h2, buf, s4, e4)
                            attrs += 1
                            w = e4
                        elif field == 8:       # flags (uint32); NO_RECORDED_VALUE = stale
                            if wire != 0:
                                return fail
                            v, w = _varint(buf, w, pe)
                            if w < 0:
                                return fail
                            flags = np.int64(v & np.uint64(0xFFFFFFFF))
                        elif field != 0 and (wire == 0 or wire == 1 or wire == 2 or wire == 5):
                            # exemplars (5) or a field this walker does not know: upb parses it
                            if field == 5 and wire != 2:
                                return fail
                            slow = 1
                            if wire == 0:
                                w = _varint(buf, w, pe)[1]
                                if w < 0:
                                    return fail
                            elif wire == 1:
                                w += 8
                            elif wire == 5:
                                w += 4
                            else:
                                s4, e4 = _len_field(buf, w, pe)
                                if s4 < 0:
                                    return fail
                                w = e4
                            if w > pe:
                                return fail
                        else:
                            return fail
                    if flags & 1:
                        slow = 1
                    points[np_, 0] = m
                    points[np_, 1] = ps
                    points[np_, 2] = pe
                    points[np_, 3] = flags
                    points[np_, 4] = slow
                    p_ts[np_] = ts
                    p_value[np_] = value
                    p_h1[np_] = (h1 ^ np.uint64(attrs)) * _P1
                    p_h2[np_] = (h2 ^ np.uint64(attrs)) * _P2
                    np_ += 1
    return (OK, resources[:nr], scopes[:ns], metrics[:nm], points[:np_], p_ts[:np_], p_value[:np_],
            p_h1[:np_], p_h2[:np_])


MAX_CACHED = 2_000_000   # known point hashes kept; label churn past this just refills the table


class KnownSeries:
    """Series ids of point hashes seen before, as sorted arrays for np.searchsorted.

    Readers take the current (h1, h2, ids) tuple without a lock; an update builds a new tuple
    and swaps it in, so a reader never sees a half-sorted table."""

    def __init__(self):
        self.table = (np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, np.int32))
        self._lock = threading.Lock()

    def lookup(self, h1: np.ndarray, h2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, series ids; meaningful where found)."""
        k1, k2, ids = self.table
        if not len(k1):
            return np.zeros(len(h1), bool), np.zeros(len(h1), np.int32)
        at = np.minimum(np.searchsorted(k1, h1), len(k1) - 1)
        found = (k1[at] == h1) & (k2[at] == h2)
        return found, ids[at]

    def add(self, h1: np.ndarray, h2: np.ndarray, ids: np.ndarray) -> None:
        with self._lock:
            k1, k2, old = self.table
            if len(k1) + len(h1) > MAX_CACHED:
                k1, k2, old = k1[:0], k2[:0], old[:0]
            k1 = np.concatenate([k1, h1])
            k2 = np.concatenate([k2, h2])
            ids = np.concatenate([old, ids])
            # sorted by h1 (then h2): a rare h1 collision is only found by its first entry and
            # the other point keeps taking the slow path, which is still correct
            order = np.lexsort((k2, k1))
            self.table = (k1[order], k2[order], ids[order])


class WirePath:
    """A request through `walk`: known series by hash, new ones through the translator's
    general per-point resolution. translate() returns None when the request must take the
    general upb path (see the module doc)."""

    INSTRUMENTS = ("gauge", "counter", "updowncounter")

    def __init__(self, translator):
        self.translator = translator
        self.known = KnownSeries()
        self.seed1, self.seed2 = (np.uint64(int.from_bytes(os.urandom(8), "little")) for _ in range(2))
        self._scopes: set[bytes] = set()
        walk(np.frombuffer(b"", np.uint8), self.seed1, self.seed2)   # compile or load the cache

    def translate(self, body: bytes, now_ms: int, result):
        """(series ids, ts_ms, values, stale mask or None) for the request's samples, or None."""
        tr = self.translator
        buf = np.frombuffer(body, np.uint8)
        status, resources, scopes, metrics, points, p_ts, values, h1, h2 = walk(buf, self.seed1, self.seed2)
        if status != OK:
            return None
        try:
            for s, e in scopes.tolist():
                scope = body[s:e]
                if scope not in self._scopes:
                    InstrumentationScope.FromString(scope)   # upb's own checks (UTF-8, fields)
                    if len(self._scopes) > 10_000:
                        self._scopes.clear()
                    self._scopes.add(scope)
            bases = [tr.base_for(body[s:e] if s >= 0 else b"") for s, e in resources.tolist()]
            found, sids = self.known.lookup(h1, h2)
            slow = points[:, 4] != 0
            todo = np.flatnonzero(~found | slow)
            parsed = [NumberDataPoint.FromString(body[points[k, 1]:points[k, 2]]) for k in todo.tolist()]
        except DecodeError:
            return None
        stale = None
        keep = None
        if len(todo):
            names: dict[int, str] = {}
            new_k: list[int] = []
            for k, point in zip(todo.tolist(), parsed):
                m = int(points[k, 0])
                name = names.get(m)
                if name is None:
                    _, ns, ne, us, ue, kind = metrics[m].tolist()
                    name = names[m] = tr.name(body[ns:ne].decode(), body[us:ue].decode(), self.INSTRUMENTS[kind])
                sid = tr.writer.resolve(name, tr._labels(bases[metrics[m, 0]], point.attributes), result)
                if sid is None or sid == INVALID:
                    if sid is None:
                        result.limited += 1
                    else:
                        result.rejected += 1
                    if keep is None:
                        keep = np.ones(len(sids), bool)
                    keep[k] = False
                    continue
                sids[k] = sid
                if point.flags & FLAG_NO_RECORDED_VALUE:
                    if stale is None:
                        stale = np.zeros(len(sids), bool)
                    stale[k] = True
                elif not slow[k]:
                    new_k.append(k)
            if new_k:
                self.known.add(h1[new_k], h2[new_k], sids[new_k])
        ts = np.where(p_ts == 0, np.uint64(now_ms * 1_000_000), p_ts) // np.uint64(1_000_000)
        ts = ts.astype(np.int64)
        if keep is not None:
            sids, ts, values = sids[keep], ts[keep], values[keep]
            stale = stale[keep] if stale is not None else None
        return sids, ts, values, stale


# ---------------------------------------------------------------------------------------------
# Prometheus remote write 1.0: WriteRequest{1: TimeSeries{1: Label, 2: Sample{1: double value,
# 2: int64 timestamp}}}. The general path (collector.receive.remote_write.translate) built a
# Python row per sample and the writer sorted every sample's labels: ~16 us a sample. Here a
# series is identified by the hash of its Label messages' bytes; a known one costs no Python.


@njit(cache=True, inline="always")
def _varint64(buf, i, end):
    """(value as int64, next index) of a varint of up to 10 bytes (an int64 field: negative
    values take 10); next index -1 when malformed."""
    value = np.uint64(0)
    shift = np.uint64(0)
    while i < end and shift < 70:
        b = buf[i]
        i += 1
        value |= np.uint64(b & 0x7F) << shift
        if b < 0x80:
            return np.int64(value), i
        shift += np.uint64(7)
    return np.int64(0), -1


@njit(cache=True, nogil=True)
def walk_remote_write(buf, seed1, seed2):
    """Walk a WriteRequest; returns (status, series, s_h1, s_h2, smp_series, smp_ts, smp_bits).
    series: int64 (N, 2) spans of each TimeSeries message; s_h1/s_h2: the hash of its labels;
    smp_series: the series index of each sample; smp_ts: int64 ms; smp_bits: the value's bits.
    FALLBACK for anything but timeseries (metadata, unknown fields), exemplars or histograms in
    a series, unknown or mis-typed fields in a sample, or malformed lengths."""
    n = buf.shape[0]
    series = np.empty((64, 2), np.int64)
    s_h1 = np.empty(64, np.uint64)
    s_h2 = np.empty(64, np.uint64)
    cap = max(64, n // 32)
    smp_series = np.empty(cap, np.int64)
    smp_ts = np.empty(cap, np.int64)
    smp_bits = np.empty(cap, np.uint64)
    ns = nsmp = 0
    fail = (FALLBACK, series[:0], s_h1[:0], s_h2[:0], smp_series[:0], smp_ts[:0], smp_bits[:0])
    i = 0
    while i < n:
        ts_s, ts_e = _field1(buf, i, n)       # only field 1: timeseries
        if ts_s < 0:
            return fail
        i = ts_e
        if ns == series.shape[0]:
            series = _grow(series)
            s_h1 = _grow(s_h1)
            s_h2 = _grow(s_h2)
        series[ns, 0] = ts_s
        series[ns, 1] = ts_e
        h1, h2 = seed1, seed2
        labels = 0
        j = ts_s
        while j < ts_e:
            t, j = _varint(buf, j, ts_e)
            if j < 0 or (t != 0x0A and t != 0x12):
                return fail
            fs, fe = _len_field(buf, j, ts_e)
            if fs < 0:
                return fail
            j = fe
            if t == 0x0A:                      # a Label: its bytes are the series identity
                h1, h2 = _mix(h1, h2, buf, fs, fe)
                labels += 1
                continue
            value = np.uint64(0)               # a Sample; absent fields are 0, as in upb
            stamp = np.int64(0)
            q = fs
            while q < fe:
                ft, q = _varint(buf, q, fe)
                if q < 0:
                    return fail
                if ft == 0x09:
                    if q + 8 > fe:
                        return fail
                    value = _u64(buf, q)
                    q += 8
                elif ft == 0x10:
                    stamp, q = _varint64(buf, q, fe)
                    if q < 0:
                        return fail
                else:
                    return fail
            if nsmp == smp_ts.shape[0]:
                smp_series = _grow(smp_series)
                smp_ts = _grow(smp_ts)
                smp_bits = _grow(smp_bits)
            smp_series[nsmp] = ns
            smp_ts[nsmp] = stamp
            smp_bits[nsmp] = value
            nsmp += 1
        s_h1[ns] = (h1 ^ np.uint64(labels)) * _P1
        s_h2[ns] = (h2 ^ np.uint64(labels)) * _P2
        ns += 1
    return (OK, series[:ns], s_h1[:ns], s_h2[:ns], smp_series[:nsmp], smp_ts[:nsmp], smp_bits[:nsmp])


TimeSeries = MESSAGES["TimeSeries"]


class RemoteWritePath:
    """A WriteRequest through `walk_remote_write`: known series by hash; a new series' labels
    are parsed by upb and resolved by the same function the general path uses. translate()
    returns None when the request must take the general path."""

    def __init__(self, writer):
        self.writer = writer
        self.known = KnownSeries()
        self.seed1, self.seed2 = (np.uint64(int.from_bytes(os.urandom(8), "little")) for _ in range(2))
        walk_remote_write(np.frombuffer(b"", np.uint8), self.seed1, self.seed2)   # compile or load

    def translate(self, body: bytes, result):
        """(series ids, ts_ms, values, stale mask or None, refused, reasons), or None."""
        buf = np.frombuffer(body, np.uint8)
        status, series, h1, h2, smp_series, smp_ts, smp_bits = walk_remote_write(buf, self.seed1, self.seed2)
        if status != OK:
            return None
        if len(smp_ts) and (int(smp_ts.max()) >= TS_LIMIT or int(smp_ts.min()) <= -TS_LIMIT):
            return None   # the general path words the error
        found, sids = self.known.lookup(h1, h2)
        refused = 0
        reasons: list[str] = []
        keep_series = None
        todo = np.flatnonzero(~found)
        if len(todo):
            try:   # all parsed before any is resolved: a fallback must not leave ids allocated
                parsed = [TimeSeries.FromString(body[series[k, 0]:series[k, 1]]) for k in todo.tolist()]
            except DecodeError:
                return None
            per_series = np.bincount(smp_series, minlength=len(series))
            new_k: list[int] = []
            for k, ts_msg in zip(todo.tolist(), parsed):
                metric, labels = series_labels(ts_msg)
                n = int(per_series[k])
                if metric and not n:
                    continue   # no samples: the general path never resolves it either
                sid = None
                if not metric:
                    refused += n
                    if len(reasons) < 5:
                        reasons.append("series without __name__ label")
                else:
                    sid = self.writer.resolve(metric, labels, result)
                    if sid is None:
                        result.limited += n
                    elif sid == INVALID:
                        result.rejected += n
                    else:
                        sids[k] = sid
                        new_k.append(k)
                        continue
                if keep_series is None:
                    keep_series = np.ones(len(series), bool)
                keep_series[k] = False
            if new_k:
                self.known.add(h1[new_k], h2[new_k], sids[new_k])
        sample_sids = sids[smp_series]
        values = smp_bits.view(np.float64)
        stale = smp_bits == np.uint64(STALE_NAN_BITS)
        ts = smp_ts
        if keep_series is not None:
            keep = keep_series[smp_series]
            sample_sids, ts, values, stale = sample_sids[keep], ts[keep], values[keep], stale[keep]
        return sample_sids, ts, values, (stale if stale.any() else None), refused, reasons
