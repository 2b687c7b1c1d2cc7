"""The worker's vLLM engine: settings -> engine arguments, and what the engine reports.

Only public vLLM API is imported here (AsyncEngineArgs, SamplingParams); the stat-logger
interface and the stats it receives live in vLLM's internal modules, so they come
through the LayerKV adapter (``layerkv.plugin.vllm_adapter``), like every other vLLM
internal.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind

from layerkv.common.requests import Sampling
from layerkv.plugin import LayerKVSettings, LayerKVStats, engine_overrides, layerkv_stats
from layerkv.plugin.vllm_adapter import SchedulerStats, StatLoggerBase
from layerkv.policy.latency import OnlineLatencyModel


@dataclass(frozen=True)
class EngineSettings:
    model: str
    max_model_len: int = 2048
    block_size: int = 32
    # Host memory for the KV cache on CPU / device memory on GPU, in GiB. 0 = vLLM default.
    kv_cache_gib: float = 0.25
    # Caps the KV cache at this many blocks of all layers (creates KV pressure on
    # purpose); a LayerKV engine gets the same bytes. 0 = no cap.
    num_kv_blocks: int = 0
    dtype: str = "auto"
    max_num_seqs: int = 64
    enforce_eager: bool = True
    seed: int = 0
    # None: stock vLLM. Otherwise the LayerKV plug-in with these settings; everything
    # else about the engine is the same, so the two are directly comparable.
    layerkv: LayerKVSettings | None = None

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.kv_cache_gib < 0 or self.num_kv_blocks < 0:
            raise ValueError("kv_cache_gib and num_kv_blocks must be >= 0")


def build_engine_args(settings: EngineSettings, **overrides: Any) -> AsyncEngineArgs:
    """vLLM engine arguments for ``settings``; ``overrides`` (e.g. the LayerKV plug-in's)
    are applied last."""
    kwargs: dict[str, Any] = dict(
        model=settings.model,
        max_model_len=settings.max_model_len,
        block_size=settings.block_size,
        dtype=settings.dtype,
        max_num_seqs=settings.max_num_seqs,
        enforce_eager=settings.enforce_eager,
        seed=settings.seed,
        disable_log_stats=False,  # the load report is built from the engine's stats
    )
    if settings.kv_cache_gib:
        kwargs["kv_cache_memory_bytes"] = int(settings.kv_cache_gib * (1 << 30))
    if settings.num_kv_blocks:
        # vLLM's override counts blocks of its pool; with LayerKV's G groups a pool
        # block holds 1/G of the layers, so the same memory is G times as many blocks.
        groups = 1
        if settings.layerkv is not None:
            groups = settings.layerkv.num_groups or num_attention_layers(settings.model)
        kwargs["num_gpu_blocks_override"] = settings.num_kv_blocks * groups
    if settings.layerkv is not None:
        kwargs.update(engine_overrides(settings.layerkv))
    kwargs.update(overrides)
    return AsyncEngineArgs(**kwargs)


def num_attention_layers(model: str) -> int:
    """Attention layers of a Hugging Face model directory (its config.json)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).num_hidden_layers


def sampling_params(
    s: Sampling, *, ttft_slo_s: float = 0.0, tpot_slo_s: float = 0.0
) -> SamplingParams:
    """vLLM sampling parameters; tokens come back as deltas, and the request's SLO
    targets ride along in ``extra_args`` for the engine's scheduler."""
    return SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        seed=s.seed,
        stop=list(s.stop) or None,
        ignore_eos=s.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
        extra_args={"layerkv": {"ttft_s": ttft_slo_s, "tpot_s": tpot_slo_s}},
    )


@dataclass(frozen=True)
class SchedulerSnapshot:
    """The engine scheduler's last report, as the worker's load report needs it."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    reported_at: float = 0.0  # time.monotonic(); 0 = never
    raw: SchedulerStats | None = None


class EngineStatsRecorder:
    """Keeps the newest scheduler statistics the engine sent.

    Pass ``recorder.factory`` in ``AsyncLLM(stat_loggers=[...])``: vLLM builds one
    logger per engine and calls ``record`` on the frontend's event loop."""

    def __init__(self) -> None:
        self.latest = SchedulerSnapshot()
        self.num_kv_blocks = 0
        # Prefill time (from vLLM's per-request FinishedRequestStats) and decode step
        # time (from its per-step inter-token latencies), for the admission's TTFT
        # predictor.
        self.latency = OnlineLatencyModel()
        # Tokens of context the requests decoding now hold together (prompt + output
        # so far): the worker's request table knows, the engine's statistics do not.
        self.context_tokens: Callable[[], int] = lambda: 0
        # The LayerKV plug-in's counters (None on a stock engine).
        self.layerkv: LayerKVStats | None = None

    def _observe(self, iteration_stats) -> None:
        for fin in getattr(iteration_stats, "finished_requests", ()):
            if fin.num_preemptions:
                continue  # recomputed: its timings mix two lives
            self.latency.observe_prefill(fin.num_prompt_tokens, fin.prefill_time)
        itl = getattr(iteration_stats, "inter_token_latencies_iter", None)
        if itl and not getattr(iteration_stats, "time_to_first_tokens_iter", None):
            # One engine step in which n requests each decoded a token and no prefill
            # completed: each one's inter-token latency is that step's duration (engine
            # timestamps). A per-request mean TPOT would mix in other requests'
            # prefill steps and lag the batch size.
            self.latency.observe_decode(len(itl), statistics.median(itl), self.context_tokens())

    def factory(self, vllm_config, engine_index: int = 0) -> StatLoggerBase:
        recorder = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                self.vllm_config = vllm_config

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                if iteration_stats is not None:
                    recorder._observe(iteration_stats)
                if scheduler_stats is not None:
                    recorder.latest = SchedulerSnapshot(
                        running=scheduler_stats.num_running_reqs,
                        waiting=scheduler_stats.num_waiting_reqs
                        + scheduler_stats.num_skipped_waiting_reqs,
                        kv_cache_usage=scheduler_stats.kv_cache_usage,
                        reported_at=time.monotonic(),
                        raw=scheduler_stats,
                    )
                    lkv = layerkv_stats(scheduler_stats)
                    if lkv is not None:
                        recorder.layerkv = lkv

            def log_engine_initialized(self) -> None:
                # num_gpu_blocks is known only once the engine has sized its KV cache.
                recorder.num_kv_blocks = self.vllm_config.cache_config.num_gpu_blocks or 0

        return _Logger(vllm_config, engine_index)
