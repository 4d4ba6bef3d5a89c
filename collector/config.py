"""The collector's configuration: one YAML file, then environment overrides, then CLI flags.

    listen: "127.0.0.1:9600"          # HOST:PORT of the HTTP API (OTLP, remote write, PromQL, SQL)
    db: "shopfloor.duckdb"            # the embedded DuckDB file (":memory:" for throwaway runs)
    auth:
      token: null                     # bearer token required on every endpoint but /-/healthy
    ingest:
      max_body_bytes: 16777216        # compressed request body (413 above it)
      max_decompressed_bytes: 67108864  # after gzip/snappy (413 above it: decompression bombs)
      max_inflight: 8                 # requests decoded/written at once (they share group commits)
      queue_timeout_s: 2.0            # wait this long for a slot, then 429 + Retry-After
      retry_after_s: 1
      max_series_per_metric: 200000
      max_series_total: 5000000
    storage:
      retention_raw: 15d              # raw samples older than this are deleted
      retention_rollup_5m: 90d        # rollup_5m rows older than this are deleted
      retention_rollup: 400d          # rollup_1h rows older than this are deleted
      maintenance_interval_s: 60      # rollups, compaction, retention (apscheduler job)
      compact_after_s: 3600           # raw samples older than this are rewritten sorted by series
      export_dir: null                # set to export closed days as Hive-partitioned Parquet
    sql:
      timeout_s: 10
      max_rows: 100000
    query: {}                         # owned by collector.promql
    rules: {}                         # owned by collector.rules
    health: {}                        # owned by collector.health
    remediation: {}                   # owned by collector.remediate

Environment overrides: SHOPFLOOR_COLLECTOR_TOKEN (auth.token), SHOPFLOOR_COLLECTOR_LISTEN,
SHOPFLOOR_COLLECTOR_DB, and SHOPFLOOR_COLLECTOR__<SECTION>__<KEY> for any scalar (for example
SHOPFLOOR_COLLECTOR__STORAGE__RETENTION_RAW=30d). The token never comes from the command line,
where `ps` would show it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    pass


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)?$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 365 * 86400, None: 1}


def parse_duration(value: Any, where: str) -> float:
    """Seconds from a number or a Prometheus-style duration string ("15d", "90s", "1h")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.match(str(value).strip())
    if not m:
        raise ConfigError(f"{where}: {value!r} is not a duration (e.g. 90s, 15m, 12h, 15d)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


@dataclass
class IngestConfig:
    max_body_bytes: int = 16 << 20
    max_decompressed_bytes: int = 64 << 20
    max_inflight: int = 8   # 4 -> 8: 470k -> 580k samples/s (benchmarks/ingest.py, 8 clients): bigger group commits
    queue_timeout_s: float = 2.0
    retry_after_s: int = 1
    max_series_per_metric: int = 200_000
    max_series_total: int = 5_000_000


@dataclass
class StorageConfig:
    retention_raw: float = 15 * 86400
    retention_rollup_5m: float = 90 * 86400
    retention_rollup: float = 400 * 86400
    maintenance_interval_s: float = 60
    compact_after_s: float = 3600
    export_dir: str | None = None


@dataclass
class SqlConfig:
    timeout_s: float = 10.0
    max_rows: int = 100_000


@dataclass
class Config:
    listen: str = "127.0.0.1:9600"
    db: str = "shopfloor.duckdb"
    token: str | None = None
    ingest: IngestConfig = field(default_factory=IngestConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    sql: SqlConfig = field(default_factory=SqlConfig)
    # Sections validated by the modules that own them.
    query: dict = field(default_factory=dict)
    rules: dict = field(default_factory=dict)
    health: dict = field(default_factory=dict)
    remediation: dict = field(default_factory=dict)

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen: {listen!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


_DURATION_FIELDS = {"retention_raw", "retention_rollup", "retention_rollup_5m", "maintenance_interval_s", "compact_after_s",
                    "queue_timeout_s", "timeout_s"}


def _section(cls, raw: Any, where: str):
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    out = cls()
    for key, value in raw.items():
        default = getattr(out, key)
        if key in _DURATION_FIELDS:
            value = parse_duration(value, f"{where}.{key}")
            if value < 0:
                raise ConfigError(f"{where}.{key}: must not be negative")
        elif isinstance(default, bool):
            value = _bool(value, f"{where}.{key}")
        elif isinstance(default, int):
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.{key}: {value!r} is not an integer") from None
            if value <= 0:
                raise ConfigError(f"{where}.{key}: must be positive")
        elif value is not None:
            value = str(value)
        setattr(out, key, value)
    return out


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: {value!r} is not a boolean")


def from_dict(doc: Mapping[str, Any] | None) -> Config:
    doc = dict(doc or {})
    allowed = {"listen", "db", "auth", "ingest", "storage", "sql", "query", "rules", "health", "remediation"}
    unknown = set(doc) - allowed
    if unknown:
        raise ConfigError(f"unknown top-level keys {sorted(unknown)} (known: {sorted(allowed)})")
    cfg = Config()
    if "listen" in doc:
        cfg.listen = str(doc["listen"])
        split_listen(cfg.listen)
    if "db" in doc:
        cfg.db = str(doc["db"])
    auth = doc.get("auth") or {}
    if not isinstance(auth, Mapping) or set(auth) - {"token"}:
        raise ConfigError("auth: only `token` is known")
    cfg.token = str(auth["token"]) if auth.get("token") else None
    cfg.ingest = _section(IngestConfig, doc.get("ingest"), "ingest")
    cfg.storage = _section(StorageConfig, doc.get("storage"), "storage")
    cfg.sql = _section(SqlConfig, doc.get("sql"), "sql")
    for name in ("query", "rules", "health", "remediation"):
        value = doc.get(name) or {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: must be a mapping")
        setattr(cfg, name, dict(value))
    return cfg


def apply_env(doc: dict, env: Mapping[str, str]) -> dict:
    """Fold SHOPFLOOR_COLLECTOR_* variables into a raw config document."""
    doc = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in doc.items()}
    if env.get("SHOPFLOOR_COLLECTOR_TOKEN"):
        doc.setdefault("auth", {})["token"] = env["SHOPFLOOR_COLLECTOR_TOKEN"]
    if env.get("SHOPFLOOR_COLLECTOR_LISTEN"):
        doc["listen"] = env["SHOPFLOOR_COLLECTOR_LISTEN"]
    if env.get("SHOPFLOOR_COLLECTOR_DB"):
        doc["db"] = env["SHOPFLOOR_COLLECTOR_DB"]
    prefix = "SHOPFLOOR_COLLECTOR__"
    for key, value in env.items():
        if key.startswith(prefix):
            parts = key[len(prefix):].lower().split("__")
            if len(parts) != 2:
                raise ConfigError(f"{key}: expected {prefix}<SECTION>__<KEY>")
            section = doc.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"{key}: {parts[0]} is not a section")
            section[parts[1]] = yaml.safe_load(value)
    return doc


def load(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """Read the YAML file (if any), apply the environment, then explicit overrides (CLI flags)."""
    doc: dict = {}
    if path:
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"config {path}: top level must be a mapping")
    doc = apply_env(doc, os.environ if env is None else env)
    for key, value in (overrides or {}).items():
        if value is not None:
            doc[key] = value
    return from_dict(doc)
