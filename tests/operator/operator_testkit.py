"""Helpers for the operator tests: polling with a deadline, Kubernetes objects over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kube_emulator import LayerkvEmulator

PEERING = "layerkv-operator-test"
PEERING_PRIORITY = 100
SLO_PATH = "/apis/layerkv.io/v1alpha1/namespaces/{ns}/servingslos"
DEPLOYMENT_PATH = "/apis/apps/v1/namespaces/{ns}/deployments"


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, timeout: float = 15.0, what: str = "condition"
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


async def create(k8s: LayerkvEmulator, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with k8s.post(path, json=body) as rsp:
        assert rsp.status < 300, await rsp.text()
        return await rsp.json()


async def get(k8s: LayerkvEmulator, path: str) -> dict[str, Any] | None:
    async with k8s.get(path) as rsp:
        if rsp.status == 404:
            return None
        assert rsp.status < 300, await rsp.text()
        return await rsp.json()


async def create_deployment(k8s: LayerkvEmulator, ns: str, name: str, replicas: int) -> None:
    labels = {"app": name}
    await create(
        k8s,
        DEPLOYMENT_PATH.format(ns=ns),
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "worker", "image": "layerkv-worker"}]},
                },
            },
            "status": {"replicas": replicas, "readyReplicas": replicas},
        },
    )


async def create_slo(k8s: LayerkvEmulator, ns: str, name: str, spec: dict[str, Any]) -> None:
    await create(
        k8s,
        SLO_PATH.format(ns=ns),
        {
            "apiVersion": "layerkv.io/v1alpha1",
            "kind": "ServingSLO",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        },
    )


async def slo(k8s: LayerkvEmulator, ns: str, name: str) -> dict[str, Any] | None:
    return await get(k8s, f"{SLO_PATH.format(ns=ns)}/{name}")


async def replicas(k8s: LayerkvEmulator, ns: str, name: str) -> int:
    body = await get(k8s, f"{DEPLOYMENT_PATH.format(ns=ns)}/{name}")
    assert body is not None, f"deployment {ns}/{name} is gone"
    return body["spec"]["replicas"]


def condition(body: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in (body or {}).get("status", {}).get("conditions", []):
        if cond.get("type") == type_:
            return cond
    return None


def replica_history(k8s: LayerkvEmulator, ns: str, name: str) -> list[int]:
    """Every spec.replicas the Deployment had, in order, without repeats."""
    seen: list[int] = []
    for version in k8s.objects["apps/v1/deployments", ns, name].history:
        if version is None:
            continue
        value = version.raw.get("spec", {}).get("replicas")
        if not seen or seen[-1] != value:
            seen.append(value)
    return seen
