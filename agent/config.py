"""The agent's configuration: one YAML file plus SHOPFLOOR_AGENT_* environment overrides.

Every key is known and typed here; an unknown key is an error that names it (with a "did you
mean"), so a typo never silently leaves a default in place. Environment variables override the
file: SHOPFLOOR_AGENT_<KEY>, nested keys joined by "__", values parsed as YAML scalars/lists:

    SHOPFLOOR_AGENT_COLLECTOR_ENDPOINT=http://collector:4318
    SHOPFLOOR_AGENT_INTERVAL=30s
    SHOPFLOOR_AGENT_LABELS__CLUSTER=trn-east
    SHOPFLOOR_AGENT_SOURCES__NVML__ENABLED=false
    SHOPFLOOR_AGENT_TOKEN=...            (the collector token; kept out of the file)

The documented example with every key is docs/agent.example.yaml.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

ENV_PREFIX = "SHOPFLOOR_AGENT_"
TOKEN_ENV = "SHOPFLOOR_AGENT_TOKEN"
SOURCE_NAMES = ("nvml", "dcgm", "neuron", "efa", "power", "xid")
# 9464 is the port the OpenTelemetry Prometheus exporters use by convention; loopback by default
# so a node does not expose /metrics to the network unless the site asks for it.
DEFAULT_LISTEN = "127.0.0.1:9464"
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


@dataclass(frozen=True)
class SourceConfig:
    enabled: bool = True


@dataclass(frozen=True)
class AgentConfig:
    labels: dict[str, str]                    # resource labels: cluster (required), node, rack, site...
    sysfs_root: str = "/sys"
    procfs_root: str = "/proc"
    kmsg_path: str = "/dev/kmsg"
    neuron_monitor_command: tuple[str, ...] = ("neuron-monitor",)
    ipmitool_command: tuple[str, ...] = ("ipmitool", "dcmi", "power", "reading")
    # Off unless set: a node without dcgm-exporter would otherwise report a failed dcgm scrape
    # every interval. dcgm-exporter's own default is http://127.0.0.1:9400/metrics.
    dcgm_exporter_url: str = ""
    dcgm_timeout: float = 2.0
    collector_endpoint: str = "http://127.0.0.1:4318/v1/metrics"   # "" = do not push
    collector_token: str | None = None
    export_timeout: float = 10.0
    compression: str = "gzip"
    interval: float = 10.0
    listen: str = DEFAULT_LISTEN                # "" = no /metrics endpoint
    metrics_token: str | None = None            # bearer token required on /metrics when set
    spool_dir: str = "/var/lib/shopfloor-agent/spool"
    spool_max_bytes: int = 256 * 1024 * 1024
    state_dir: str = "/var/lib/shopfloor-agent/state"
    sources: dict[str, SourceConfig] = field(default_factory=lambda: {n: SourceConfig() for n in SOURCE_NAMES})

    @property
    def resource(self) -> dict[str, str]:
        return dict(self.labels)

    def enabled(self, source: str) -> bool:
        return self.sources[source].enabled


# ---------------------------------------------------------------- parsing helpers

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _duration(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like 10s, 500ms or 1m, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise ConfigError(f"{key}: expected a duration like 10s, 500ms or 1m, got {value!r}")
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if seconds <= 0:
        raise ConfigError(f"{key}: must be positive, got {value!r}")
    return seconds


def _size(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like 256MiB or a number of bytes, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ConfigError(f"{key}: expected a size like 256MiB or a number of bytes, got {value!r}")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if size <= 0:
        raise ConfigError(f"{key}: must be positive, got {value!r}")
    return size


def _string(key: str, value: Any, allow_empty: bool = True) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    value = str(value)
    if not allow_empty and not value:
        raise ConfigError(f"{key}: must not be empty")
    return value


def _command(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ConfigError(f"{key}: expected a list (the command and its arguments), got the string {value!r}")
    if not isinstance(value, list) or not value or not all(isinstance(v, (str, int)) for v in value):
        raise ConfigError(f"{key}: expected a non-empty list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _url(key: str, value: Any, *, otlp: bool = False) -> str:
    value = _string(key, value)
    if not value:
        return ""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key}: expected an http(s) URL, got {value!r}")
    if otlp and parts.path in ("", "/"):
        # Like OTEL_EXPORTER_OTLP_ENDPOINT: a base URL gets the metrics path appended.
        value = value.rstrip("/") + "/v1/metrics"
    return value


def _listen(key: str, value: Any) -> str:
    value = _string(key, value)
    if not value:
        return ""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: expected host:port (e.g. {DEFAULT_LISTEN}), got {value!r}")
    return value


def _optional_string(key: str, value: Any) -> str | None:
    return None if value is None else _string(key, value)


# key -> parser. Order is the documented order.
_SCALARS = {
    "sysfs_root": lambda k, v: _string(k, v, allow_empty=False),
    "procfs_root": lambda k, v: _string(k, v, allow_empty=False),
    "kmsg_path": lambda k, v: _string(k, v, allow_empty=False),
    "neuron_monitor_command": _command,
    "ipmitool_command": _command,
    "dcgm_exporter_url": _url,
    "dcgm_timeout": _duration,
    "collector_endpoint": lambda k, v: _url(k, v, otlp=True),
    "collector_token": _optional_string,
    "export_timeout": _duration,
    "compression": lambda k, v: _choice(k, v, ("gzip", "none")),
    "interval": _duration,
    "listen": _listen,
    "metrics_token": _optional_string,
    "spool_dir": lambda k, v: _string(k, v, allow_empty=False),
    "spool_max_bytes": _size,
    "state_dir": lambda k, v: _string(k, v, allow_empty=False),
}
KEYS = (*_SCALARS, "labels", "sources")
_LIST_KEYS = ("neuron_monitor_command", "ipmitool_command")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _unknown(key: str, prefix: str, known, origin: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{prefix}{key}'{origin}{hint}; known keys: {', '.join(known)}")


def _labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"labels: expected a map (cluster: ..., rack: ...), got {value!r}")
    labels: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _LABEL_RE.match(k) or k.startswith("__"):
            raise ConfigError(f"labels.{k}: not a valid label name (letters, digits, _; not starting with __)")
        if v is None or isinstance(v, (dict, list)):
            raise ConfigError(f"labels.{k}: expected a string value, got {v!r}")
        labels[k] = str(v)
    reserved = _reserved_labels()
    for k in labels:
        if k in reserved:
            raise ConfigError(f"labels.{k}: reserved ({reserved[k]}); choose another name")
    if not labels.get("cluster"):
        raise ConfigError("labels.cluster: required (the cluster this node belongs to)")
    labels.setdefault("node", socket.gethostname())
    return labels


def _reserved_labels() -> dict[str, str]:
    """Label names a site label must not take: the collector's job/instance, and every data-point
    attribute in the catalog (a resource label named `chip` would collide with the chip's)."""
    from agent.catalog import catalog, prometheus_label
    out = {"job": "the collector sets job from service.name",
           "instance": "the collector sets instance from service.instance.id"}
    for m in catalog():
        for a in m.attributes:
            out.setdefault(prometheus_label(a), f"a label of {m.prom_name}")
    return out


def _sources(value: Any) -> dict[str, SourceConfig]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"sources: expected a map of source name to settings, got {value!r}")
    out = {n: SourceConfig() for n in SOURCE_NAMES}
    for name, settings in value.items():
        if name not in SOURCE_NAMES:
            raise _unknown(str(name), "sources.", SOURCE_NAMES)
        settings = settings if settings is not None else {}
        if not isinstance(settings, dict):
            raise ConfigError(f"sources.{name}: expected a map like {{enabled: true}}, got {settings!r}")
        for k in settings:
            if k != "enabled":
                raise _unknown(str(k), f"sources.{name}.", ("enabled",))
        out[name] = SourceConfig(enabled=_bool(f"sources.{name}.enabled", settings.get("enabled", True)))
    return out


# ---------------------------------------------------------------- environment overrides

def _apply_env(doc: dict, env: Mapping[str, str]) -> dict:
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in doc.items()}
    for var, raw in sorted(env.items()):
        if not var.startswith(ENV_PREFIX) or var == TOKEN_ENV:
            continue
        path = [p.lower() for p in var[len(ENV_PREFIX):].split("__")]
        if path[0] not in KEYS:
            raise _unknown(path[0], "", KEYS, f" (from {var})")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{var}: not a valid YAML value: {exc}") from None
        if path[0] == "labels" and len(path) == 2:
            # Label values are strings even when they look like numbers (rack: 07).
            doc.setdefault("labels", {})
            doc["labels"] = dict(doc["labels"] or {})
            doc["labels"][path[1]] = raw
        elif path[0] == "sources" and len(path) == 3:
            sources = dict(doc.get("sources") or {})
            sources[path[1]] = dict(sources.get(path[1]) or {})
            sources[path[1]][path[2]] = value
            doc["sources"] = sources
        elif len(path) == 1:
            # Commands are YAML lists ('["neuron-monitor", "-c", "x.json"]'); every other key is
            # taken as written (durations and sizes accept strings like "30s" and "1GiB").
            doc[path[0]] = value if path[0] in _LIST_KEYS else raw
        else:
            raise ConfigError(f"{var}: {'.'.join(path)} is not a configurable key")
    if env.get(TOKEN_ENV):
        doc["collector_token"] = env[TOKEN_ENV]
    return doc


# ---------------------------------------------------------------- entry points

def parse(doc: Any, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Validate a parsed YAML document (plus environment overrides) into an AgentConfig."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"the config must be a YAML map of keys, got {type(doc).__name__}")
    doc = _apply_env(doc, os.environ if env is None else env)
    for key in doc:
        if key not in KEYS:
            raise _unknown(str(key), "", KEYS)
    values: dict[str, Any] = {}
    for key, parser in _SCALARS.items():
        if key in doc:
            values[key] = parser(key, doc[key])
    values["labels"] = _labels(doc.get("labels") if "labels" in doc else {})
    values["sources"] = _sources(doc.get("sources"))
    cfg = AgentConfig(**values)
    if cfg.collector_token and cfg.collector_endpoint.startswith("http://") and \
            urlsplit(cfg.collector_endpoint).hostname not in ("127.0.0.1", "localhost", "::1"):
        # Not an error (sites terminate TLS in front of the collector), but worth knowing.
        import logging
        logging.getLogger(__name__).warning(
            "collector_token is sent over plain http to %s; use https outside the node", cfg.collector_endpoint)
    return cfg


def load(path: str | os.PathLike, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read and validate a config file; relative paths in it are relative to the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    cfg = parse(doc, env)
    return _resolve_paths(cfg, path.parent)


def _resolve_paths(cfg: AgentConfig, base: Path) -> AgentConfig:
    """Make relative roots, commands and directories relative to the config file's folder, so a
    fixture config works from any working directory."""
    import dataclasses

    def rel(p: str) -> str:
        return p if os.path.isabs(p) else str((base / p).resolve())

    def cmd(c: tuple[str, ...]) -> tuple[str, ...]:
        # The program is resolved when it names a file path (contains a slash; a bare name is
        # looked up on PATH as usual), an argument when it starts with ./ or ../.
        first = rel(c[0]) if "/" in c[0] else c[0]
        return (first, *(rel(a) if a.startswith(("./", "../")) else a for a in c[1:]))

    return dataclasses.replace(
        cfg, sysfs_root=rel(cfg.sysfs_root), procfs_root=rel(cfg.procfs_root), kmsg_path=rel(cfg.kmsg_path),
        spool_dir=rel(cfg.spool_dir), state_dir=rel(cfg.state_dir),
        neuron_monitor_command=cmd(cfg.neuron_monitor_command), ipmitool_command=cmd(cfg.ipmitool_command))
