"""`shopfloor dashboards push` against Grafana's recorded HTTP exchanges (grafana_replay.py)."""

from __future__ import annotations

import json
import os
import subprocess

from collector import dashboards_cli
from tests.dashboards.grafana_replay import GrafanaReplay
from tests.support import PYTHON, ROOT

TOKEN = "glsa_shopfloor_test_token_0123456789"
FILES = sorted((ROOT / "dashboards" / "json").glob("*.json"))


def run_cli(url: str, token: str | None, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    if token is not None:
        env["GRAFANA_TOKEN"] = token
    return subprocess.run([PYTHON, "-m", "shopfloor", "dashboards", "push", "--grafana-url", url, *extra],
                          capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)


def test_push_creates_the_folder_and_uploads_every_dashboard():
    with GrafanaReplay(TOKEN) as grafana:
        res = run_cli(grafana.url, TOKEN)
        assert res.returncode == 0, res.stderr
        assert grafana.violations == []
        calls = [(r["method"], r["path"]) for r in grafana.requests]
        assert calls[:3] == [("GET", "/api/frontend/settings"), ("GET", "/api/folders/shopfloor"), ("POST", "/api/folders")]
        assert calls[3:] == [("POST", "/api/dashboards/db")] * len(FILES)
        assert grafana.requests[2]["body"] == {"title": "Shopfloor", "uid": "shopfloor"}
        for req, path in zip(grafana.requests[3:], FILES):
            assert req["headers"]["Authorization"] == f"Bearer {TOKEN}"
            body = req["body"]
            assert body["overwrite"] is True and body["folderUid"] == "shopfloor"
            assert body["dashboard"]["id"] is None
            committed = json.loads(path.read_text())
            assert {k: v for k, v in body["dashboard"].items() if k != "id"} == committed  # the file, unchanged
        assert set(grafana.dashboards) == {json.loads(p.read_text())["uid"] for p in FILES}
        assert f"{grafana.url}/d/shopfloor-fleet/shopfloor-fleet-overview" in res.stdout

        again = run_cli(grafana.url, TOKEN)                # folder exists now; versions move to 2
        assert again.returncode == 0, again.stderr
        assert ("POST", "/api/folders") not in [(r["method"], r["path"]) for r in grafana.requests[3 + len(FILES):]]
        assert {d["version"] for d in grafana.dashboards.values()} == {2}
        assert " v2 " in again.stdout and grafana.violations == []


def test_wrong_token_fails_clearly_and_uploads_nothing():
    with GrafanaReplay(TOKEN) as grafana:
        res = run_cli(grafana.url, "not-the-token")
        assert res.returncode == 1
        assert "Grafana refused (HTTP 401): Invalid API key - check GRAFANA_TOKEN" in res.stderr
        assert grafana.dashboards == {} and grafana.folders == {}


def test_missing_token_is_reported_and_unreachable_grafana_fails():
    with GrafanaReplay(TOKEN) as grafana:
        res = run_cli(grafana.url, None)
        assert "GRAFANA_TOKEN is not set" in res.stderr and res.returncode == 1
    res = run_cli("http://127.0.0.1:9", TOKEN, "--timeout", "2")   # nothing listens on port 9
    assert res.returncode == 1 and "cannot reach Grafana" in res.stderr


def test_push_into_a_custom_folder_in_process(tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    (one / "x.json").write_text(FILES[0].read_text())
    with GrafanaReplay(TOKEN) as grafana:
        answers = dashboards_cli.push(grafana.url, TOKEN, dashboards_cli.load_dashboards(one),
                                      folder="AI factory", folder_uid="ai-factory", message="test")
        assert grafana.folders == {"ai-factory": "AI factory"}
        assert answers[0]["status"] == "success" and answers[0]["version"] == 1
        assert grafana.requests[-1]["body"]["message"] == "test"


def test_bad_dashboard_directory_is_refused(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    assert dashboards_cli.main(["list", "--dir", str(tmp_path)]) == 2
    assert dashboards_cli.main(["list", "--dir", str(tmp_path / "empty")]) == 2
