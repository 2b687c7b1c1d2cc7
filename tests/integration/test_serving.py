"""The walking skeleton end to end: client -> admission -> worker -> vLLM, over real
loopback gRPC, with a real engine and a real Redis."""

from __future__ import annotations

import asyncio
import sys
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from vllm import SamplingParams

from layerkv.common.store import MetricsStore
from layerkv.tools import local_stack
from layerkv.v1 import admission_pb2, admission_pb2_grpc, common_pb2, worker_pb2

from .conftest import start_admission, stop_admission, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPTS = [
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog. " * 12,
    [5, 17, 42, 99, 300, 7, 7, 7],
    "Kubernetes runs the workers; an operator adds workers when " * 30,
]


def request(prompt, max_tokens=24, **kw) -> admission_pb2.GenerateRequest:
    text, ids = (prompt, []) if isinstance(prompt, str) else ("", prompt)
    return admission_pb2.GenerateRequest(
        prompt=text,
        prompt_token_ids=ids,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        **kw,
    )


async def collect(stub, req):
    chunks, completion, ids = [], None, set()
    async for resp in stub.Generate(req):
        ids.add(resp.request_id)
        if resp.HasField("decision"):
            # The admission decision (issue #4) comes before any token.
            assert not chunks and completion is None, "decision after tokens"
            continue
        if resp.HasField("tokens"):
            assert completion is None, "tokens after the completion"
            chunks.append(resp.tokens)
        else:
            completion = resp.completion
    assert completion is not None, "stream ended without a completion"
    assert len(ids) == 1
    return ids.pop(), chunks, completion


async def direct_tokens(engine, prompt, max_tokens=24) -> list[int]:
    """What vLLM itself produces, through the same engine, no gRPC in between."""
    engine_prompt = prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt}
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    final = None
    async for out in engine.generate(engine_prompt, params, f"direct-{uuid.uuid4().hex}"):
        final = out
    return list(final.outputs[0].token_ids)


async def test_greedy_output_through_admission_equals_vllm(worker, admission_stub):
    via_admission = await asyncio.gather(*(collect(admission_stub, request(p)) for p in PROMPTS))
    direct = [await direct_tokens(worker.engine, p) for p in PROMPTS]
    for prompt, (_, chunks, _), expected in zip(PROMPTS, via_admission, direct, strict=True):
        got = [t for c in chunks for t in c.token_ids]
        assert got == expected, f"prompt {prompt!r:.40}"


async def test_stream_order_counts_and_completion(admission, admission_stub):
    rid, chunks, c = await collect(admission_stub, request("Once upon a time", max_tokens=17))
    assert sum(len(ch.token_ids) for ch in chunks) == 17
    assert all(len(ch.token_ids) >= 1 for ch in chunks)
    assert c.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert c.usage.completion_tokens == 17
    assert c.usage.prompt_tokens == 4
    assert 0 < c.ttft_s < 30 and 0 < c.tpot_s < 5
    assert c.worker == admission.service.pool.workers[0].address
    assert len(rid) == 32  # generated when the client gave none


async def test_client_request_id_is_kept(admission_stub):
    rid, _, _ = await collect(admission_stub, request("hello", max_tokens=2, request_id="my-id-1"))
    assert rid == "my-id-1"


async def test_outcome_recorded_in_redis_per_request(admission, admission_stub, redis_server):
    rids = [f"rec-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    results = await asyncio.gather(
        *(collect(admission_stub, request("Once upon", 8, request_id=r)) for r in rids)
    )
    store = MetricsStore.from_url(redis_server.extra["url"])
    await wait_until(
        lambda: all(store.get_outcome(r) for r in rids), what="outcome records in Redis"
    )
    for rid, (_, _, completion) in zip(rids, results, strict=True):
        rec = store.get_outcome(rid)
        assert rec["status"] == "ok" and rec["slo_class"] == "default"
        assert rec["output_tokens"] == "8"
        assert float(rec["ttft_s"]) == pytest.approx(completion.ttft_s, rel=1e-6)
        assert 0 < float(rec["ttft_s"]) < 30 and 0 < float(rec["tpot_s"]) < 5
        assert rec["worker"] == admission.service.pool.workers[0].address
    window = store.window_stats("default", 300)
    assert window.requests >= 3


async def test_cancel_reaches_the_engine(
    worker, admission, admission_stub, worker_stub, redis_server
):
    rid = f"cancel-{uuid.uuid4().hex[:8]}"
    call = admission_stub.Generate(request("Once upon a time", max_tokens=1500, request_id=rid))
    seen = 0
    async for resp in call:
        seen += resp.HasField("tokens")
        if seen == 3:
            break
    assert rid in worker.service.in_flight
    call.cancel()
    await wait_until(lambda: rid not in worker.service.in_flight, what="worker to drop the call")
    await wait_until(
        lambda: worker.engine.get_num_unfinished_requests() == 0, what="engine to abort it"
    )

    async def engine_scheduler_idle():
        load = await worker_stub.GetLoad(worker_pb2.GetLoadRequest())
        return load.running == 0 and load.waiting == 0 and load.in_flight == 0

    await wait_until(engine_scheduler_idle, what="the engine's scheduler to report 0 running")
    store = MetricsStore.from_url(redis_server.extra["url"])
    await wait_until(lambda: store.get_outcome(rid), what="the cancelled outcome")
    assert store.get_outcome(rid)["status"] == "cancelled"


async def _raw_call(address: str, payload: bytes):
    """Send bytes the generated stub would never produce."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_stream(
            "/layerkv.v1.Admission/Generate",
            request_serializer=lambda b: b,
            response_deserializer=admission_pb2.GenerateResponse.FromString,
        )(payload)
        return [r async for r in call]


BAD_REQUESTS = {
    "empty prompt": (request(""), "empty"),
    "max_tokens 0": (
        admission_pb2.GenerateRequest(prompt="x", sampling=common_pb2.SamplingParams(max_tokens=0)),
        "max_tokens",
    ),
    "negative max_tokens": (
        admission_pb2.GenerateRequest(
            prompt="x", sampling=common_pb2.SamplingParams(max_tokens=-3)
        ),
        "max_tokens",
    ),
    "prompt longer than max_model_len": (request([5] * 2100), "max_model_len"),
    "token id outside the vocabulary": (request([5, 100000]), "vocabulary"),
    "both prompt kinds": (
        admission_pb2.GenerateRequest(prompt="x", prompt_token_ids=[1]),
        "not both",
    ),
    "unknown SLO class": (request("x", slo_class="gold"), "unknown slo_class"),
    "bad request id": (request("x", request_id="no spaces allowed"), "request_id"),
    "top_p out of range": (
        admission_pb2.GenerateRequest(prompt="x", sampling=common_pb2.SamplingParams(top_p=2)),
        "top_p",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_input_is_invalid_argument(admission_stub, case):
    req, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(admission_stub, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


@pytest.mark.parametrize(
    "payload, message",
    [
        (request("x").SerializeToString() + bytes([0xA0, 0x06, 0x01]), "does not know"),
        (b"\xff\xff\xff\xff", "malformed"),
    ],
)
async def test_unknown_fields_and_garbage_are_invalid_argument(admission, payload, message):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _raw_call(admission.address, payload)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


async def test_duplicate_in_flight_request_id_is_refused(admission_stub):
    rid = f"dup-{uuid.uuid4().hex[:8]}"
    first = admission_stub.Generate(request("hello", max_tokens=400, request_id=rid))
    async for _ in first:
        break  # first is now running
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(admission_stub, request("hello", max_tokens=2, request_id=rid))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    first.cancel()


async def test_no_reachable_worker_is_unavailable(redis_server):
    handle = await start_admission([f"127.0.0.1:{local_stack.free_port()}"], "")
    try:
        async with grpc.aio.insecure_channel(handle.address) as channel:
            stub = admission_pb2_grpc.AdmissionStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, request("hello", max_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no worker" in err.value.details()
    finally:
        await stop_admission(handle)


async def test_requests_succeed_while_redis_is_down_and_outcomes_flush_after(worker, log_dir):
    port = local_stack.free_port()
    redis_proc = local_stack.start_redis(port, log_dir)
    handle = await start_admission([worker.address], redis_proc.extra["url"])
    try:
        redis_proc.stop()
        async with grpc.aio.insecure_channel(handle.address) as channel:
            stub = admission_pb2_grpc.AdmissionStub(channel)
            rids = [f"down-{i}" for i in range(3)]
            for rid in rids:
                _, chunks, _ = await collect(stub, request("hello", 4, request_id=rid))
                assert sum(len(c.token_ids) for c in chunks) == 4
        recorder = handle.service.recorder
        await wait_until(lambda: not recorder.redis_ok, what="the recorder to notice Redis down")
        assert recorder.pending == 3 and recorder.dropped == 0

        redis_proc = local_stack.start_redis(port, log_dir)  # same port, empty
        await wait_until(lambda: recorder.pending == 0, timeout_s=20, what="buffer flush")
        store = MetricsStore.from_url(redis_proc.extra["url"])
        assert all(store.get_outcome(r)["status"] == "ok" for r in rids)
    finally:
        await stop_admission(handle)
        redis_proc.stop()


@pytest.mark.parametrize("which", ["worker", "admission"])
async def test_health_and_reflection(request, which):
    handle = request.getfixturevalue(which)
    service = {"worker": "layerkv.v1.Worker", "admission": "layerkv.v1.Admission"}[which]
    async with grpc.aio.insecure_channel(handle.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    def reflected_services():
        with grpc.insecure_channel(handle.address) as sync_channel:
            return ProtoReflectionDescriptorDatabase(sync_channel).get_services()

    services = await asyncio.to_thread(reflected_services)
    assert service in services and "grpc.health.v1.Health" in services


async def test_worker_load_report(worker_stub, model_dir):
    load = await worker_stub.GetLoad(worker_pb2.GetLoadRequest())
    assert load.kv_blocks_total > 0
    assert 0 < load.kv_blocks_free <= load.kv_blocks_total
    assert load.config.num_layers == 8
    assert load.config.max_model_len == 2048 and load.config.block_size == 32
    assert load.config.vllm_version == "0.32.0"
    assert load.config.model == str(model_dir)


async def test_worker_fits_its_decode_step_on_the_context_its_requests_hold(worker, worker_stub):
    # Two requests of different prompt lengths decode side by side: each decode step
    # the worker observes carries the context its requests hold (prompt + output).
    def generate(prompt_tokens: int):
        req = worker_pb2.WorkerGenerateRequest(
            prompt_token_ids=[7 + i % 500 for i in range(prompt_tokens)],
            sampling=common_pb2.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
        )
        return _drain(worker_stub.Generate(req))

    await asyncio.gather(generate(40), generate(600))
    # Their last steps: both decoding, 640 prompt tokens and some output each.
    last = worker.service.stats.latency.decode_observations()[-3:]
    assert any(n == 2 and context >= 642 for n, context, _ in last), last
    load = await worker_stub.GetLoad(worker_pb2.GetLoadRequest())
    assert load.decode_step_s > 0  # the fit by count alone, for older admissions
    # The fit with context, once it has one, is reported next to it.
    coeffs = list(load.decode_step_coeffs)
    assert len(coeffs) in (0, 3) and all(c >= 0 for c in coeffs)


async def _drain(call) -> int:
    return sum([1 async for resp in call if resp.HasField("tokens")])


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "layerkv.client",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_cli_prints_text_and_latencies(admission, admission_stub):
    code, out, err = await _cli("--target", admission.address, "Once upon a time", "--ignore-eos")
    assert code == 0, err
    _, chunks, _ = await collect(admission_stub, request("Once upon a time", max_tokens=32))
    assert out.rstrip("\n") == "".join(c.text for c in chunks)
    assert "ttft=" in err and "tokens=4+32" in err and "FINISH_REASON_LENGTH" in err
    assert "[admitted] worker=" + admission.service.pool.workers[0].address in err


async def test_cli_reports_server_errors_with_exit_code_1(admission):
    code, _, err = await _cli("--target", admission.address, "x", "--max-tokens", "0")
    assert code == 1
    assert "INVALID_ARGUMENT" in err and "max_tokens" in err


async def test_worker_load_is_published_to_redis_for_the_operator(admission, worker, redis_server):
    from layerkv.admission.load_reports import LoadPublisher

    store = MetricsStore.from_url(redis_server.extra["url"], prefix=f"t{uuid.uuid4().hex[:6]}")
    pool = admission.service.pool
    await wait_until(lambda: pool.routable(), what="the admission to poll the worker")
    publisher = LoadPublisher(pool, store, "chat-worker", interval_s=1)
    assert await publisher.publish_once() == 1
    (report,) = store.worker_loads("chat-worker")
    assert report.worker == worker.address
    assert report.kv_blocks_total == worker.service.stats.num_kv_blocks > 0
    assert 0 < store.client.ttl(f"{store.prefix}:load:chat-worker:{worker.address}") <= 5
