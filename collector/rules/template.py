"""Alert label/annotation templates: the subset of Prometheus' Go templates our rules use.

Prometheus expands annotations with Go's text/template plus its own functions. The collector
implements exactly this subset (alerts/*.yaml uses nothing else; a test renders every annotation
of every rule file and the promtool unit tests check the same strings against Prometheus):

    {{ $labels.NAME }}   the alert's label (a missing label is "", as Prometheus' missingkey=zero)
    {{ $value }}         the sample value, formatted like Go's %v of a float64
    {{ $value | humanize }}            {{ humanize $value }}             1.235k, 12.5m, ...
    {{ $value | humanizePercentage }}  {{ humanizePercentage $value }}   12.5%
    {{ printf "%.2f" $value }}         printf with one argument ($value or $labels.NAME)
    {{ $externalLabels.NAME }}         the evaluator's external labels

Anything else ({{ if }}, {{ range }}, queries in templates) raises TemplateError at load time, so
an unsupported rule is refused when the rule file is read rather than producing wrong text.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Mapping


class TemplateError(ValueError):
    pass


_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.DOTALL)
_VAR = r"\$(?:value|labels\.[A-Za-z_][A-Za-z0-9_]*|externalLabels\.[A-Za-z_][A-Za-z0-9_]*)"
_FUNCS = ("humanize", "humanizePercentage")
_PIPE = re.compile(rf"^({_VAR})(?:\s*\|\s*({'|'.join(_FUNCS)}))?$")
_CALL = re.compile(rf"^({'|'.join(_FUNCS)})\s+({_VAR})$")
_PRINTF = re.compile(rf'^printf\s+"((?:[^"\\]|\\.)*)"\s+({_VAR})$')


def go_float(v: float) -> str:
    """Go's %v of a float64 (strconv 'g', shortest digits, exponent when exp < -4 or >= 6)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "-0" if math.copysign(1.0, v) < 0 else "0"
    sign, digits, exp = Decimal(repr(v)).normalize().as_tuple()
    ds = "".join(map(str, digits))
    point = len(ds) + exp          # position of the decimal point relative to the digits
    x = point - 1                  # decimal exponent of the first digit
    neg = "-" if sign else ""
    if x < -4 or x >= 6:
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{neg}{mant}e{'-' if x < 0 else '+'}{abs(x):02d}"
    if point <= 0:
        return f"{neg}0.{'0' * -point}{ds}"
    if point >= len(ds):
        return f"{neg}{ds}{'0' * (point - len(ds))}"
    return f"{neg}{ds[:point]}.{ds[point:]}"


def _g4(v: float) -> str:
    """Go's %.4g (same digits and exponent style as C's)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return f"{v:.4g}"


def humanize(v: float) -> str:
    """Prometheus' humanize: SI prefixes in steps of 1000, 4 significant digits."""
    if v == 0 or math.isnan(v) or math.isinf(v):
        return _g4(v)
    prefix = ""
    if abs(v) >= 1:
        for p in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(v) < 1000:
                break
            prefix, v = p, v / 1000
    else:
        for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
            if abs(v) >= 1:
                break
            prefix, v = p, v * 1000
    return _g4(v) + prefix


def humanize_percentage(v: float) -> str:
    return _g4(v * 100) + "%"


def _go_printf(fmt: str, arg: object) -> str:
    # Go's verbs we accept map onto Python's %-formatting for one argument.
    verbs = re.findall(r"%[-+ #0]*\d*(?:\.\d+)?([a-zA-Z%])", fmt)
    if [v for v in verbs if v != "%"] not in ([], ["f"], ["g"], ["e"], ["d"], ["s"], ["v"]):
        raise TemplateError(f"printf format {fmt!r}: only one %f/%g/%e/%d/%s/%v verb is supported")
    if "v" in verbs:
        fmt = fmt.replace("%v", "%s")
        arg = go_float(arg) if isinstance(arg, float) else arg
    if "d" in verbs and isinstance(arg, float):
        arg = int(arg)
    return fmt % arg


class Template:
    """A parsed annotation/label template; render() fills in one alert's labels and value."""

    def __init__(self, text: str):
        self.text = text
        self._parts: list[str | tuple[str, str, str | None]] = []  # literal | (kind, var, arg)
        pos = 0
        for m in _ACTION.finditer(text):
            self._parts.append(text[pos:m.start()])
            self._parts.append(self._parse(m.group(1)))
            pos = m.end()
        self._parts.append(text[pos:])

    def _parse(self, action: str) -> tuple[str, str, str | None]:
        if m := _PIPE.match(action):
            return (m.group(2) or "plain", m.group(1), None)
        if m := _CALL.match(action):
            return (m.group(1), m.group(2), None)
        if m := _PRINTF.match(action):
            fmt = m.group(1).encode().decode("unicode_escape")
            _go_printf(fmt, 0.0)  # validate the verb now
            return ("printf", m.group(2), fmt)
        raise TemplateError(f"unsupported template action {{{{ {action} }}}} in {self.text!r} "
                            "(supported: $labels.x, $value, humanize, humanizePercentage, printf)")

    @staticmethod
    def _lookup(var: str, labels: Mapping[str, str], value: float,
                external: Mapping[str, str]) -> float | str:
        if var == "$value":
            return value
        scope, _, name = var[1:].partition(".")
        return (labels if scope == "labels" else external).get(name, "")

    def render(self, labels: Mapping[str, str], value: float,
               external_labels: Mapping[str, str] | None = None) -> str:
        out = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            kind, var, arg = part
            x = self._lookup(var, labels, value, external_labels or {})
            if kind == "plain":
                out.append(go_float(x) if isinstance(x, float) else x)
            elif kind == "printf":
                out.append(_go_printf(arg, x))
            else:
                try:
                    num = float(x)
                except ValueError:
                    raise TemplateError(f"{kind} of non-number {x!r}") from None
                out.append(humanize(num) if kind == "humanize" else humanize_percentage(num))
        return "".join(out)


def expand(text: str, labels: Mapping[str, str], value: float,
           external_labels: Mapping[str, str] | None = None) -> str:
    return Template(text).render(labels, value, external_labels)
