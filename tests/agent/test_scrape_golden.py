"""End to end: `shopfloor agent scrape --once` on the recorded fixture node, diffed against a golden
file, and accepted by `promtool check metrics`.

The command runs as a subprocess with tests/fixtures/agent/fixture-node.yaml (sysfs with EFA,
hwmon and RAPL; procfs; a kmsg log with XIDs; a fake neuron-monitor printing trn1.jsonl; a fake
ipmitool) and a dcgm-exporter page served over HTTP by a local `python -m http.server`.

Volatile values: only shopfloor_agent_scrape_duration_seconds (wall time) changes between runs;
its sample values are replaced by VOLATILE in the comparison (the series must still be there).
Regenerate the golden file after an intended change with
    SHOPFLOOR_UPDATE_GOLDEN=1 .venv/bin/pytest tests/agent/test_scrape_golden.py
and review the diff.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from agent.catalog import catalog
from tests.support import FIXTURES, PYTHON, ROOT, free_port, require_binary, running

GOLDEN = ROOT / "tests" / "golden" / "scrape-once.prom"
CONFIG = FIXTURES / "agent" / "fixture-node.yaml"
VOLATILE = (catalog().prom("shopfloor.agent.scrape.duration"),)


def mask(text: str) -> str:
    out = []
    for line in text.splitlines():
        if not line.startswith("#") and line.split("{", 1)[0].split(" ", 1)[0] in VOLATILE:
            line = re.sub(r" \S+$", " VOLATILE", line)
        out.append(line)
    return "\n".join(out) + "\n"


def scrape(state_dir, dcgm_url) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHOPFLOOR_AGENT_STATE_DIR": str(state_dir), "SHOPFLOOR_AGENT_DCGM_EXPORTER_URL": dcgm_url}
    return subprocess.run([PYTHON, "-m", "shopfloor.cli", "agent", "scrape", "--once", "--config", str(CONFIG)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def test_scrape_once_matches_golden_and_promtool_accepts_it(tmp_path):
    port = free_port()
    with running([PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                  "--directory", str(FIXTURES / "dcgm")], ready_url=f"http://127.0.0.1:{port}/"):
        dcgm_url = f"http://127.0.0.1:{port}/metrics.txt"
        first = scrape(tmp_path / "state", dcgm_url)
        assert first.returncode == 0, first.stderr
        # A restarted agent with the same state counts no kernel-log line twice: same output.
        again = scrape(tmp_path / "state", dcgm_url)
        assert again.returncode == 0, again.stderr
    text = first.stdout
    assert mask(again.stdout) == mask(text)

    # every enabled source found its fixture and collected without error
    ok = catalog().prom("shopfloor.agent.scrape.success")
    for source in ("dcgm", "neuron", "efa", "power", "xid"):
        assert re.search(rf'^{ok}{{.*source="{source}"}} 1\.0$', text, re.M), f"{source} failed:\n{first.stderr}"

    if os.environ.get("SHOPFLOOR_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(mask(text))
    expected = GOLDEN.read_text()
    assert mask(text) == expected, "scrape output differs from tests/golden/scrape-once.prom (see module doc)"

    promtool = require_binary("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    # promtool accepts it with no lint advice at all (exit 3 would be advice, 1 a format error).
    assert check.returncode == 0, (check.stdout + check.stderr).strip().splitlines()


def test_scrape_once_without_sources_prints_only_self_metrics(tmp_path):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("labels: {cluster: c, node: n}\nsources: {nvml: {enabled: false}, dcgm: {enabled: false}, "
                   "neuron: {enabled: false}, xid: {enabled: false}}\n"
                   f"sysfs_root: {tmp_path}\nipmitool_command: [{tmp_path}/no-such-ipmitool]\n")
    proc = subprocess.run([sys.executable, "-m", "shopfloor.cli", "agent", "scrape", "--once", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    supported = catalog().prom("shopfloor.agent.source.supported")
    samples = [ln for ln in proc.stdout.splitlines() if ln and not ln.startswith("#")]
    # no hardware is not an error: supported=0, and no success/duration series for them
    assert samples == [f'{supported}{{cluster="c",node="n",source="efa"}} 0.0',
                       f'{supported}{{cluster="c",node="n",source="power"}} 0.0']


@pytest.mark.gpu
def test_scrape_once_on_a_real_gpu(tmp_path):
    """On a machine with an NVIDIA GPU and driver (`pytest -m gpu`): the real pynvml end to end."""
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text("labels: {cluster: gpu-test, node: real}\ncollector_endpoint: ''\nlisten: ''\n"
                   f"state_dir: {tmp_path}/state\nspool_dir: {tmp_path}/spool\n"
                   "sources: {dcgm: {enabled: false}, neuron: {enabled: false}, efa: {enabled: false}, "
                   "power: {enabled: false}, xid: {enabled: false}}\n")
    proc = subprocess.run([PYTHON, "-m", "shopfloor.cli", "agent", "scrape", "--once", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    supported = catalog().prom("shopfloor.agent.source.supported")
    if f'{supported}{{cluster="gpu-test",node="real",source="nvml"}} 0.0' in proc.stdout:
        pytest.skip("missing hardware: no NVIDIA GPU/driver visible to NVML")
    ok = catalog().prom("shopfloor.agent.scrape.success")
    assert f'{ok}{{cluster="gpu-test",node="real",source="nvml"}} 1.0' in proc.stdout, proc.stderr
    assert re.search(rf'^{catalog().prom("hw.power")}{{chip="0",.*vendor="nvidia"}} [0-9.e+]+$', proc.stdout, re.M)
    promtool = require_binary("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=proc.stdout, capture_output=True, text=True, timeout=60)
    assert check.returncode in (0, 3), check.stdout + check.stderr
