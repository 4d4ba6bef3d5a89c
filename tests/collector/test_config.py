"""Collector configuration: YAML + environment overrides + flags, and clear errors."""

from __future__ import annotations

import subprocess

import pytest

from collector.config import ConfigError, load, parse_duration
from tests.support import PYTHON, ROOT


def test_yaml_env_and_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listen: 0.0.0.0:9700\nstorage: {retention_raw: 30d, export_dir: /x}\n"
                   "ingest: {max_series_per_metric: 10}\nrules: {interval: 15s}\n")
    env = {"SHOPFLOOR_COLLECTOR_TOKEN": "t0k", "SHOPFLOOR_COLLECTOR__INGEST__MAX_INFLIGHT": "9",
           "SHOPFLOOR_COLLECTOR__STORAGE__RETENTION_ROLLUP": "2y"}
    c = load(cfg, env=env, overrides={"db": str(tmp_path / "x.duckdb"), "listen": None})
    assert (c.host, c.port, c.token) == ("0.0.0.0", 9700, "t0k")
    assert c.storage.retention_raw == 30 * 86400 and c.storage.retention_rollup == 2 * 365 * 86400
    assert c.storage.export_dir == "/x" and c.ingest.max_series_per_metric == 10 and c.ingest.max_inflight == 9
    assert c.rules == {"interval": "15s"} and c.db.endswith("x.duckdb")
    assert load(cfg, env={}, overrides={"listen": "127.0.0.1:1"}).port == 1


@pytest.mark.parametrize("text, where", [
    ("nonsense: 1\n", "unknown top-level keys"),
    ("ingest: {max_inflight: -1}\n", "ingest.max_inflight: must be positive"),
    ("ingest: {max_inflght: 3}\n", "ingest: unknown keys ['max_inflght']"),
    ("storage: {retention_raw: soon}\n", "storage.retention_raw: 'soon' is not a duration"),
    ("listen: nowhere\n", "listen: 'nowhere' is not HOST:PORT"),
    ("auth: {token: x, user: y}\n", "auth: only `token` is known"),
    ("- a list\n", "top level must be a mapping"),
    ("a: [unclosed\n", "not valid YAML"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, where):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(cfg, env={})
    assert where in str(err.value)


def test_durations():
    assert parse_duration("90s", "x") == 90 and parse_duration("1.5h", "x") == 5400 and parse_duration(7, "x") == 7
    with pytest.raises(ConfigError):
        parse_duration("1 day", "x")


def test_cli_reports_bad_config_and_has_no_token_flag(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("ingest: {max_inflight: zero}\n")
    r = subprocess.run([PYTHON, "-m", "shopfloor", "collector", "--config", str(cfg)], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "ingest.max_inflight" in r.stderr
    r = subprocess.run([PYTHON, "-m", "shopfloor", "collector", "--token", "x"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "unrecognized arguments: --token" in r.stderr


def test_second_collector_on_the_same_file_says_why(tmp_path):
    from tests.collector.conftest import start_collector

    with start_collector(tmp_path) as c:
        r = subprocess.run([PYTHON, "-m", "shopfloor", "collector", "--db", str(c.db), "--listen", "127.0.0.1:1"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 2 and f"cannot open {c.db}" in r.stderr and "lock" in r.stderr
