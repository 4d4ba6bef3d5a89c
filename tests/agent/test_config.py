"""Agent config: defaults, validation errors that name the key, env overrides, relative paths."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from agent.config import DEFAULT_LISTEN, ConfigError, load, parse

MINIMAL = {"labels": {"cluster": "c1"}}


def test_defaults():
    cfg = parse(MINIMAL, env={})
    assert cfg.labels == {"cluster": "c1", "node": socket.gethostname()}
    assert cfg.interval == 10.0
    assert cfg.listen == DEFAULT_LISTEN
    assert cfg.collector_endpoint == "http://127.0.0.1:4318/v1/metrics"
    assert all(cfg.enabled(n) for n in ("nvml", "dcgm", "neuron", "efa", "power", "xid"))
    assert cfg.ipmitool_command == ("ipmitool", "dcmi", "power", "reading")


@pytest.mark.parametrize("doc, message", [
    ({**MINIMAL, "intervall": "5s"}, "unknown key 'intervall' (did you mean 'interval'?)"),
    ({**MINIMAL, "sources": {"nvlm": {"enabled": False}}}, "unknown key 'sources.nvlm' (did you mean 'sources.nvml'?)"),
    ({**MINIMAL, "sources": {"nvml": {"enable": False}}}, "unknown key 'sources.nvml.enable' (did you mean 'sources.nvml.enabled'?)"),
    ({**MINIMAL, "sources": {"nvml": {"enabled": "no"}}}, "sources.nvml.enabled: expected true or false"),
    ({"labels": {"rack": "r1"}}, "labels.cluster: required"),
    ({"labels": {"cluster": "c", "bad-name": "x"}}, "labels.bad-name: not a valid label name"),
    ({"labels": {"cluster": "c", "job": "x"}}, "labels.job: reserved"),
    ({"labels": {"cluster": "c", "chip": "x"}}, "labels.chip: reserved"),
    ({**MINIMAL, "interval": "soon"}, "interval: expected a duration"),
    ({**MINIMAL, "interval": 0}, "interval: must be positive"),
    ({**MINIMAL, "spool_max_bytes": "lots"}, "spool_max_bytes: expected a size"),
    ({**MINIMAL, "neuron_monitor_command": "neuron-monitor -c x"}, "neuron_monitor_command: expected a list"),
    ({**MINIMAL, "collector_endpoint": "collector:4318"}, "collector_endpoint: expected an http(s) URL"),
    ({**MINIMAL, "listen": "9464"}, "listen: expected host:port"),
    ({**MINIMAL, "compression": "zstd"}, "compression: expected one of gzip, none"),
    (["not", "a", "map"], "must be a YAML map"),
])
def test_bad_config_names_the_key(doc, message):
    with pytest.raises(ConfigError) as err:
        parse(doc, env={})
    assert message in str(err.value)


def test_units_and_base_url():
    cfg = parse({**MINIMAL, "interval": "500ms", "spool_max_bytes": "64MiB",
                 "collector_endpoint": "https://collector.site:4318/"}, env={})
    assert cfg.interval == 0.5 and cfg.spool_max_bytes == 64 * 2**20
    # a base URL gets the OTLP metrics path, as OTEL_EXPORTER_OTLP_ENDPOINT does
    assert cfg.collector_endpoint == "https://collector.site:4318/v1/metrics"
    assert parse({**MINIMAL, "collector_endpoint": "http://gw/custom/path"}, env={}).collector_endpoint == "http://gw/custom/path"


def test_env_overrides_file():
    env = {
        "SHOPFLOOR_AGENT_COLLECTOR_ENDPOINT": "http://collector:4318/v1/metrics",
        "SHOPFLOOR_AGENT_INTERVAL": "30s",
        "SHOPFLOOR_AGENT_LABELS__RACK": "07",
        "SHOPFLOOR_AGENT_SOURCES__NVML__ENABLED": "false",
        "SHOPFLOOR_AGENT_NEURON_MONITOR_COMMAND": '["/opt/aws/neuron/bin/neuron-monitor", "-c", "/etc/nm.json"]',
        "SHOPFLOOR_AGENT_TOKEN": "t0ken",
        "OTHER_VAR": "ignored",
    }
    cfg = parse({**MINIMAL, "interval": "5s", "labels": {"cluster": "c1", "rack": "r1"}}, env=env)
    assert cfg.collector_endpoint == "http://collector:4318/v1/metrics"
    assert cfg.interval == 30.0
    assert cfg.labels["rack"] == "07"          # a label stays a string, leading zero kept
    assert not cfg.enabled("nvml") and cfg.enabled("xid")
    assert cfg.neuron_monitor_command == ("/opt/aws/neuron/bin/neuron-monitor", "-c", "/etc/nm.json")
    assert cfg.collector_token == "t0ken"


def test_unknown_env_key_is_named():
    with pytest.raises(ConfigError) as err:
        parse(MINIMAL, env={"SHOPFLOOR_AGENT_INTERVALL": "5s"})
    assert "'intervall' (from SHOPFLOOR_AGENT_INTERVALL)" in str(err.value)
    assert "did you mean 'interval'" in str(err.value)


def test_relative_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "agent.yaml"
    path.write_text("labels: {cluster: c1, node: n1}\nsysfs_root: ../sys\n"
                    "ipmitool_command: [./fake-ipmitool, dcmi]\n"
                    "neuron_monitor_command: [neuron-monitor, -c, ../nm.json, --period, '5']\n")
    cfg = load(path, env={})
    assert cfg.sysfs_root == str(tmp_path / "sys")
    assert cfg.ipmitool_command == (str(tmp_path / "conf" / "fake-ipmitool"), "dcmi")
    # a bare program name stays on PATH; ./ and ../ arguments are relative to the file
    assert cfg.neuron_monitor_command == ("neuron-monitor", "-c", str(tmp_path / "nm.json"), "--period", "5")


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels: {cluster: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad, env={})


def test_example_config_is_valid():
    from tests.support import ROOT
    cfg = load(ROOT / "docs" / "agent.example.yaml", env={})
    assert cfg.labels["cluster"]


def test_cli_invalid_config_exits_nonzero_with_reason(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("labels: {cluster: c1}\nsysfs_rot: /sys\n")
    proc = subprocess.run([sys.executable, "-m", "shopfloor.cli", "agent", "scrape", "--once", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown key 'sysfs_rot' (did you mean 'sysfs_root'?)" in proc.stderr
    assert proc.stdout == ""
