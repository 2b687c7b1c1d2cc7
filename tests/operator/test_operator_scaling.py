"""The operator end to end: Kopf (KopfRunner) against the API emulator over HTTP, real
Redis, outcomes fed through the real store module as the admission service writes them.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest
from kube_emulator import LayerkvEmulator
from operator_testkit import (
    PEERING,
    PEERING_PRIORITY,
    SLO_PATH,
    condition,
    create_deployment,
    create_slo,
    eventually,
    get,
    replica_history,
    replicas,
    slo,
)
from prometheus_client import REGISTRY

from layerkv.common.load import WorkerLoadReport
from layerkv.common.slo import RequestOutcome, SloTarget
from layerkv.common.store import MetricsStore
from layerkv_operator import handlers

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.usefixtures("operator")]


def feed(
    store: MetricsStore,
    slo_class: str,
    count: int,
    *,
    ttft_s: float,
    tpot_s: float = 0.005,
    finished_at: float | None = None,
    status: str = "ok",
) -> None:
    """Record outcomes as admission does: judged against the target the operator
    published."""
    target = store.get_target(slo_class)
    assert target is not None, f"no target for {slo_class!r} in Redis"
    now = time.time() if finished_at is None else finished_at
    for i in range(count):
        store.record_outcome(
            RequestOutcome(
                request_id=f"{slo_class}-{now:.3f}-{i}",
                slo_class=slo_class,
                status=status,
                finished_at=now,
                ttft_s=ttft_s,
                tpot_s=tpot_s,
                output_tokens=16,
            ),
            target,
        )


def base_spec(deployment: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "workerDeployment": deployment,
        "ttftMs": 100,
        "tpotMs": 50,
        "windowSeconds": 30,
        "minReplicas": 1,
        "maxReplicas": 5,
        "minRequests": 5,
    }
    spec.update(overrides)
    return spec


async def decided(k8s: LayerkvEmulator, ns: str, name: str, reason: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        body = await slo(k8s, ns, name)
        got = (body or {}).get("status", {}).get("lastDecision", {}).get("reason")
        return body if got == reason else None

    return await eventually(probe, what=f"{ns}/{name} decision {reason}")


async def test_timer_interval_comes_from_the_environment() -> None:
    # Guards the fixture order: the interval is fixed when handlers is first imported.
    assert handlers.CONFIG.interval_s == 0.25


async def test_publishes_targets_and_scales_up_on_violations_within_max(
    emulator: LayerkvEmulator, store: MetricsStore
) -> None:
    ns = "scale-up"
    await create_deployment(emulator, ns, "chat-worker", replicas=1)
    await create_slo(
        emulator,
        ns,
        "up",
        base_spec("chat-worker", maxReplicas=3, scaleUp={"cooldownSeconds": 0, "maxStep": 4}),
    )

    async def published() -> SloTarget | None:
        return store.get_target("up")

    target = await eventually(published, what="targets in Redis")
    assert target == SloTarget(
        name="up", ttft_s=0.1, tpot_s=0.05, percentile=95, max_violation_rate=0.05, window_s=30
    )

    feed(store, "up", 20, ttft_s=0.5)  # 5x the TTFT target: a big step, capped by max
    body = await decided(emulator, ns, "up", "AtMaxReplicas")
    assert await replicas(emulator, ns, "chat-worker") == 3
    # One step 1 -> 3 (sized by TTFT 5x over target), never past maxReplicas.
    assert replica_history(emulator, ns, "chat-worker") == [1, 3]
    status = body["status"]
    assert status["violationRate"] == 1.0
    assert status["requests"] == 20
    assert 300 < status["ttftPercentileMs"] <= 500
    assert condition(body, "AtMaxReplicas")["status"] == "True"
    assert condition(body, "MetricsAvailable")["status"] == "True"
    assert condition(body, "Ready")["status"] == "True"
    assert status["lastScaleUpTime"]
    assert status["lastDecision"]["rule"] == "rule_over_budget"
    # The same decision on the operator's Prometheus metrics.
    labels = {"servingslo": f"{ns}/up"}
    assert REGISTRY.get_sample_value("layerkv_operator_desired_replicas", labels) == 3
    assert REGISTRY.get_sample_value("layerkv_operator_violation_rate", labels) == 1.0
    scale_ups = [
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "layerkv_operator_decisions"
        for sample in metric.samples
        if sample.name.endswith("_total")
        and sample.labels["servingslo"] == f"{ns}/up"
        and sample.labels["action"] == "ScaleUp"
    ]
    assert sum(scale_ups) == 1  # one step, 1 -> 3


async def test_holds_on_missing_then_stale_metrics(
    emulator: LayerkvEmulator, store: MetricsStore
) -> None:
    ns = "hold"
    await create_deployment(emulator, ns, "w", replicas=2)
    await create_slo(emulator, ns, "hold", base_spec("w", staleAfterSeconds=5, windowSeconds=60))

    body = await decided(emulator, ns, "hold", "NoMetrics")
    metrics = condition(body, "MetricsAvailable")
    assert metrics["status"] == "False" and metrics["reason"] == "NoMetrics"
    assert condition(body, "Scaling")["status"] == "False"

    # Violations, but 20 s old with staleAfterSeconds 5: not evidence to act on.
    feed(store, "hold", 30, ttft_s=1.0, finished_at=time.time() - 20)
    body = await decided(emulator, ns, "hold", "StaleMetrics")
    assert condition(body, "MetricsAvailable")["reason"] == "StaleMetrics"
    assert await replicas(emulator, ns, "w") == 2
    assert replica_history(emulator, ns, "w") == [2]


async def test_scales_down_one_step_after_cooldown_and_stops_at_min(
    emulator: LayerkvEmulator, store: MetricsStore
) -> None:
    ns = "down"
    await create_deployment(emulator, ns, "w", replicas=4)
    await create_slo(
        emulator,
        ns,
        "down",
        base_spec("w", ttftMs=1000, minReplicas=2, scaleDown={"cooldownSeconds": 1}),
    )

    async def published() -> SloTarget | None:
        return store.get_target("down")

    await eventually(published, what="targets in Redis")
    started = time.time()
    feed(store, "down", 30, ttft_s=0.01)
    body = await decided(emulator, ns, "down", "AtMinReplicas")
    assert await replicas(emulator, ns, "w") == 2
    # One worker at a time, each after its own cooldown, never below minReplicas.
    assert replica_history(emulator, ns, "w") == [4, 3, 2]
    assert time.time() - started >= 2.0  # two cooldowns of 1 s
    assert body["status"]["lastScaleDownTime"]
    assert condition(body, "AtMaxReplicas")["status"] == "False"


async def test_offload_absorbing_pressure_is_no_reason_to_scale_up(
    emulator: LayerkvEmulator, store: MetricsStore
) -> None:
    ns = "cause"
    await create_deployment(emulator, ns, "w", replicas=2)
    await create_slo(emulator, ns, "cause", base_spec("w", maxViolationRate=0.2))

    async def published() -> SloTarget | None:
        return store.get_target("cause")

    await eventually(published, what="targets in Redis")
    feed(store, "cause", 17, ttft_s=0.05)
    feed(store, "cause", 3, ttft_s=0.3)  # 15 % violations: within the 20 % budget
    for i in range(2):  # device KV full on both workers, LayerKV holding layers on host
        store.put_worker_load(
            "w",
            WorkerLoadReport(
                worker=f"10.0.0.{i}:50061",
                reported_at=time.time(),
                running=8,
                waiting=2,
                in_flight=10,
                kv_blocks_total=1000,
                kv_blocks_free=0,
                offloaded_requests=4,
                host_kv_blocks_used=300,
                host_kv_blocks_total=4000,
            ),
            ttl_s=60,
        )
    body = await decided(emulator, ns, "cause", "OffloadAbsorbing")
    assert "offload is absorbing" in body["status"]["lastDecision"]["message"]
    assert body["status"]["lastDecision"]["rule"] == "rule_offload_absorbing"
    assert replica_history(emulator, ns, "w") == [2]


async def test_invalid_spec_and_missing_deployment_make_it_not_ready(
    emulator: LayerkvEmulator, store: MetricsStore
) -> None:
    ns = "broken"
    # The emulator does not run the CRD's validation; the operator re-checks.
    await create_slo(emulator, ns, "bad", base_spec("w", minReplicas=4, maxReplicas=2))
    await create_slo(emulator, ns, "orphan", base_spec("absent"))

    async def not_ready(name: str, reason: str) -> Any:
        async def probe() -> dict[str, Any] | None:
            cond = condition(await slo(emulator, ns, name), "Ready")
            return cond if cond and cond["reason"] == reason else None

        return await eventually(probe, what=f"{name} Ready=False/{reason}")

    assert (await not_ready("bad", "InvalidSpec"))["status"] == "False"
    assert (await not_ready("orphan", "DeploymentNotFound"))["status"] == "False"
    assert store.get_target("bad") is None


async def test_deletion_removes_the_class_from_redis(
    emulator: LayerkvEmulator, store: MetricsStore
) -> None:
    ns = "gone"
    await create_deployment(emulator, ns, "w", replicas=1)
    await create_slo(emulator, ns, "gone", base_spec("w"))

    async def published() -> SloTarget | None:
        return store.get_target("gone")

    await eventually(published, what="targets in Redis")
    feed(store, "gone", 10, ttft_s=0.01)
    assert store.window_stats("gone", 30).requests == 10

    async with emulator.delete(f"{SLO_PATH.format(ns=ns)}/gone") as rsp:
        assert rsp.status < 300, await rsp.text()

    async def cleaned() -> bool:
        return (
            store.get_target("gone") is None
            and store.window_stats("gone", 30).requests == 0
            and await slo(emulator, ns, "gone") is None  # finalizer released
        )

    await eventually(cleaned, what="Redis keys removed and the object released")


async def test_liveness_endpoint_answers_with_the_redis_probe(
    operator: dict[str, Any],
) -> None:
    async def live() -> dict[str, Any] | None:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(operator["liveness"]) as rsp,
            ):
                return await rsp.json() if rsp.status == 200 else None
        except aiohttp.ClientError:
            return None

    assert (await eventually(live, what="liveness endpoint"))["redis"] is True


async def test_operator_takes_part_in_peering(emulator: LayerkvEmulator) -> None:
    # Kopf's peering is the leader election: each replica announces itself in the
    # ClusterKopfPeering and the lower priorities pause. This one must be listed.
    async def peers() -> dict[str, Any] | None:
        body = await get(emulator, f"/apis/kopf.dev/v1/clusterkopfpeerings/{PEERING}")
        return (body or {}).get("status") or None

    status = await eventually(peers, what="the operator in the peering object")
    assert len(status) == 1
    (peer,) = status.values()
    assert peer["priority"] == PEERING_PRIORITY
