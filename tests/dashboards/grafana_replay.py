"""A Grafana stand-in on 127.0.0.1 that replays the recorded exchanges in grafana_exchanges.json.

Grafana cannot run on these machines (`apt-cache policy grafana` finds no candidate and PyPI has
no server), so the push command is tested against Grafana's request/response shapes instead:
each request must match its recorded request (method, path, headers, body keys), and the answer
is the recorded response with the per-call fields filled in. Folders and dashboard versions are
remembered so a second push sees the folder and gets version 2, as a real Grafana answers.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

EXCHANGES = json.loads((Path(__file__).parent / "grafana_exchanges.json").read_text())["exchanges"]


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _fill(value, fields: dict):
    if isinstance(value, dict):
        return {k: _fill(v, fields) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, fields) for v in value]
    if isinstance(value, str):
        m = re.fullmatch(r"\{(\w+)\}", value)
        if m:                       # a whole-value placeholder keeps the field's type (ints)
            return fields[m.group(1)]
        return re.sub(r"\{(\w+)\}", lambda m: str(fields[m.group(1)]), value)
    return value


class GrafanaReplay:
    def __init__(self, token: str):
        self.token = token
        self.requests: list[dict] = []          # every request, decoded
        self.violations: list[str] = []         # requests that did not match their recording
        self.folders: dict[str, str] = {}
        self.dashboards: dict[str, dict] = {}   # uid -> {"id", "version", "body"}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, name: str, fields: dict | None = None):
                resp = EXCHANGES[name]["response"]
                body = json.dumps(_fill(resp["body"], fields or {})).encode()
                self.send_response(resp["status"])
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                req = {"method": method, "path": self.path, "headers": dict(self.headers), "body": body}
                outer.requests.append(req)
                if self.headers.get("Authorization") != f"Bearer {outer.token}":
                    return self._answer("unauthorized")
                name = outer.route(method, self.path)
                if name is None:
                    outer.violations.append(f"unrecorded request {method} {self.path}")
                    self.send_response(404)
                    self.end_headers()
                    return
                outer.check(name, req)
                return self._answer(*outer.apply(name, req))

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def route(self, method: str, path: str) -> str | None:
        if method == "GET" and path == "/api/frontend/settings":
            return "frontend_settings"
        if method == "GET" and path.startswith("/api/folders/"):
            return "folder_get" if path.rsplit("/", 1)[1] in self.folders else "folder_get_missing"
        if method == "POST" and path == "/api/folders":
            return "folder_create"
        if method == "POST" and path == "/api/dashboards/db":
            return "dashboard_save"
        return None

    def check(self, name: str, req: dict) -> None:
        rec = EXCHANGES[name]["request"]
        for h in rec.get("headers", []):
            if h not in req["headers"]:
                self.violations.append(f"{name}: header {h} missing")
        if "Content-Type" in rec.get("headers", []) and not req["headers"].get("Content-Type", "").startswith("application/json"):
            self.violations.append(f"{name}: Content-Type is not JSON")
        for k in rec.get("body_keys", []):
            if not isinstance(req["body"], dict) or k not in req["body"]:
                self.violations.append(f"{name}: body key {k} missing")

    def apply(self, name: str, req: dict) -> tuple[str, dict]:
        body = req["body"] or {}
        if name in ("folder_get", "folder_get_missing"):
            uid = req["path"].rsplit("/", 1)[1]
            title = self.folders.get(uid, "")
            return name, {"folder_uid": uid, "folder_title": title, "folder_slug": _slug(title)}
        if name == "folder_create":
            self.folders[body["uid"]] = body["title"]
            return name, {"folder_uid": body["uid"], "folder_title": body["title"], "folder_slug": _slug(body["title"])}
        if name == "dashboard_save":
            dash = body["dashboard"]
            uid = dash["uid"]
            if body.get("folderUid") not in self.folders:
                self.violations.append(f"dashboard {uid} saved into unknown folder {body.get('folderUid')}")
            known = self.dashboards.get(uid)
            if known and not body.get("overwrite"):
                return "dashboard_save_conflict", {}
            entry = {"id": known["id"] if known else len(self.dashboards) + 1,
                     "version": known["version"] + 1 if known else 1, "body": body}
            self.dashboards[uid] = entry
            return name, {"id": entry["id"], "uid": uid, "slug": _slug(dash["title"]),
                          "version": entry["version"], "folder_uid": body.get("folderUid")}
        return name, {}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
