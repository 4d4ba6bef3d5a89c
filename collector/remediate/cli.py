"""`shopfloor cordon`: what remediation holds, what it decided, and operator overrides.

    shopfloor cordon list    [--url URL | --db PATH] [--json]
    shopfloor cordon audit   [--url URL | --db PATH] [--limit N] [--cluster C] [--node N] [--json]
    shopfloor cordon healthy CLUSTER/NODE/CHIP --by NAME [--url URL | --db PATH --config FILE]
    shopfloor cordon confirm CLUSTER/NODE/CHIP --by NAME --mode MODE [--note TEXT] [--url URL | --db PATH]

--url talks to a running collector (default $SHOPFLOOR_COLLECTOR_URL or http://127.0.0.1:9600;
the bearer token comes from $SHOPFLOOR_COLLECTOR_TOKEN, never from the command line). --db reads
the collector's DuckDB file directly, for when the collector is stopped (DuckDB lets one process
open a file for writing); `healthy --db` then needs --config to know the scheduler backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

DEFAULT_URL = "http://127.0.0.1:9600"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shopfloor cordon", description="remediation state and operator overrides")
    sub = p.add_subparsers(dest="cmd", required=True)

    def where(sp):
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--url", help="a running collector (default $SHOPFLOOR_COLLECTOR_URL or %s)" % DEFAULT_URL)
        g.add_argument("--db", help="the collector's DuckDB file (collector stopped)")
        sp.add_argument("--json", action="store_true", help="print JSON")

    where(sub.add_parser("list", help="chips Shopfloor holds out of service"))
    a = sub.add_parser("audit", help="remediation decisions, newest first")
    where(a)
    a.add_argument("--limit", type=int, default=50)
    a.add_argument("--cluster")
    a.add_argument("--node")
    h = sub.add_parser("healthy", help="mark a chip healthy: resume it if Shopfloor drained it")
    where(h)
    h.add_argument("chip", metavar="CLUSTER/NODE/CHIP")
    h.add_argument("--by", required=True, help="who says so (recorded in the audit)")
    h.add_argument("--config", help="collector config (for --db: the remediation backend)")
    c = sub.add_parser("confirm", help="confirm a real failure (a label for `health train`)")
    where(c)
    c.add_argument("chip", metavar="CLUSTER/NODE/CHIP")
    c.add_argument("--by", required=True)
    c.add_argument("--mode", default="other")
    c.add_argument("--note", default="")
    c.add_argument("--at", help="when it failed: epoch seconds or ISO 8601 UTC (default now)")
    return p


class CliError(Exception):
    pass


def _http(method: str, url: str, path: str, body: dict | None = None, params: dict | None = None) -> Any:
    import httpx
    headers = {}
    token = os.environ.get("SHOPFLOOR_COLLECTOR_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        resp = httpx.request(method, url.rstrip("/") + path, json=body, params=params, headers=headers,
                             timeout=30.0)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the collector at {url}: {exc}") from None
    try:
        doc = resp.json()
    except ValueError:
        raise CliError(f"{url}{path}: HTTP {resp.status_code}: {resp.text[:200]}") from None
    if resp.status_code != 200 or doc.get("status") != "success":
        raise CliError(f"{url}{path}: HTTP {resp.status_code}: {doc.get('error', doc)}")
    return doc["data"]


def _store(path: str, read_only: bool):
    from collector.store.core import Store
    if not os.path.exists(path):
        raise CliError(f"no database at {path}")
    try:
        return Store(path, read_only=read_only)
    except Exception as exc:  # noqa: BLE001 - duckdb's lock/IO errors, said plainly
        raise CliError(f"cannot open {path}: {exc} (is the collector running? use --url)") from None


def _split(target: str) -> tuple[str, str, str]:
    parts = target.split("/")
    if len(parts) != 3 or not all(parts):
        raise CliError(f"{target!r}: expected CLUSTER/NODE/CHIP, e.g. c1/gpu-001/3")
    return parts[0], parts[1], parts[2]


def _table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "") if r.get(c) is not None else "-") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    url = args.url or os.environ.get("SHOPFLOOR_COLLECTOR_URL", DEFAULT_URL)
    try:
        out = _run(args, url)
    except CliError as exc:
        print(f"shopfloor cordon: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"shopfloor cordon: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - e.g. a DuckDB file without remediation tables
        import duckdb
        if not isinstance(exc, duckdb.Error):
            raise
        print(f"shopfloor cordon: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    elif args.cmd == "list":
        print(_table(out, ["cluster", "node", "chip", "uuid", "state", "dry_run", "backend", "since", "reason"]))
    elif args.cmd == "audit":
        for r in out:
            r["reasons"] = "; ".join(r["reasons"])
        print(_table(out, ["ts", "cluster", "node", "chip", "action", "outcome", "dry_run", "actor", "reasons"]))
    else:
        print(f"{out['action']} {out['cluster']}/{out['node']}/{out['chip']}: {out['outcome']} - "
              f"{'; '.join(out['reasons'])}")
    return 0


def _run(args, url: str):
    from collector.remediate.api import confirm_failure, cordon_json, decision_json
    from collector.remediate.audit import Audit

    if args.cmd == "list":
        if args.db:
            return [cordon_json(c) for c in Audit(_store(args.db, True)).cordons()]
        return _http("GET", url, "/api/v1/cordons")
    if args.cmd == "audit":
        if args.db:
            rows = Audit(_store(args.db, True)).history(args.limit, cluster=args.cluster, node=args.node)
            return [decision_json(d) for d in rows]
        params = {k: v for k, v in (("limit", args.limit), ("cluster", args.cluster), ("node", args.node)) if v}
        return _http("GET", url, "/api/v1/remediation/audit", params=params)
    cluster, node, chip = _split(args.chip)
    if args.cmd == "healthy":
        if not args.db:
            return _http("POST", url, f"/api/v1/cordons/{cluster}/{node}/{chip}/healthy", {"by": args.by})
        from collector import config as cconfig
        from collector.remediate.service import build
        section = cconfig.load(args.config).remediation if args.config else {}
        rem = build(section, _store(args.db, False))
        return decision_json(rem.mark_healthy(cluster, node, chip, args.by, time.time()))
    from collector.remediate.api import FAILURE_MODES
    if args.mode not in FAILURE_MODES:
        raise CliError(f"--mode must be one of {', '.join(FAILURE_MODES)}")
    at = _when(args.at) if args.at else time.time()
    body = {"by": args.by, "mode": args.mode, "note": args.note, "at": at}
    if not args.db:
        return _http("POST", url, f"/api/v1/cordons/{cluster}/{node}/{chip}/confirm", body)
    return decision_json(confirm_failure(Audit(_store(args.db, False)), cluster, node, chip, args.by,
                                         args.mode, args.note, time.time(), at))


def _when(text: str) -> float:
    import datetime as dt
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"--at {text!r}: expected epoch seconds or ISO 8601, e.g. 2026-11-23T04:10:00Z") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()
