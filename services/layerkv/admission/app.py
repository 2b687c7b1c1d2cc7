"""Wiring of the admission service: its settings, the objects built from them
(:func:`build_service`), the gRPC server (:func:`start_server`), and the process's
life (:func:`serve`: background tasks, SIGTERM drain)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from layerkv.admission.dispatcher import Dispatcher
from layerkv.admission.load_reports import LoadPublisher
from layerkv.admission.outcomes import OutcomeRecorder
from layerkv.admission.server import AdmissionService
from layerkv.admission.slo_classes import SloCatalog
from layerkv.admission.workers import WorkerPool
from layerkv.common import serving
from layerkv.common.slo import DEFAULT_CLASS, SloTarget
from layerkv.common.store import MetricsStore
from layerkv.policy.routing import ClassPolicy
from layerkv.v1 import admission_pb2, common_pb2

log = logging.getLogger(__name__)

SERVICE = admission_pb2.DESCRIPTOR.services_by_name["Admission"]


@dataclass(frozen=True)
class AdmissionSettings:
    workers: tuple[str, ...]
    redis_url: str = ""  # empty: outcomes are not recorded
    # Name under which worker load reports are written to Redis for the operator (the
    # worker Deployment's name); empty: not published.
    worker_pool: str = ""
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9090
    default_ttft_s: float = 2.0
    default_tpot_s: float = 0.1
    slo_refresh_s: float = 5.0
    outcome_buffer: int = 10_000
    outcome_flush_interval_s: float = 0.1
    drain_timeout_s: float = 30.0
    # Extra SLO classes from config (Redis targets override them), and what each class
    # does when no worker can meet its target now.
    classes: tuple[SloTarget, ...] = ()
    policies: tuple[tuple[str, ClassPolicy], ...] = ()
    default_policy: ClassPolicy = field(default_factory=ClassPolicy)
    queue_capacity: int = 1024
    queue_policy: str = "edf"
    max_hold_factor: float = 4.0
    poll_interval_s: float = 0.1
    stale_after_s: float = 3.0
    decision_log: str = ""  # path of a JSON-lines log of every dispatch ('' = none)
    tpot_guard: bool = True


def build_service(settings: AdmissionSettings) -> AdmissionService:
    # Open for the process's life; line-buffered, so a crash loses at most one line.
    decisions = (
        open(settings.decision_log, "a", buffering=1)  # noqa: SIM115
        if settings.decision_log
        else None
    )
    store = MetricsStore.from_url(settings.redis_url) if settings.redis_url else None
    default = SloTarget(DEFAULT_CLASS, settings.default_ttft_s, settings.default_tpot_s)
    classes = {default.name: default, **{c.name: c for c in settings.classes}}
    pool = WorkerPool(
        list(settings.workers),
        poll_interval_s=settings.poll_interval_s,
        stale_after_s=settings.stale_after_s,
    )
    catalog = SloCatalog(
        list(classes.values()),
        store,
        dict(settings.policies),
        settings.default_policy,
    )
    dispatcher = Dispatcher(
        pool,
        catalog,
        queue_capacity=settings.queue_capacity,
        queue_policy=settings.queue_policy,
        max_hold_factor=settings.max_hold_factor,
        decision_log=decisions,
        tpot_guard=settings.tpot_guard,
    )
    recorder = OutcomeRecorder(
        store,
        capacity=settings.outcome_buffer,
        flush_interval_s=settings.outcome_flush_interval_s,
    )
    return AdmissionService(dispatcher, recorder)


async def start_server(service: AdmissionService, host: str, port: int) -> serving.RunningServer:
    return await serving.start_grpc_server(
        SERVICE, service, [admission_pb2, common_pb2], host, port
    )


async def serve(settings: AdmissionSettings) -> None:
    """Run until SIGTERM/SIGINT, then drain: refuse new calls, let running ones finish
    (up to ``drain_timeout_s``), flush buffered outcomes."""
    stop = asyncio.Event()
    serving.install_shutdown_signals(stop)
    service = build_service(settings)
    running = await start_server(service, settings.host, settings.port)
    serving.start_metrics_server(settings.metrics_port)
    service.recorder.start()
    service.start()
    background = [asyncio.create_task(service.catalog.refresh_forever(settings.slo_refresh_s))]
    if settings.worker_pool and service.recorder.store is not None:
        publisher = LoadPublisher(service.pool, service.recorder.store, settings.worker_pool)
        background.append(asyncio.create_task(publisher.run_forever()))
    await running.set_serving(True)
    log.info(
        "admission serving on %s:%d, workers %s", settings.host, running.port, settings.workers
    )
    try:
        await stop.wait()
    finally:
        log.info("draining (%d in flight)", len(service.in_flight))
        service.draining = True
        await running.set_serving(False)
        await running.server.stop(settings.drain_timeout_s)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await service.recorder.close()
        await service.pool.close()
        log.info("admission stopped")
