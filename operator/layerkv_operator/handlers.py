"""Kopf handlers for ServingSLO. Thin: parse, call the adapters and the pure policy, patch.

* create / update / resume: publish the SLO targets to Redis (admission reads them).
* timer: read the window and worker load from Redis, decide the replica count
  (:func:`layerkv.policy.scaling.decide`), scale the worker Deployment, write status.
* delete: remove the class's keys from Redis (a finalizer holds the object until then).

Handlers are plain functions: Kopf runs them in its thread pool, where the blocking
Redis and Kubernetes client calls are fine.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import kopf
import redis

from layerkv.common.load import summarize_pool
from layerkv.common.store import MetricsStore
from layerkv.policy.scaling import Action, Observation, decide
from layerkv_operator import metrics
from layerkv_operator.config import OperatorConfig
from layerkv_operator.kube import DeploymentScaler, api_client
from layerkv_operator.spec import GROUP, PLURAL, VERSION, InvalidSpec, parse_spec
from layerkv_operator.status import evaluated_status, not_ready_status, state_from_status

# Read at import for the timer interval only (Kopf fixes it at registration); the rest
# is read again at startup, so the environment at `kopf run` time is what counts.
CONFIG = OperatorConfig.from_env()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Service account in a pod, else ``$KUBECONFIG``: explicit, no client-library magic."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Kopf's own bookkeeping in annotations under our group; nothing in status, whose
    # schema is ours. The finalizer name says what it waits for.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/redis-cleanup"
    settings.posting.reporting_component = "layerkv-operator"
    # Re-list now and then even if a watch silently stalls behind a proxy.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 10
    # Handlers block on Redis/Kubernetes calls; a few threads serve many ServingSLOs.
    settings.execution.max_workers = 4
    config = OperatorConfig.from_env()
    memo.config = config
    memo.store = MetricsStore.from_url(config.redis_url, prefix=config.redis_prefix)
    memo.scaler = DeploymentScaler(api_client())


@kopf.on.probe(id="redis")
def redis_reachable(memo: kopf.Memo, **_: Any) -> bool:
    # Reported, never raised: restarting the operator does not bring Redis back.
    try:
        return memo.store.ping()
    except redis.RedisError:
        return False


def _slo_class(spec: Mapping[str, Any], name: str) -> str:
    return str(spec.get("sloClass") or name)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def publish_targets(
    spec: kopf.Spec,
    name: str,
    meta: kopf.Meta,
    status: kopf.Status,
    old: Any,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    try:
        slo = parse_spec(spec, name)
    except InvalidSpec as e:
        # Nothing to retry until the spec changes; the update handler runs then.
        logger.error(f"invalid spec: {e}")
        patch.status.update(
            not_ready_status(
                old_status=status,
                generation=meta.get("generation"),
                reason="InvalidSpec",
                message=str(e),
                now=time.time(),
            )
        )
        return
    old_spec = old.get("spec") if isinstance(old, Mapping) else None
    old_class = _slo_class(old_spec, name) if isinstance(old_spec, Mapping) else None
    try:
        memo.store.put_target(slo.target)
        if old_class is not None and old_class != slo.slo_class:
            memo.store.delete_class(old_class)
    except redis.RedisError as e:
        raise kopf.TemporaryError(f"cannot write SLO targets to Redis: {e}", delay=5) from e
    logger.info(f"SLO targets of class {slo.slo_class!r} published")


@kopf.timer(GROUP, VERSION, PLURAL, interval=CONFIG.interval_s)
def evaluate(
    spec: kopf.Spec,
    status: kopf.Status,
    name: str,
    namespace: str,
    meta: kopf.Meta,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    now = time.time()
    generation = meta.get("generation")
    try:
        slo = parse_spec(spec, name)
    except InvalidSpec as e:
        patch.status.update(
            not_ready_status(
                old_status=status,
                generation=generation,
                reason="InvalidSpec",
                message=str(e),
                now=now,
            )
        )
        return
    store: MetricsStore = memo.store
    scaler: DeploymentScaler = memo.scaler

    deployment = scaler.read(namespace, slo.worker_deployment)
    if deployment is None:
        patch.status.update(
            not_ready_status(
                old_status=status,
                generation=generation,
                reason="DeploymentNotFound",
                message=f"no Deployment {slo.worker_deployment!r} in {namespace!r}",
                now=now,
            )
        )
        return

    try:
        # Re-published every tick: a Redis restarted without persistence heals itself.
        store.put_target(slo.target)
        window = store.window_stats(slo.slo_class, slo.window_s, now=now)
        reports = store.worker_loads(slo.worker_deployment)
    except redis.RedisError as e:
        logger.warning(f"metrics store unavailable: {e}")
        window, reports = None, []
    load = summarize_pool(reports, now=now, stale_after_s=memo.config.load_stale_after_s)

    decision = decide(
        slo.policy,
        state_from_status(status),
        Observation(
            now=now,
            replicas=deployment.replicas,
            ready_replicas=deployment.ready_replicas,
            window=window,
            load=load,
        ),
    )
    metrics.observe(f"{namespace}/{name}", decision)
    scaled = False
    if decision.action is not Action.HOLD:
        scaler.scale(namespace, slo.worker_deployment, decision.replicas)
        scaled = True
        # INFO from a handler is also posted as a Kubernetes Event on the ServingSLO.
        logger.info(f"{decision.message} (rule {decision.rule})")
    patch.status.update(
        evaluated_status(
            old_status=status,
            generation=generation,
            slo_class=slo.slo_class,
            decision=decision,
            replicas=decision.replicas if scaled else deployment.replicas,
            ready_replicas=deployment.ready_replicas,
            requests=window.requests if window is not None else 0,
            now=now,
            scaled=scaled,
        )
    )


@kopf.on.delete(GROUP, VERSION, PLURAL, retries=10, backoff=3)
def forget_class(
    spec: kopf.Spec, name: str, namespace: str, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    metrics.forget(f"{namespace}/{name}")
    # Not parse_spec: an object with an invalid spec must still be deletable.
    slo_class = _slo_class(spec, name)
    try:
        deleted = memo.store.delete_class(slo_class)
    except redis.RedisError as e:
        raise kopf.TemporaryError(f"cannot clean Redis keys: {e}", delay=3) from e
    logger.info(f"removed {deleted} Redis keys of SLO class {slo_class!r}")
