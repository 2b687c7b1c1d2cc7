"""The admission service: the client-facing ``layerkv.v1.Admission`` gRPC server.

Validates a request, resolves its SLO class, forwards it to a worker, streams the
tokens back, and records the outcome (TTFT and TPOT as the client sees them) in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import grpc

from layerkv.admission import metrics
from layerkv.admission.outcomes import OutcomeRecorder
from layerkv.admission.slo_classes import SloCatalog
from layerkv.admission.workers import WorkerPool
from layerkv.common import serving
from layerkv.common.requests import (
    InvalidRequest,
    check_prompt,
    request_id_or_new,
    sampling_from_proto,
)
from layerkv.common.slo import DEFAULT_CLASS, RequestOutcome, SloTarget
from layerkv.common.store import MetricsStore
from layerkv.v1 import admission_pb2, common_pb2, worker_pb2

log = logging.getLogger(__name__)

SERVICE = admission_pb2.DESCRIPTOR.services_by_name["Admission"]

# Worker answers passed to the client as they are: the request itself is at fault.
_CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
}
# Worker answers after which the next worker may succeed (if nothing was streamed yet).
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@dataclass
class _Measured:
    """What the admission service measured of one request while streaming it."""

    start: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    worker: str = ""

    def token(self, n: int) -> None:
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.tokens += n

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.start

    @property
    def tpot_s(self) -> float | None:
        if self.tokens < 2 or self.first_token_at is None:
            return None
        return (self.last_token_at - self.first_token_at) / (self.tokens - 1)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, status: str) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class AdmissionService:
    """Implements ``layerkv.v1.Admission``."""

    def __init__(self, pool: WorkerPool, catalog: SloCatalog, recorder: OutcomeRecorder) -> None:
        self.pool = pool
        self.catalog = catalog
        self.recorder = recorder
        self.in_flight: set[str] = set()
        self.draining = False

    def _admit(self, request: admission_pb2.GenerateRequest) -> tuple[str, SloTarget]:
        request_id = request_id_or_new(request.request_id)
        check_prompt(request.prompt, request.prompt_token_ids)
        sampling_from_proto(request.sampling)
        slo_class = request.slo_class or DEFAULT_CLASS
        target = self.catalog.get(slo_class)
        if target is None:
            raise InvalidRequest(
                f"unknown slo_class {slo_class!r}; known: {', '.join(self.catalog.names())}"
            )
        return request_id, target

    async def Generate(self, request: admission_pb2.GenerateRequest, context):
        try:
            request_id, target = self._admit(request)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "admission is draining; retry")
        if request_id in self.in_flight:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r} is already running"
            )

        worker_request = worker_pb2.WorkerGenerateRequest(
            request_id=request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            sampling=request.sampling,
            slo=common_pb2.SloTargets(ttft_s=target.ttft_s, tpot_s=target.tpot_s),
            slo_class=target.name,
        )
        measured = _Measured()
        status, error = "error", ""
        self.in_flight.add(request_id)
        metrics.IN_FLIGHT.inc()
        try:
            async for response in self._forward(worker_request, request_id, measured, context):
                yield response
            status = "ok"
        except _Abort as e:
            status, error = e.status, e.message
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            self.in_flight.discard(request_id)
            metrics.IN_FLIGHT.dec()
            if status != "client_error":
                self._record(request_id, target, status, measured, error)

    async def _forward(self, worker_request, request_id: str, measured: _Measured, context):
        """Stream ``worker_request`` from the first worker that takes it."""
        timeout = context.time_remaining()
        tried: list[str] = []
        for worker in self.pool.candidates():
            call = worker.stub.Generate(worker_request, timeout=timeout)
            measured.worker = worker.address
            try:
                async for response in call:
                    if response.HasField("tokens"):
                        measured.token(len(response.tokens.token_ids))
                        yield admission_pb2.GenerateResponse(
                            request_id=request_id, tokens=response.tokens
                        )
                    elif response.HasField("completion"):
                        measured.prompt_tokens = response.completion.usage.prompt_tokens
                        yield admission_pb2.GenerateResponse(
                            request_id=request_id,
                            completion=self._completion(response.completion, measured),
                        )
                self.pool.mark_ok(worker)
                return
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code in _CLIENT_ERRORS:
                    raise _Abort(code, e.details() or code.name, "client_error") from e
                streamed = measured.tokens > 0
                metrics.WORKER_FAILURES.labels(
                    worker.address, "mid_stream" if streamed else "before_stream"
                ).inc()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise _Abort(code, "deadline exceeded", "error") from e
                if streamed or code not in _RETRYABLE:
                    self.pool.mark_failed(worker)
                    raise _Abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"worker {worker.address} failed after {measured.tokens} tokens: "
                        f"{code.name}: {e.details()}",
                        "error",
                    ) from e
                log.warning(
                    "worker %s unavailable (%s); trying the next", worker.address, code.name
                )
                self.pool.mark_failed(worker)
                tried.append(worker.address)
            finally:
                call.cancel()  # no-op when finished; aborts the worker request otherwise
        raise _Abort(
            grpc.StatusCode.UNAVAILABLE,
            f"no worker could take the request (tried {tried})",
            "error",
        )

    @staticmethod
    def _completion(c: common_pb2.Completion, measured: _Measured) -> common_pb2.Completion:
        """The worker's completion with the latencies the client actually saw."""
        return common_pb2.Completion(
            finish_reason=c.finish_reason,
            usage=c.usage,
            ttft_s=measured.ttft_s or 0.0,
            tpot_s=measured.tpot_s or 0.0,
            worker=measured.worker,
        )

    def _record(self, request_id, target, status, measured: _Measured, error: str) -> None:
        metrics.REQUESTS.labels(target.name, status).inc()
        if measured.ttft_s is not None:
            metrics.TTFT.labels(target.name).observe(measured.ttft_s)
        if measured.tpot_s is not None:
            metrics.TPOT.labels(target.name).observe(measured.tpot_s)
        outcome = RequestOutcome(
            request_id=request_id,
            slo_class=target.name,
            status=status,
            finished_at=time.time(),
            ttft_s=measured.ttft_s,
            tpot_s=measured.tpot_s,
            prompt_tokens=measured.prompt_tokens,
            output_tokens=measured.tokens,
            worker=measured.worker,
            error=error,
        )
        self.recorder.submit(outcome, target)


@dataclass(frozen=True)
class AdmissionSettings:
    workers: tuple[str, ...]
    redis_url: str = ""  # empty: outcomes are not recorded
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9090
    default_ttft_s: float = 2.0
    default_tpot_s: float = 0.1
    slo_refresh_s: float = 5.0
    outcome_buffer: int = 10_000
    drain_timeout_s: float = 30.0


def build_service(settings: AdmissionSettings) -> AdmissionService:
    store = MetricsStore.from_url(settings.redis_url) if settings.redis_url else None
    default = SloTarget(DEFAULT_CLASS, settings.default_ttft_s, settings.default_tpot_s)
    return AdmissionService(
        WorkerPool(list(settings.workers)),
        SloCatalog([default], store),
        OutcomeRecorder(store, capacity=settings.outcome_buffer),
    )


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
    refresher = asyncio.create_task(service.catalog.refresh_forever(settings.slo_refresh_s))
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
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        await service.recorder.close()
        await service.pool.close()
        log.info("admission stopped")
