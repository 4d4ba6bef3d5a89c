"""`shopfloor dashboards`: upload the Grafana dashboards to a running Grafana.

    GRAFANA_TOKEN=glsa_... shopfloor dashboards push --grafana-url https://grafana.example:3000
    shopfloor dashboards push --grafana-url URL --folder "Shopfloor" --folder-uid shopfloor
    shopfloor dashboards list                         the dashboards that would be pushed

The upload uses grafana-client (Grafana's HTTP API through a maintained client, instead of
hand-written requests): GET /api/frontend/settings (version), the folder (GET /api/folders/<uid>, created with POST
/api/folders when missing), then POST /api/dashboards/db per dashboard with overwrite=true into
that folder. The token comes from the environment (GRAFANA_TOKEN: a service-account token),
never from the command line where `ps` would show it. Sites that provision Grafana from files
use dashboards/provisioning/ instead and need no push.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "dashboards" / "json"


def load_dashboards(directory: Path) -> list[dict]:
    files = sorted(directory.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no dashboards (*.json) in {directory}")
    out = []
    for f in files:
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{f}: not JSON: {exc}") from None
        if not isinstance(doc, dict) or not doc.get("uid") or not doc.get("title"):
            raise ValueError(f"{f}: a dashboard needs a uid and a title")
        out.append(doc)
    return out


def push(grafana_url: str, token: str | None, dashboards: list[dict], *, folder: str, folder_uid: str,
         message: str, timeout: float = 10.0, out=sys.stdout) -> list[dict]:
    """Upload dashboards into folder (created when missing); returns Grafana's answers."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError

    api = GrafanaApi.from_url(grafana_url, credential=token or None, timeout=timeout)
    build = api.health.check() or {}          # GET /api/frontend/settings -> buildInfo
    print(f"Grafana {build.get('version', '?')} ({build.get('edition', '?')}) at {grafana_url}", file=out)
    try:
        api.folder.get_folder(folder_uid)
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        api.folder.create_folder(folder, uid=folder_uid)
        print(f"created folder {folder!r} (uid {folder_uid})", file=out)
    answers = []
    for dash in dashboards:
        body = {"dashboard": {**dash, "id": None}, "folderUid": folder_uid, "overwrite": True, "message": message}
        answer = api.dashboard.update_dashboard(body)
        answers.append(answer)
        print(f"{answer.get('status', '?'):8} {dash['title']:40} v{answer.get('version', '?')} "
              f"{grafana_url.rstrip('/')}{answer.get('url', '')}", file=out)
    return answers


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="shopfloor dashboards", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("push", help="upload every dashboard (token from GRAFANA_TOKEN)")
    p.add_argument("--grafana-url", required=True, help="e.g. http://grafana:3000")
    p.add_argument("--folder", default="Shopfloor")
    p.add_argument("--folder-uid", default="shopfloor")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="directory of dashboard JSON files")
    p.add_argument("--message", default="shopfloor dashboards push")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    ls = sub.add_parser("list", help="list the dashboards that push would upload")
    ls.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args(argv)

    try:
        dashboards = load_dashboards(args.dir)
    except (OSError, ValueError) as exc:
        print(f"shopfloor dashboards: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "list":
        for d in dashboards:
            print(f"{d['uid']:22} {d['title']}")
        return 0

    token = os.environ.get("GRAFANA_TOKEN")
    if not token:
        print("shopfloor dashboards: GRAFANA_TOKEN is not set; trying without authentication", file=sys.stderr)
    from grafana_client.client import GrafanaException
    try:
        push(args.grafana_url, token, dashboards, folder=args.folder, folder_uid=args.folder_uid,
             message=args.message, timeout=args.timeout)
    except GrafanaException as exc:
        detail = exc.response.get("message") if isinstance(exc.response, dict) else exc.response
        print(f"shopfloor dashboards: Grafana refused (HTTP {exc.status_code}): {detail or exc.message}"
              + (" - check GRAFANA_TOKEN" if exc.status_code in (401, 403) else ""), file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - connection errors come from niquests/urllib3
        print(f"shopfloor dashboards: cannot reach Grafana at {args.grafana_url}: {exc}", file=sys.stderr)
        return 1
    return 0
