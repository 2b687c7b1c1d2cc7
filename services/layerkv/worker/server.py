"""The worker: a gRPC server around one vLLM ``AsyncLLM`` engine.

Streams tokens as the engine produces them; a cancelled call aborts the request in the
engine (closing the ``engine.generate`` generator does that)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass

import grpc
import vllm

from layerkv.common import serving
from layerkv.common.requests import (
    InvalidRequest,
    check_prompt,
    request_id_or_new,
    sampling_from_proto,
)
from layerkv.plugin import LayerKVStats

# The start-up version check: importing the adapter fails, naming the supported vLLM
# release, on any other one -- for a stock worker too. The worker's load reports are
# built from vLLM's internal engine statistics, whose fields change between releases;
# on another release they could silently read as zeros and mislead admission, which is
# worse than a worker that does not start.
from layerkv.plugin.vllm_adapter import AsyncLLM, EngineDeadError
from layerkv.policy.latency import reported_prefill_fit
from layerkv.v1 import common_pb2, worker_pb2
from layerkv.worker import metrics
from layerkv.worker.engine import (
    EngineSettings,
    EngineStatsRecorder,
    build_engine_args,
    sampling_params,
)

log = logging.getLogger(__name__)

SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
_FINISH = {
    "length": common_pb2.FINISH_REASON_LENGTH,
    "stop": common_pb2.FINISH_REASON_STOP,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


class WorkerService:
    """Implements ``layerkv.v1.Worker``."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self.engine: AsyncLLM | None = None  # set by attach() once loaded
        self.in_flight: set[str] = set()
        # Per accepted request, in arrival order: what the admission's TTFT predictor
        # needs (prompt length, tokens so far, max tokens, started or waiting).
        self.progress: dict[str, worker_pb2.RequestProgress] = {}
        self.draining = False

    def attach(self, engine: AsyncLLM, stats: EngineStatsRecorder) -> None:
        self.engine = engine
        self.stats = stats
        stats.context_tokens = self.decoding_context_tokens
        self.tokenizer = engine.get_tokenizer()
        model_config = engine.vllm_config.model_config
        self.max_model_len = model_config.max_model_len
        self.vocab_size = model_config.get_vocab_size()
        self.num_layers = model_config.get_num_layers(engine.vllm_config.parallel_config)

    def decoding_context_tokens(self) -> int:
        """Prompt + output tokens of the requests past their first token: the KV cache
        every decode step reads."""
        return sum(p.prompt_tokens + p.output_tokens for p in self.progress.values() if p.started)

    async def _require_engine(self, context) -> AsyncLLM:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine is still loading")
        return self.engine

    def _prompt_ids(self, request: worker_pb2.WorkerGenerateRequest) -> list[int]:
        check_prompt(request.prompt, request.prompt_token_ids)
        ids = list(request.prompt_token_ids) or self.tokenizer.encode(request.prompt)
        if not ids:
            raise InvalidRequest("the prompt encodes to zero tokens")
        # vLLM needs room for at least one generated token.
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; this model takes at most "
                f"{self.max_model_len - 1} (max_model_len {self.max_model_len})"
            )
        if max(ids) >= self.vocab_size:
            raise InvalidRequest(f"prompt token id {max(ids)} >= vocabulary size {self.vocab_size}")
        return ids

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest, context):
        engine = await self._require_engine(context)
        try:
            request_id = request_id_or_new(request.request_id)
            ids = self._prompt_ids(request)
            params = sampling_params(
                sampling_from_proto(request.sampling),
                ttft_slo_s=request.slo.ttft_s,
                tpot_slo_s=request.slo.tpot_s,
            )
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining; retry elsewhere")
        if request_id in self.in_flight:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r} is already running"
            )

        start = time.monotonic()
        first_token_at: float | None = None
        num_out = 0
        finish_reason = None
        status = "error"
        self.in_flight.add(request_id)
        progress = worker_pb2.RequestProgress(
            request_id=request_id, prompt_tokens=len(ids), max_tokens=params.max_tokens
        )
        self.progress[request_id] = progress
        metrics.IN_FLIGHT.inc()
        try:
            async for out in engine.generate({"prompt_token_ids": ids}, params, request_id):
                completion = out.outputs[0]
                if completion.token_ids:
                    if first_token_at is None:
                        first_token_at = time.monotonic()
                        progress.started = True
                    num_out += len(completion.token_ids)
                    progress.output_tokens = num_out
                    yield worker_pb2.WorkerGenerateResponse(
                        tokens=common_pb2.TokenChunk(
                            text=completion.text, token_ids=completion.token_ids
                        )
                    )
                if out.finished:
                    finish_reason = completion.finish_reason
            end = time.monotonic()
            ttft = (first_token_at - start) if first_token_at is not None else 0.0
            tpot = (end - first_token_at) / (num_out - 1) if num_out > 1 else 0.0
            status = "ok"
            metrics.TTFT.observe(ttft)
            if num_out > 1:
                metrics.TPOT.observe(tpot)
            yield worker_pb2.WorkerGenerateResponse(
                completion=common_pb2.Completion(
                    finish_reason=_FINISH.get(finish_reason, common_pb2.FINISH_REASON_UNSPECIFIED),
                    usage=common_pb2.Usage(prompt_tokens=len(ids), completion_tokens=num_out),
                    ttft_s=ttft,
                    tpot_s=tpot,
                )
            )
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except EngineDeadError as e:
            log.error("engine died: %s", e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine died: {e}")
        except ValueError as e:
            # vLLM's own input validation (VLLMValidationError is a ValueError).
            if num_out:
                raise
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self.in_flight.discard(request_id)
            self.progress.pop(request_id, None)
            metrics.IN_FLIGHT.dec()
            metrics.REQUESTS.labels(status).inc()

    async def GetLoad(self, request: worker_pb2.GetLoadRequest, context) -> worker_pb2.WorkerLoad:
        engine = await self._require_engine(context)
        snap = self.stats.latest
        total = self.stats.num_kv_blocks
        used = round(snap.kv_cache_usage * total)
        age = time.monotonic() - snap.reported_at if snap.reported_at else -1.0
        lat = self.stats.latency.coefficients()
        lkv = self.stats.layerkv
        offloaded = lkv.offloaded_groups_by_request if lkv is not None else {}
        for rid, progress in self.progress.items():
            progress.offloaded_groups = offloaded.get(rid, 0)
        prefill = reported_prefill_fit(
            lat,
            (lkv.prefill_a_s, lkv.prefill_b_s, lkv.prefill_c_s) if lkv is not None else None,
            lkv.prefill_samples if lkv is not None else 0,
        )
        by_count = self.stats.latency.decode_fit_by_count()
        return worker_pb2.WorkerLoad(
            prefill_s_coeffs=prefill,
            decode_step_s=by_count[0],
            decode_step_s_per_seq=by_count[1],
            decode_step_coeffs=self.stats.latency.decode_fit_with_context() or [],
            latency_samples=lat.samples,
            **self._layerkv_fields(),
            requests=list(self.progress.values()),
            max_num_seqs=self.settings.max_num_seqs,
            running=snap.running,
            waiting=snap.waiting,
            in_flight=len(self.in_flight),
            kv_blocks_total=total,
            kv_blocks_free=max(total - used, 0),
            stats_age_s=age,
            draining=self.draining,
            config=worker_pb2.EngineConfig(
                model=self.settings.model,
                max_model_len=self.max_model_len,
                block_size=self.settings.block_size,
                num_layers=self.num_layers,
                dtype=str(engine.vllm_config.model_config.dtype).removeprefix("torch."),
                vllm_version=vllm.__version__,
            ),
        )

    def _layerkv_fields(self) -> dict:
        settings = self.settings.layerkv
        if settings is None:
            return {}
        lkv = self.stats.layerkv or LayerKVStats()
        return dict(
            layerkv=True,
            kv_groups=settings.num_groups or self.num_layers,
            min_resident_groups=settings.min_resident_groups,
            reserve_requests=settings.reserve_requests,
            host_kv_blocks_free=max(lkv.host_blocks_total - lkv.host_blocks_used, 0),
            host_kv_blocks_total=lkv.host_blocks_total,
            offloaded_requests=lkv.requests_with_offloaded_layers,
        )


@dataclass(frozen=True)
class ServerSettings:
    host: str = "[::]"
    port: int = 50061
    metrics_port: int = 9091
    drain_timeout_s: float = 30.0


def start_engine(
    settings: EngineSettings, **engine_overrides
) -> tuple[AsyncLLM, EngineStatsRecorder]:
    stats = EngineStatsRecorder()
    args = build_engine_args(settings, **engine_overrides)
    engine = AsyncLLM.from_engine_args(args, stat_loggers=[stats.factory])
    return engine, stats


async def start_server(service: WorkerService, host: str, port: int) -> serving.RunningServer:
    return await serving.start_grpc_server(SERVICE, service, [worker_pb2, common_pb2], host, port)


def freeze_startup_heap() -> None:
    """Move everything allocated while loading (torch, vLLM, the engine client: ~600k
    objects) out of the garbage collector's reach, as vLLM's own API server does.
    Without it every full collection walks them all, pausing this process mid-run for
    hundreds of milliseconds with no token reaching any client
    (docs/decisions/0004-hot-path-costs.md)."""
    gc.collect()
    gc.freeze()


async def serve(engine_settings: EngineSettings, server_settings: ServerSettings) -> None:
    """Run until SIGTERM/SIGINT, then drain: refuse new calls, finish running ones
    (up to ``drain_timeout_s``), shut the engine down."""
    stop = asyncio.Event()
    serving.install_shutdown_signals(stop)
    service = WorkerService(engine_settings)
    # Listen first (health answers NOT_SERVING) so probes see a live, not-ready pod
    # while the engine loads.
    running = await start_server(service, server_settings.host, server_settings.port)
    serving.start_metrics_server(server_settings.metrics_port)
    log.info("loading engine for %s", engine_settings.model)
    engine, stats = await asyncio.to_thread(start_engine, engine_settings)
    service.attach(engine, stats)
    freeze_startup_heap()
    if engine_settings.layerkv is not None:
        metrics.register_layerkv_collector(stats)
    await running.set_serving(True)
    log.info("worker serving on %s:%d", server_settings.host, running.port)
    try:
        await stop.wait()
    finally:
        log.info("draining (%d in flight)", len(service.in_flight))
        service.draining = True
        metrics.DRAINING.set(1)
        await running.set_serving(False)
        await running.server.stop(server_settings.drain_timeout_s)
        engine.shutdown()
        log.info("worker stopped")
