"""kmock's Kubernetes API emulator with the gaps that matter to Kopf and to our operator
closed (see shared/notes/test-tooling.md):

* objects get ``uid``, ``creationTimestamp``, ``generation`` and a ``resourceVersion``
  that changes on every write, and JSON-patch ``test`` ops are checked (422 on a
  mismatch, as the API server answers) -- Kopf's optimistic-concurrency patches need it;
* ``metadata.generation`` moves when the spec changes, as on a real server;
* ``deployments/scale`` answers with an ``autoscaling/v1`` Scale, and a stand-in for the
  Deployment controller marks the asked-for replicas ready (can be switched off);
* list responses carry ``kind`` and ``apiVersion``.

Everything else is kmock's: a real HTTP server on loopback, watch streams, finalizers.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import uuid
from typing import Any

import attrs
import jsonpointer
from kmock import KubernetesEmulator, KubernetesError, ResourceInfo, action

_VERSIONS = itertools.count(1000)


def _next_version() -> str:
    return str(next(_VERSIONS))


def _resolve(doc: Any, path: str) -> Any:
    try:
        return jsonpointer.resolve_pointer(doc, path)
    except jsonpointer.JsonPointerException:
        return KeyError


@attrs.define(kw_only=True)
class LayerkvEmulator(KubernetesEmulator):
    # When True, a scale change is immediately reflected as ready replicas.
    deployments_become_ready: bool = True

    def declare(
        self,
        resource: str,
        kind: str,
        *,
        namespaced: bool = True,
        subresources: tuple[str, ...] = (),
    ) -> None:
        self.resources[resource] = ResourceInfo(
            kind=kind,
            namespaced=namespaced,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            subresources=set(subresources),
        )

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None:
            if request.action == action.CREATE and isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault(
                    "creationTimestamp",
                    datetime.datetime.now(tz=datetime.UTC).isoformat(timespec="seconds"),
                )
                meta["generation"] = 1
                meta["resourceVersion"] = _next_version()
                if request.namespace and "namespace" not in meta:
                    meta["namespace"] = request.namespace
            elif request.action == action.UPDATE and request.name is not None:
                self._stamp_patch(request)
        return await super()._handle(request)

    def _stamp_patch(self, request: Any) -> None:
        key = (request.resource, request.namespace, request.name)
        current = (
            self.objects[key].raw if key in self.objects and not self.objects[key].deleted else None
        )
        if current is None:
            return  # the base class answers 404
        generation = current.get("metadata", {}).get("generation", 1)
        version = _next_version()
        if isinstance(request.data, list):  # JSON patch
            for op in request.data:
                if op.get("op") == "test" and _resolve(current, op["path"]) != op.get("value"):
                    raise KubernetesError(
                        status=422, reason="Invalid", message=f"test failed at {op['path']}"
                    )
            request.data.append(
                {"op": "replace", "path": "/metadata/resourceVersion", "value": version}
            )
        elif isinstance(request.data, dict):  # merge patch
            patch = request.data
            if request.subresource == "scale":
                replicas = patch.get("spec", {}).get("replicas")
                if replicas is not None and self.deployments_become_ready:
                    patch["status"] = {"replicas": replicas, "readyReplicas": replicas}
            meta = patch.setdefault("metadata", {})
            meta["resourceVersion"] = version
            if request.subresource is None and "spec" in patch:
                new_spec = copy.deepcopy(current.get("spec", {}))
                merged = {**new_spec, **patch["spec"]}
                if merged != current.get("spec", {}):
                    meta["generation"] = generation + 1

    async def _serve_fetch(self, request: Any) -> Any:
        raw = await super()._serve_fetch(request)
        return _as_scale(raw) if request.subresource == "scale" else raw

    async def _serve_update(self, request: Any) -> Any:
        raw = await super()._serve_update(request)
        return _as_scale(raw) if request.subresource == "scale" else raw

    async def _serve_list(self, request: Any) -> Any:
        result = await super()._serve_list(request)
        resource = request.resource
        # Not .get(): kmock auto-creates entries on item access.
        info = self.resources[resource] if resource in self.resources else None  # noqa: SIM401
        kind = info.kind if info is not None and info.kind else "Unknown"
        group_version = f"{resource.group}/{resource.version}" if resource.group else "v1"
        return {"apiVersion": group_version, "kind": f"{kind}List", **result}


def _as_scale(deployment: dict[str, Any]) -> dict[str, Any]:
    meta = deployment.get("metadata", {})
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            k: meta[k] for k in ("name", "namespace", "resourceVersion", "uid") if k in meta
        },
        "spec": {"replicas": deployment.get("spec", {}).get("replicas", 1)},
        "status": {"replicas": deployment.get("status", {}).get("replicas", 0)},
    }
