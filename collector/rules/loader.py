"""Read Prometheus-format rule files (the same alerts/*.yaml promtool checks) into rule objects.

The format is Prometheus' own (groups: name, interval, rules: alert|record, expr, for,
keep_firing_for, labels, annotations). Files are read with PyYAML; every expression is parsed
with promql_parser and every template with collector.rules.template at load time, so a bad file
is refused with its file and rule named instead of failing later at evaluation.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import promql_parser
import yaml

from collector.config import ConfigError
from collector.promql.values import duration_seconds
from collector.rules.template import Template, TemplateError

_GROUP_KEYS = {"name", "interval", "rules", "limit", "query_offset"}
_ALERT_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
_RECORD_KEYS = {"record", "expr", "labels"}


class RuleFileError(ConfigError):
    pass


@dataclass
class RuleSpec:
    kind: str                        # "alerting" | "recording"
    name: str                        # alert name or recorded metric name
    expr: str
    for_s: float = 0.0
    keep_firing_for_s: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    label_templates: dict[str, Template] = field(default_factory=dict, repr=False)
    annotation_templates: dict[str, Template] = field(default_factory=dict, repr=False)


@dataclass
class GroupSpec:
    name: str
    file: str
    interval_s: float | None          # None: the evaluator's default interval
    rules: list[RuleSpec]


def _duration(value, where: str) -> float:
    """A Prometheus duration ("30s", "1h30m", or a number of seconds) in seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        try:
            seconds = duration_seconds(str(value))
        except ValueError:
            raise RuleFileError(f"{where}: {value!r} is not a duration (e.g. 30s, 5m, 1h30m)") from None
    if seconds < 0:
        raise RuleFileError(f"{where}: must not be negative")
    return seconds


def parse_rule_file(text: str, source: str) -> list[GroupSpec]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleFileError(f"{source}: not YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("groups"), list):
        raise RuleFileError(f"{source}: a rule file is a mapping with a `groups` list")
    groups: list[GroupSpec] = []
    names: set[str] = set()
    for gi, g in enumerate(doc["groups"]):
        where = f"{source}: groups[{gi}]"
        if not isinstance(g, dict) or not g.get("name"):
            raise RuleFileError(f"{where}: a group needs a name")
        if set(g) - _GROUP_KEYS:
            raise RuleFileError(f"{where}: unknown keys {sorted(set(g) - _GROUP_KEYS)}")
        if g["name"] in names:
            raise RuleFileError(f"{where}: duplicate group name {g['name']!r}")
        names.add(g["name"])
        if g.get("limit") not in (None, 0):
            raise RuleFileError(f"{where}.limit: alert/series limits are not supported by the collector")
        if "query_offset" in g and _duration(g["query_offset"], f"{where}.query_offset") != 0:
            raise RuleFileError(f"{where}.query_offset: not supported by the collector")
        interval = _duration(g["interval"], f"{where}.interval") if "interval" in g else None
        if interval == 0:
            raise RuleFileError(f"{where}.interval: must be positive")
        rules = [_parse_rule(r, f"{where} ({g['name']}) rules[{ri}]") for ri, r in enumerate(g.get("rules") or [])]
        groups.append(GroupSpec(str(g["name"]), source, interval, rules))
    return groups


def _parse_rule(r, where: str) -> RuleSpec:
    if not isinstance(r, dict):
        raise RuleFileError(f"{where}: a rule is a mapping")
    if ("alert" in r) == ("record" in r):
        raise RuleFileError(f"{where}: a rule has exactly one of `alert` or `record`")
    kind = "alerting" if "alert" in r else "recording"
    allowed = _ALERT_KEYS if kind == "alerting" else _RECORD_KEYS
    if set(r) - allowed:
        raise RuleFileError(f"{where}: unknown keys {sorted(set(r) - allowed)}")
    name = str(r["alert"] if kind == "alerting" else r["record"])
    expr = str(r.get("expr") or "").strip()
    if not expr:
        raise RuleFileError(f"{where} ({name}): empty expr")
    try:
        promql_parser.parse(expr)
    except ValueError as exc:  # promql_parser's parse errors
        raise RuleFileError(f"{where} ({name}): bad expression: {exc}") from None
    labels = {str(k): str(v) for k, v in (r.get("labels") or {}).items()}
    annotations = {str(k): str(v) for k, v in (r.get("annotations") or {}).items()}
    try:
        label_t = {k: Template(v) for k, v in labels.items()}
        ann_t = {k: Template(v) for k, v in annotations.items()}
    except TemplateError as exc:
        raise RuleFileError(f"{where} ({name}): {exc}") from None
    return RuleSpec(kind, name, expr,
                    _duration(r.get("for", 0), f"{where}.for"),
                    _duration(r.get("keep_firing_for", 0), f"{where}.keep_firing_for"),
                    labels, annotations, label_t, ann_t)


def load_rule_files(patterns: list[str], base_dir: str | Path | None = None) -> list[GroupSpec]:
    """Every group of every file matching the glob patterns (relative ones from base_dir)."""
    groups: list[GroupSpec] = []
    seen: set[tuple[str, str]] = set()
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() or base_dir is None else str(Path(base_dir) / pattern)
        paths = sorted(glob.glob(full))
        if not paths:
            raise RuleFileError(f"rules.rule_files: {pattern!r} matches no file")
        for path in paths:
            for g in parse_rule_file(Path(path).read_text(encoding="utf-8"), path):
                if (g.file, g.name) in seen:
                    continue
                seen.add((g.file, g.name))
                groups.append(g)
    return groups
