"""docker/: what can be checked without a Docker engine (none runs on these machines).

Checked here: the compose file parses and every path, image build and command it names exists
or is accepted by the command; the Dockerfiles copy files that exist and start commands the
`shopfloor` CLI has; the Alertmanager config passes amtool; the collector config the image
bakes in loads; the systemd unit passes `systemd-analyze verify`.
Not checkable here: building the images and running the stack. `docker compose config` runs
with the v2 plugin where it exists, else with Debian's docker-compose (1.29) package; the docker
CLI on these machines has no compose plugin.
"""

from __future__ import annotations

import configparser
import glob
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from collector.config import from_dict
from collector.rules.loader import load_rule_files
from collector.rules.service import RulesConfig
from shopfloor.cli import COMMANDS
from tests.support import PYTHON, ROOT, require_binary

DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())


def dockerfile_instructions(path):
    """(instruction, argument) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile.agent", "Dockerfile.collector"])
def test_dockerfile_copies_existing_files_and_runs_a_real_command(name):
    instr = dockerfile_instructions(DOCKER / name)
    base = [arg for ins, arg in instr if ins == "FROM"]
    assert base and all(":" in b for b in base), "base images are pinned to a tag"
    for ins, arg in instr:
        if ins == "COPY":
            *sources, _dest = shlex.split(arg)
            for src in sources:
                assert glob.glob(str(ROOT / src)), f"{name}: COPY {src} matches nothing in the build context"
    entry = next(arg for ins, arg in instr if ins == "ENTRYPOINT")
    cmd = next(arg for ins, arg in instr if ins == "CMD")
    assert yaml.safe_load(entry) == ["shopfloor"]
    assert yaml.safe_load(cmd)[0] in COMMANDS


def test_agent_image_has_agent_dependencies_only():
    instr = dockerfile_instructions(DOCKER / "Dockerfile.agent")
    copied = [shlex.split(arg)[0] for ins, arg in instr if ins == "COPY"]
    assert "collector" not in copied
    installs = [arg for ins, arg in instr if ins == "RUN" and "pip install" in arg]
    assert installs and all("[" not in arg for arg in installs), "no extras: the collector's deps stay out"


def test_compose_services_paths_and_commands():
    services = COMPOSE["services"]
    assert set(services) == {"collector", "grafana", "alertmanager", "simulator"}
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                assert (DOCKER / src).exists(), f"{name}: bind mount {src} does not exist"
            else:
                assert src in COMPOSE["volumes"], f"{name}: named volume {src} is not declared"
    # Grafana's mounts are where the provisioning files say the dashboards are
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = yaml.safe_load((ROOT / "dashboards/provisioning/dashboards/shopfloor.yaml").read_text())["providers"][0]
    assert grafana_mounts["../dashboards/json"] == provider["options"]["path"]
    assert grafana_mounts["../dashboards/provisioning"] == "/etc/grafana/provisioning"
    assert services["grafana"]["environment"]["SHOPFLOOR_COLLECTOR_URL"] == "http://collector:9600"


def test_simulator_command_is_accepted_by_shopfloor_simulate():
    args = COMPOSE["services"]["simulator"]["command"]
    assert args[0] == "simulate"
    help_text = subprocess.run([PYTHON, "-m", "shopfloor", "simulate", "--help"], capture_output=True,
                               text=True, cwd=ROOT, timeout=60).stdout
    for a in args[1:]:
        flag = a.split("=")[0]
        assert flag in help_text, f"shopfloor simulate has no {flag}"


def test_baked_in_collector_config_loads_and_its_rule_glob_matches_the_copied_alerts():
    doc = yaml.safe_load((DOCKER / "collector.yaml").read_text())
    cfg = from_dict(doc)
    assert cfg.host == "0.0.0.0" and cfg.port == 9600
    rules = RulesConfig.from_section(cfg.rules)
    assert rules.alertmanager_urls == ["http://alertmanager:9093"]
    copy = next(arg for ins, arg in dockerfile_instructions(DOCKER / "Dockerfile.collector")
                if ins == "COPY" and arg.startswith("alerts/"))
    dest_dir = shlex.split(copy)[-1]
    assert rules.rule_files == [dest_dir + "*.yaml"]
    assert load_rule_files(["alerts/*.yaml"], base_dir=ROOT)  # the files that get copied there


def test_alertmanager_config_is_valid_and_inhibits_real_alerts():
    amtool = require_binary("amtool")
    res = subprocess.run([amtool, "check-config", str(DOCKER / "alertmanager.yml")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    alerts = {r.name for g in load_rule_files(["alerts/*.yaml"], base_dir=ROOT) for r in g.rules
              if r.kind == "alerting"}
    text = (DOCKER / "alertmanager.yml").read_text()
    named = set(re.findall(r"alertname=~?\"([^\"]+)\"", text))
    for expr in named:
        for name in expr.split("|"):
            assert name in alerts, f"alertmanager.yml names unknown alert {name}"


def test_systemd_unit(tmp_path):
    unit = (DOCKER / "shopfloor-agent.service").read_text()
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(unit)
    service = parser["Service"]
    assert service["ExecStart"].split()[1:3] == ["agent", "--config"]
    assert set(service["AmbientCapabilities"].split()) == {"CAP_SYSLOG", "CAP_DAC_READ_SEARCH"}
    assert service["CapabilityBoundingSet"] == service["AmbientCapabilities"]
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["ProtectKernelLogs"] == "no"      # /dev/kmsg must stay readable (see the unit)
    assert "TOKEN" not in service.get("Environment", "")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("missing tool: systemd-analyze (the parse checks above ran)")
    # verify checks that ExecStart exists: point it at this checkout's `shopfloor` entry point.
    exe = shutil.which("shopfloor") or str(ROOT / ".venv" / "bin" / "shopfloor")
    local = tmp_path / "shopfloor-agent.service"
    local.write_text(unit.replace("/opt/shopfloor/bin/shopfloor", exe))
    res = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    complaints = [ln for ln in (res.stdout + res.stderr).splitlines() if "shopfloor-agent.service" in ln]
    assert res.returncode == 0 and complaints == [], res.stdout + res.stderr


def _compose_command() -> list[str]:
    """`docker compose` (the v2 plugin) where it exists, else Debian's docker-compose (1.29)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.skip("missing tool: docker compose (the docker CLI here has no compose plugin; "
                "Debian's docker-compose package provides the command)")


def test_docker_compose_config_accepts_the_file_and_requires_a_token(tmp_path):
    compose = _compose_command()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    res = subprocess.run([*compose, "-f", str(DOCKER / "compose.yaml"), "config"], capture_output=True, text=True,
                         timeout=120, env={**env, "SHOPFLOOR_TOKEN": "test-token"})
    assert res.returncode == 0, res.stdout + res.stderr
    resolved = yaml.safe_load(res.stdout)
    assert resolved["services"]["collector"]["environment"]["SHOPFLOOR_COLLECTOR_TOKEN"] == "test-token"
    assert set(resolved["services"]) == set(COMPOSE["services"])
    missing = subprocess.run([*compose, "-f", str(DOCKER / "compose.yaml"), "config"], capture_output=True,
                             text=True, timeout=120, env=env)
    assert missing.returncode != 0 and "SHOPFLOOR_TOKEN" in missing.stdout + missing.stderr
