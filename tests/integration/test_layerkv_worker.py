"""The worker service with its LayerKV flag on: a real worker process (vLLM + the
plug-in) with a KV cache too small to hold the workload, against the stock engine of
the session. Lossless through gRPC, LayerKV paths taken, and observable in the load
report and on the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import random
import urllib.request

import grpc
import pytest

from layerkv.plugin import LayerKVSettings
from layerkv.tools import local_stack
from layerkv.v1 import common_pb2, worker_pb2, worker_pb2_grpc

from .conftest import wait_until
from .test_serving import direct_tokens

pytestmark = pytest.mark.asyncio(loop_scope="session")

# 70 blocks' worth of KV of the default model (8 layers x 32 tokens x 4 KV heads x 32
# dims x K,V x fp32): no two of the prompts below fit in it together (the smallest pair
# needs 36 + 38 blocks), so any two that overlap make the worker offload. The outputs
# are long enough that they do overlap however the five arrive: with the cores busy the
# worker finished a short request before it saw the next, and once in CI (stop 15),
# with short outputs and pairs that fitted, nothing was offloaded within 60 s.
KV_CACHE_GIB = 70 * 8 * 32 * 4 * 32 * 2 * 4 / (1 << 30)
WORKLOAD = [(1200, 112), (1300, 128), (1500, 96), (1150, 120), (1400, 104)]


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 600) for _ in range(length)]


@pytest.fixture(scope="module")
def layerkv_worker(model_dir, log_dir):
    metrics_port = local_stack.free_port()
    proc = local_stack.start_worker(
        local_stack.free_port(),
        model=str(model_dir),
        metrics_port=metrics_port,
        log_dir=log_dir,
        name="layerkv-worker",
        extra_args=["--dtype", "float32", "--kv-cache-gib", repr(KV_CACHE_GIB), "--layerkv"],
    )
    local_stack.wait_serving(proc, timeout_s=300)
    proc.extra["metrics_url"] = f"http://127.0.0.1:{metrics_port}/metrics"
    yield proc
    proc.stop()


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def generate(stub, ids: list[int], max_tokens: int, request_id: str = "") -> list[int]:
    req = worker_pb2.WorkerGenerateRequest(
        request_id=request_id,
        prompt_token_ids=ids,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        slo=common_pb2.SloTargets(ttft_s=2.0, tpot_s=1.0),
    )
    tokens: list[int] = []
    async for resp in stub.Generate(req):
        tokens.extend(resp.tokens.token_ids)
    return tokens


async def test_layerkv_worker_is_lossless_and_reports_offload(layerkv_worker, worker):
    prompts = [(prompt(i, n), out) for i, (n, out) in enumerate(WORKLOAD)]
    async with grpc.aio.insecure_channel(layerkv_worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        before = await stub.GetLoad(worker_pb2.GetLoadRequest())
        assert before.layerkv and before.kv_groups == 8 and before.min_resident_groups == 0
        assert before.reserve_requests == LayerKVSettings().reserve_requests > 0

        run = asyncio.gather(
            *(generate(stub, ids, out, f"lkv-{i}") for i, (ids, out) in enumerate(prompts))
        )

        async def offloaded():
            load = await stub.GetLoad(worker_pb2.GetLoadRequest())
            return [r for r in load.requests if r.offloaded_groups] or None

        # The load report says which requests hold groups in host memory, by the id the
        # worker was given (vLLM's engine knows them by a suffixed id).
        seen = await wait_until(offloaded, timeout_s=60, what="a request reported offloaded")
        assert {r.request_id for r in seen} <= {f"lkv-{i}" for i in range(len(prompts))}
        assert all(0 < r.offloaded_groups <= before.kv_groups for r in seen)
        got = await run
        expected = [await direct_tokens(worker.engine, ids, out) for ids, out in prompts]
        assert got == expected  # greedy tokens equal stock vLLM's, request by request

        async def idle():
            load = await stub.GetLoad(worker_pb2.GetLoadRequest())
            return load if load.running == 0 and load.in_flight == 0 else None

        after = await wait_until(idle, timeout_s=30, what="the LayerKV worker to drain")
        assert after.kv_blocks_free == after.kv_blocks_total  # nothing leaked on the device

    metrics = await asyncio.to_thread(scrape, layerkv_worker.extra["metrics_url"])
    # Stock vLLM cannot hold two of these in its KV cache at once; LayerKV started more by
    # offloading layers, and moved their KV both ways.
    assert metrics["layerkv_worker_admitted_early_total"] >= 1
    assert metrics["layerkv_worker_bytes_offloaded_total"] > 0
    assert metrics["layerkv_worker_bytes_fetched_total"] > 0
    assert metrics["layerkv_worker_requests_with_offloaded_layers"] == 0
    assert metrics["layerkv_worker_host_blocks_used"] == 0  # host buffers released
