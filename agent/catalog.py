"""The metric catalog: loads agent/catalog.yaml and derives every other spelling from it.

Everything that needs a metric name (sources, exporters, the collector's metadata API, dashboards,
alerts, health features, docs) asks this module, so a name is written by hand in one place only.

The Prometheus name follows the OpenTelemetry -> Prometheus translation used by the OpenTelemetry
Collector's Prometheus exporters (spec: "Prometheus and OpenMetrics Compatibility"): invalid
characters become "_", the UCUM unit is appended as a base-unit word unless the name already
ends with it, a unit of "1" on a gauge becomes "_ratio", units in braces are dropped, and a
monotonic sum gets "_total".
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Iterable

import yaml

INSTRUMENTS = ("gauge", "counter", "updowncounter")

# UCUM unit -> Prometheus unit word (the OTel spec's table, the subset we use and a bit more).
_UNIT_WORDS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
    "us": "microseconds", "ns": "nanoseconds",
    "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
    "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes",
    "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts", "g": "grams",
    "Cel": "celsius", "Hz": "hertz", "%": "percent", "rpm": "rpm",
}
# The denominator of "X/Y" units is singular.
_PER_UNIT_WORDS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week",
                   "mo": "month", "y": "year"}


def prometheus_unit(unit: str, instrument: str) -> str:
    """The unit suffix (without leading underscore) the OTLP translation appends, or ''."""
    unit = re.sub(r"\{[^}]*\}", "", unit or "").strip()
    if not unit:
        return ""
    if unit == "1":
        return "ratio" if instrument == "gauge" else ""
    if "/" in unit:
        num, _, den = unit.partition("/")
        num_word = _UNIT_WORDS.get(num, num) if num else ""
        den_word = _PER_UNIT_WORDS.get(den, _UNIT_WORDS.get(den, den))
        return f"{num_word}_per_{den_word}" if num_word else f"per_{den_word}"
    return _UNIT_WORDS.get(unit, unit)


def prometheus_name(otel_name: str, unit: str, instrument: str) -> str:
    """Translate an OpenTelemetry metric name to its Prometheus name."""
    name = re.sub(r"[^a-zA-Z0-9_:]", "_", otel_name)
    name = re.sub(r"__+", "_", name).strip("_")
    suffix = prometheus_unit(unit, instrument)
    if suffix and not name.endswith("_" + suffix):
        name = f"{name}_{suffix}"
    if instrument == "counter" and not name.endswith("_total"):
        name += "_total"
    return name


def prometheus_label(attribute: str) -> str:
    """Translate an attribute key to a Prometheus label name."""
    label = re.sub(r"[^a-zA-Z0-9_]", "_", attribute)
    return "key_" + label if label[:1].isdigit() else label


@dataclass(frozen=True)
class Metric:
    name: str                      # OpenTelemetry name
    instrument: str                # gauge | counter | updowncounter
    unit: str                      # UCUM
    attributes: tuple[str, ...]    # data-point attributes, groups expanded
    sources: tuple[str, ...]
    help: str

    @property
    def prom_name(self) -> str:
        return prometheus_name(self.name, self.unit, self.instrument)

    @property
    def prom_type(self) -> str:
        """The Prometheus metric type (for # TYPE lines and /api/v1/metadata)."""
        return "counter" if self.instrument == "counter" else "gauge"

    @property
    def monotonic(self) -> bool:
        return self.instrument == "counter"

    @property
    def labels(self) -> tuple[str, ...]:
        """All Prometheus label names a series of this metric carries (resource ones first)."""
        return tuple(prometheus_label(a) for a in (*catalog().resource_attributes, *self.attributes))


@dataclass(frozen=True)
class Catalog:
    resource_attributes: tuple[str, ...]
    attribute_groups: dict[str, tuple[str, ...]]
    metrics: tuple[Metric, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_otel", {m.name: m for m in self.metrics})
        object.__setattr__(self, "_by_prom", {m.prom_name: m for m in self.metrics})

    def __getitem__(self, otel_name: str) -> Metric:
        try:
            return self._by_otel[otel_name]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(f"metric {otel_name!r} is not in agent/catalog.yaml") from None

    def __contains__(self, otel_name: str) -> bool:
        return otel_name in self._by_otel  # type: ignore[attr-defined]

    def __iter__(self):
        return iter(self.metrics)

    def by_prom_name(self, prom_name: str) -> Metric | None:
        return self._by_prom.get(prom_name)  # type: ignore[attr-defined]

    def for_source(self, source: str) -> list[Metric]:
        return [m for m in self.metrics if source in m.sources]

    def prom(self, otel_name: str) -> str:
        """Prometheus name of a catalog metric: the way code outside the agent spells names."""
        return self[otel_name].prom_name


class CatalogError(ValueError):
    pass


def load(text: str) -> Catalog:
    """Parse and validate a catalog document."""
    doc = yaml.safe_load(text)
    groups = {k: tuple(v) for k, v in (doc.get("attribute_groups") or {}).items()}
    seen_otel: set[str] = set()
    seen_prom: set[str] = set()
    metrics = []
    for i, entry in enumerate(doc.get("metrics") or []):
        where = f"metrics[{i}] ({entry.get('name', '?')})"
        missing = {"name", "instrument", "unit", "attributes", "sources", "help"} - set(entry)
        if missing:
            raise CatalogError(f"{where}: missing keys {sorted(missing)}")
        if entry["instrument"] not in INSTRUMENTS:
            raise CatalogError(f"{where}: instrument must be one of {INSTRUMENTS}")
        attrs: list[str] = []
        for a in entry["attributes"]:
            attrs.extend(groups.get(a, (a,)))
        m = Metric(entry["name"], entry["instrument"], str(entry["unit"]), tuple(attrs),
                   tuple(entry["sources"]), entry["help"].strip())
        if m.name in seen_otel or m.prom_name in seen_prom:
            raise CatalogError(f"{where}: duplicate name {m.name} / {m.prom_name}")
        seen_otel.add(m.name)
        seen_prom.add(m.prom_name)
        metrics.append(m)
    return Catalog(tuple(doc.get("resource_attributes") or ()), groups, tuple(metrics))


@lru_cache(maxsize=1)
def catalog() -> Catalog:
    """The packaged catalog (loaded once)."""
    return load(resources.files("agent").joinpath("catalog.yaml").read_text(encoding="utf-8"))


def render_docs(cat: Catalog | None = None) -> str:
    """Markdown page listing every metric (docs/metrics.md is this, regenerated)."""
    cat = cat or catalog()
    out = [
        "# Metrics",
        "",
        "Generated from `agent/catalog.yaml` by `python -m agent.catalog --docs > docs/metrics.md`;",
        "a test fails when this page is stale. Do not edit by hand.",
        "",
        f"Every series also carries the resource labels {', '.join(f'`{a}`' for a in cat.resource_attributes)}"
        " (from the agent's config) and any extra site labels.",
        f"Accelerator series carry {', '.join(f'`{a}`' for a in cat.attribute_groups.get('chip', ()))} whatever the vendor.",
        "",
        "| Prometheus name | OpenTelemetry name | type | unit | labels | sources | help |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in cat:
        labels = ", ".join(prometheus_label(a) for a in m.attributes) or "-"
        help_ = m.help.replace("|", "\\|")
        out.append(f"| `{m.prom_name}` | `{m.name}` | {m.prom_type} | `{m.unit or '-'}` | {labels} | "
                   f"{', '.join(m.sources)} | {help_} |")
    return "\n".join(out) + "\n"


def _main(argv: Iterable[str]) -> int:
    argv = list(argv)
    if argv == ["--docs"]:
        sys.stdout.write(render_docs())
        return 0
    for m in catalog():
        print(f"{m.prom_name:55} {m.prom_type:8} {m.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
