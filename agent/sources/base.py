"""The one small protocol every agent source implements, and the data point it returns.

A source has a name, says whether its hardware is present on this host, and collects data
points. A source that finds no hardware reports supported() == (False, reason): that is not an
error. A source whose collect() raises is reported by the agent in its self-metrics
(shopfloor_agent_scrape_success{source=...} = 0) and the other sources go on.

Every path root, command and library handle a source uses is passed to its constructor, so
tests point it at recorded fixtures (tests/fixtures/) without patching any code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, runtime_checkable

from agent.catalog import catalog


@dataclass(frozen=True, slots=True)
class Point:
    """One data point of a catalog metric.

    name        the metric's OpenTelemetry name (must be in agent/catalog.yaml)
    value       the value in the catalog's unit; for counters the cumulative total
    attributes  data-point attributes (chip labels, link, sensor, ...); resource labels
                (cluster, node, rack) are added by the exporter, not by sources
    time_ns     when it was observed; 0 means "stamp it at export time"
    """

    name: str
    value: float
    attributes: Mapping[str, str] = field(default_factory=dict)
    time_ns: int = 0


def point(name: str, value: float, time_ns: int = 0, **attributes: str | int) -> Point:
    """Build a Point, checking the name against the catalog (a typo fails loudly in tests)."""
    if name not in catalog():
        raise KeyError(f"metric {name!r} is not in agent/catalog.yaml")
    return Point(name, float(value), {k: str(v) for k, v in attributes.items()}, time_ns)


# Called by event-driven sources (XID) to push points at once instead of at the next scrape.
EventSink = Callable[[list[Point]], None]


@runtime_checkable
class Source(Protocol):
    name: str

    def supported(self) -> tuple[bool, str]:
        """(True, "") when the hardware/tool is present; (False, why) otherwise."""
        ...

    def collect(self) -> list[Point]:
        """Read everything once. Raise on failure; the agent records it per source."""
        ...


class EventSource(Source, Protocol):
    """A source that also pushes points as events happen (started once by the agent)."""

    def start_events(self, sink: EventSink) -> None: ...

    def stop_events(self) -> None: ...
