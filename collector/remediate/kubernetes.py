"""Kubernetes backend: cordon a node plus a taint naming the chip and the cause.

Uses the official `kubernetes` client (CoreV1Api.read_node / patch_node). What Shopfloor sets,
per chip index N, and removes again on uncordon:

    spec.taints[]                       {key: shopfloor.io/chip-N, value: <cause>, effect: NoSchedule}
    metadata.labels                     shopfloor.io/chip-N: cordoned
    metadata.annotations                shopfloor.io/chip-N.reason: <full reason>
and, only when Shopfloor itself made the node unschedulable:
    spec.unschedulable                  true
    metadata.annotations                shopfloor.io/cordoned-by: shopfloor, shopfloor.io/reason: <reason>

A node somebody else cordoned (unschedulable without our annotation) is left exactly as it is:
no taint, no label, never uncordoned. Every patch is a strategic-merge patch (what `kubectl
cordon` sends) that carries the resourceVersion it was computed from, so a concurrent change
makes the API server answer 409 and we re-read instead of overwriting it. Node.spec.taints has no
merge key, so the patch carries the whole new taint list, other owners' taints included.

No API server can run in this project's test environment: tests/remediate/test_kubernetes.py
replays recorded API exchanges (real Node JSON) from a local HTTP server and asserts the exact
patches this module sends.
"""

from __future__ import annotations

import json
import re
from typing import Any

from collector.health.verdict import ChipRef
from collector.remediate.base import (REASON_PREFIX, BackendError, NodeStatus, Result, clean_reason,
                                      validate_chip, validate_node)

DOMAIN = "shopfloor.io"
CORDONED_BY = f"{DOMAIN}/cordoned-by"
NODE_REASON = f"{DOMAIN}/reason"
PATCH_TYPE = "application/strategic-merge-patch+json"


def taint_key(chip: str) -> str:
    return f"{DOMAIN}/chip-{validate_chip(chip)}"


def taint_value(reason: str) -> str:
    """The cause as a label value (<= 63 chars of [A-Za-z0-9._-], alphanumeric at both ends)."""
    text = reason[len(REASON_PREFIX):] if reason.startswith(REASON_PREFIX) else reason
    text = re.sub(r"^\s*chip [^:]*:\s*", "", text).split(";")[0]   # this chip's cause only
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:63].strip("-._")
    return slug or "unhealthy"


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, api_client=None, *, conflict_retries: int = 3, request_timeout: float = 15.0):
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api = client.CoreV1Api(api_client)
        self.conflict_retries = conflict_retries
        self.request_timeout = request_timeout

    # ------------------------------------------------------------------ API access
    def _read(self, node: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException
        try:
            resp = self.api.read_node(validate_node(node), _preload_content=False,
                                      _request_timeout=self.request_timeout)
        except ApiException as exc:
            raise BackendError(f"kubernetes GET node {node}: {exc.status} {exc.reason}") from exc
        except Exception as exc:  # noqa: BLE001 - connection errors of every kind
            raise BackendError(f"kubernetes GET node {node}: {exc}") from exc
        return json.loads(resp.data)

    def _patch(self, node: str, body: dict[str, Any]) -> bool:
        """Send one patch; False on 409 Conflict (somebody changed the node meanwhile)."""
        from kubernetes.client.exceptions import ApiException
        try:
            self.api.patch_node(node, body, _content_type=PATCH_TYPE, _preload_content=False,
                                _request_timeout=self.request_timeout)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise BackendError(f"kubernetes PATCH node {node}: {exc.status} {exc.reason}") from exc
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"kubernetes PATCH node {node}: {exc}") from exc
        return True

    @staticmethod
    def _status_of(obj: dict[str, Any]) -> NodeStatus:
        meta = obj.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        drained = bool((obj.get("spec") or {}).get("unschedulable"))
        by_us = drained and annotations.get(CORDONED_BY) == "shopfloor"
        reason = annotations.get(NODE_REASON, "") if by_us else ("cordoned by someone else" if drained else "")
        return NodeStatus(drained, reason, by_us)

    # ------------------------------------------------------------------ protocol
    def status(self, node: str) -> NodeStatus:
        return self._status_of(self._read(node))

    def cordon(self, chip: ChipRef, reason: str) -> Result:
        node, key, reason = validate_node(chip.node), taint_key(chip.chip), clean_reason(reason)
        for _ in range(self.conflict_retries):
            obj = self._read(node)
            st = self._status_of(obj)
            if st.drained and not st.by_us:
                return Result.HELD_BY_OTHER
            meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
            taints = [t for t in spec.get("taints") or [] if t.get("key") != key]
            taints.append({"key": key, "value": taint_value(reason), "effect": "NoSchedule"})
            annotations, labels = meta.get("annotations") or {}, meta.get("labels") or {}
            if (st.by_us and taints[-1] in (spec.get("taints") or []) and labels.get(key) == "cordoned"
                    and annotations.get(f"{key}.reason") == reason and annotations.get(NODE_REASON) == reason):
                return Result.ALREADY
            body = {"metadata": {"resourceVersion": meta.get("resourceVersion"),
                                 "labels": {key: "cordoned"},
                                 "annotations": {f"{key}.reason": reason, CORDONED_BY: "shopfloor",
                                                 NODE_REASON: reason}},
                    "spec": {"unschedulable": True, "taints": taints}}
            if self._patch(node, body):
                return Result.ALREADY if st.by_us else Result.DONE
        raise BackendError(f"kubernetes node {node}: changed by others {self.conflict_retries} times; gave up")

    def uncordon(self, chip: ChipRef, still_held_reason: str = "") -> Result:
        node, key = validate_node(chip.node), taint_key(chip.chip)
        for _ in range(self.conflict_retries):
            obj = self._read(node)
            st = self._status_of(obj)
            meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
            if st.drained and not st.by_us:
                return Result.HELD_BY_OTHER
            old_taints = spec.get("taints") or []
            taints = [t for t in old_taints if t.get("key") != key]
            ours_left = [t for t in taints if str(t.get("key", "")).startswith(f"{DOMAIN}/chip-")]
            if not st.drained and len(taints) == len(old_taints):
                return Result.NOT_HELD
            body: dict[str, Any] = {
                "metadata": {"resourceVersion": meta.get("resourceVersion"),
                             "labels": {key: None}, "annotations": {f"{key}.reason": None}},
                "spec": {"taints": taints}}
            keep = bool(still_held_reason) or bool(ours_left)
            if st.by_us and keep:
                body["metadata"]["annotations"][NODE_REASON] = clean_reason(
                    still_held_reason or (meta.get("annotations") or {}).get(NODE_REASON, REASON_PREFIX))
            elif st.by_us:
                body["spec"]["unschedulable"] = None
                body["metadata"]["annotations"].update({CORDONED_BY: None, NODE_REASON: None})
            if self._patch(node, body):
                return Result.ALREADY if keep else Result.DONE
        raise BackendError(f"kubernetes node {node}: changed by others {self.conflict_retries} times; gave up")
