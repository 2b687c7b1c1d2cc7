"""Admission that knows the cluster (issue #4), end to end: two real workers (vLLM
engines in their own processes, small KV caches to create pressure), the real
admission service on loopback gRPC, real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid

import grpc
import pytest
import pytest_asyncio

from layerkv.admission.app import AdmissionSettings, build_service
from layerkv.admission.app import start_server as start_admission_server
from layerkv.common.slo import SloTarget
from layerkv.common.store import MetricsStore
from layerkv.policy.routing import ClassPolicy, MissPolicy
from layerkv.tools import local_stack
from layerkv.v1 import admission_pb2, admission_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc

from .conftest import wait_until

pytestmark = pytest.mark.asyncio(loop_scope="session")

# 72 blocks of 32 tokens: one 2048-token request fits (vLLM's start-up check), two
# long prompts do not.
KV_BLOCKS = 72
WORKER_ARGS = ["--dtype", "float32", "--num-kv-blocks", str(KV_BLOCKS), "--max-num-seqs", "16"]


def ids(n: int, seed: int = 0) -> list[int]:
    return [(seed * 7 + i * 13) % 590 + 5 for i in range(n)]


def gen_request(n_prompt, max_tokens=8, **kw) -> admission_pb2.GenerateRequest:
    return admission_pb2.GenerateRequest(
        prompt_token_ids=ids(n_prompt, seed=n_prompt),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        **kw,
    )


async def run(stub, req, timeout=None):
    """(decisions, tokens, completion) of one Generate call."""
    decisions, tokens, completion = [], 0, None
    async for resp in stub.Generate(req, timeout=timeout):
        if resp.HasField("decision"):
            decisions.append(resp.decision)
        elif resp.HasField("tokens"):
            tokens += len(resp.tokens.token_ids)
        else:
            completion = resp.completion
    return decisions, tokens, completion


@pytest.fixture(scope="module")
def workers(model_dir, log_dir):
    procs = [
        local_stack.start_worker(
            local_stack.free_port(),
            model=str(model_dir),
            log_dir=log_dir,
            extra_args=WORKER_ARGS,
            name=f"kvworker-{i}",
            cpus=cpus,
        )
        for i, cpus in enumerate(local_stack.engine_cpus(2))
    ]
    try:
        for p in procs:
            local_stack.wait_serving(p, timeout_s=300)
        yield procs
    finally:
        for p in procs:
            # The engine core is a child in the worker's session: take the group down.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, signal.SIGKILL)
            p.popen.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def admission(workers, redis_server):
    settings = AdmissionSettings(
        workers=tuple(w.address for w in workers),
        redis_url=redis_server.extra["url"],
        classes=(
            SloTarget("interactive", ttft_s=0.002, tpot_s=1.0),
            SloTarget("tight", ttft_s=0.3, tpot_s=1.0),
        ),
        policies=(("interactive", ClassPolicy(MissPolicy.REJECT, 2.0)),),
        poll_interval_s=0.1,
        stale_after_s=3.0,
        default_ttft_s=30.0,
        # Hold queued requests as long as the tests need (no forced dispatch).
        max_hold_factor=1000.0,
    )
    service = build_service(settings)
    service.recorder.start()
    service.start()
    running = await start_admission_server(service, "127.0.0.1", 0)
    await running.set_serving(True)
    await wait_until(
        lambda: len(service.pool.routable()) == 2, timeout_s=10, what="both workers routable"
    )
    yield service, f"127.0.0.1:{running.port}"
    await running.server.stop(1)
    await service.recorder.close(timeout_s=1)
    await service.pool.close()


@pytest_asyncio.fixture(loop_scope="session")
async def stub(admission):
    async with grpc.aio.insecure_channel(admission[1]) as channel:
        yield admission_pb2_grpc.AdmissionStub(channel)


def endpoint(service, address):
    return next(w for w in service.pool.workers if w.address == address)


class Occupier:
    """Long requests sent straight to one worker, bypassing admission: together they
    hold (nearly) all of its KV blocks for many seconds (8 x 250 prompt tokens = 64 of
    72 blocks, growing with 1700 output tokens each, so the cache stays full)."""

    def __init__(self, address: str, count: int = 8, n_prompt: int = 250, max_tokens=1700):
        self.channel = grpc.aio.insecure_channel(address)
        stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.calls = [
            stub.Generate(
                worker_pb2.WorkerGenerateRequest(
                    request_id=f"occupy-{uuid.uuid4().hex[:6]}",
                    prompt_token_ids=ids(n_prompt, 3 + i),
                    sampling=common_pb2.SamplingParams(
                        max_tokens=max_tokens, temperature=0, ignore_eos=True
                    ),
                )
            )
            for i in range(count)
        ]

    def running(self) -> bool:
        return not any(c.done() for c in self.calls)

    async def close(self) -> None:
        for c in self.calls:
            c.cancel()
        await self.channel.close()


async def no_room_for(stub, n_prompt: int) -> bool:
    """Admission predicts that no worker can start this prompt now."""
    prediction = await stub.Predict(gen_request(n_prompt, slo_class="tight"))
    return prediction.decision.kind == admission_pb2.DECISION_KIND_QUEUED


def kv_full(service, address) -> bool:
    load = endpoint(service, address).load
    return load is not None and load.kv_blocks_free < 12 and load.running >= 4


async def test_routing_prefers_the_worker_with_free_kv(admission, stub, workers):
    service, _ = admission
    full, free = workers[0].address, workers[1].address
    occupier = Occupier(full)
    try:
        # Wait until admission *sees* the full worker (its poll), not for a fixed time.
        # The occupiers grow past the cache and vLLM preempts and recomputes them, so
        # the full worker's free blocks come and go: wait for a prediction made while
        # they were gone.
        async def predicted_kv_wait_on_full():
            if not kv_full(service, full):
                return None
            prediction = await stub.Predict(gen_request(600, slo_class="tight"))
            by_worker = {w.worker: w for w in prediction.workers}
            return (prediction, by_worker) if by_worker[full].kv_wait_s > 0 else None

        prediction, by_worker = await wait_until(
            predicted_kv_wait_on_full, timeout_s=60, what="a predicted KV wait on the full worker"
        )
        assert by_worker[free].kv_wait_s == 0
        assert by_worker[full].predicted_ttft_s > by_worker[free].predicted_ttft_s
        assert prediction.decision.worker == free
        # Round-robin would alternate; every one goes to the worker with free KV.
        for _ in range(3):
            decisions, n, completion = await run(stub, gen_request(600, 4))
            assert occupier.running()
            assert n == 4 and completion.worker == free, (
                decisions,
                endpoint(service, full).load,
                await stub.Predict(gen_request(600)),
            )
            assert decisions[-1].kind == admission_pb2.DECISION_KIND_ADMITTED
            assert decisions[-1].worker == free and decisions[-1].predicted_ttft_s > 0
    finally:
        await occupier.close()


async def test_reject_policy_answers_resource_exhausted_with_retry_after(
    admission, stub, redis_server
):
    rid = f"rej-{uuid.uuid4().hex[:6]}"
    # A 2 ms TTFT target with a 1500-token prompt: the prefill alone takes longer.
    prediction = await stub.Predict(gen_request(1500, slo_class="interactive"))
    assert prediction.decision.kind == admission_pb2.DECISION_KIND_REJECTED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run(stub, gen_request(1500, slo_class="interactive", request_id=rid))
    e = err.value
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after" in e.details() and "exceeds" in e.details()
    retry_ms = dict(e.trailing_metadata())["retry-after-ms"]
    assert int(retry_ms) >= 1
    store = MetricsStore.from_url(redis_server.extra["url"])
    await wait_until(lambda: store.get_outcome(rid), what="the rejected outcome in Redis")
    assert store.get_outcome(rid)["status"] == "rejected"


async def test_queued_until_kv_frees_then_admitted(admission, stub, workers):
    service, _ = admission
    held = [Occupier(w.address) for w in workers]
    try:
        await wait_until(
            lambda: no_room_for(stub, 900),
            timeout_s=60,
            what="no worker to have KV for a 900-token prompt",
        )
        task = asyncio.create_task(run(stub, gen_request(900, 4, slo_class="tight")))
        await wait_until(
            lambda: len(service.dispatcher.queue) == 1, timeout_s=10, what="it to be queued"
        )
        assert all(o.running() for o in held)
        for o in held:
            await o.close()
        decisions, n, completion = await asyncio.wait_for(task, 60)
        kinds = [d.kind for d in decisions]
        assert kinds == [admission_pb2.DECISION_KIND_QUEUED, admission_pb2.DECISION_KIND_ADMITTED]
        assert decisions[0].queue_position == 1
        assert decisions[1].queued_s > 0
        assert n == 4 and completion.worker in {w.address for w in workers}
        assert len(service.dispatcher.queue) == 0
    finally:
        for o in held:
            await o.close()


async def test_client_deadline_ends_a_queued_request_and_frees_its_slot(admission, stub, workers):
    service, _ = admission
    held = [Occupier(w.address) for w in workers]
    try:
        await wait_until(
            lambda: no_room_for(stub, 900),
            timeout_s=60,
            what="no worker to have KV for a 900-token prompt",
        )
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run(stub, gen_request(900, 4, slo_class="tight"), timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Held without a deadline it would wait up to max_hold_factor x target (300 s);
        # the bound is loose because this process also streams 16 occupier requests
        # and the whole suite shares 2 cores (6.8 s seen in one full CI run).
        assert time.monotonic() - started < 20
        await wait_until(lambda: len(service.dispatcher.queue) == 0, what="the queue to drop it")
        await wait_until(lambda: not service.in_flight, what="no request left in flight")
    finally:
        for o in held:
            await o.close()


async def test_predicted_ttft_error_is_aggregated_in_redis(admission, stub, redis_server):
    service, _ = admission
    store = MetricsStore.from_url(redis_server.extra["url"])
    await wait_until(lambda: service.recorder.pending == 0, what="earlier outcomes written")
    before = store.window_stats("tight", 300)
    rids = [f"pred-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    for rid in rids:
        decisions, _, completion = await run(
            stub, gen_request(300, 4, slo_class="tight", request_id=rid)
        )
        assert decisions[-1].predicted_ttft_s > 0 and completion.ttft_s > 0
    await wait_until(lambda: all(store.get_outcome(r) for r in rids), what="the outcomes in Redis")
    after = store.window_stats("tight", 300)
    records = [store.get_outcome(r) for r in rids]
    errors = [float(r["predicted_ttft_s"]) - float(r["ttft_s"]) for r in records]
    apes = [abs(e) / float(r["ttft_s"]) for e, r in zip(errors, records, strict=True)]
    assert after.predicted - before.predicted == 3
    assert after.ttft_pred_err_sum_s - before.ttft_pred_err_sum_s == pytest.approx(sum(errors))
    assert after.ttft_pred_abs_err_sum_s - before.ttft_pred_abs_err_sum_s == pytest.approx(
        sum(abs(e) for e in errors)
    )
    assert after.ttft_pred_ape_sum - before.ttft_pred_ape_sum == pytest.approx(sum(apes))
    assert after.ttft_mape == pytest.approx(after.ttft_pred_ape_sum / after.predicted)


async def test_redis_outage_loses_no_outcome_below_the_buffer_bound(admission, stub, log_dir):
    service, _ = admission
    port = local_stack.free_port()
    redis_proc = local_stack.start_redis(port, log_dir)
    recorder = service.recorder
    await wait_until(lambda: recorder.pending == 0, what="earlier outcomes written")
    old_store = recorder.store
    recorder.store = MetricsStore.from_url(redis_proc.extra["url"])
    try:
        redis_proc.stop()
        rids = [f"outage-{uuid.uuid4().hex[:6]}-{i}" for i in range(5)]
        await asyncio.gather(*(run(stub, gen_request(50, 2, request_id=r)) for r in rids))
        await wait_until(lambda: not recorder.redis_ok, what="the recorder to notice")
        assert recorder.pending >= 5 and recorder.dropped == 0
        redis_proc = local_stack.start_redis(port, log_dir)
        await wait_until(lambda: recorder.pending == 0, timeout_s=20, what="the flush")
        store = MetricsStore.from_url(redis_proc.extra["url"])
        assert all(store.get_outcome(r)["status"] == "ok" for r in rids)
        assert store.window_stats("default", 300).requests == 5
        assert recorder.dropped == 0
    finally:
        recorder.store = old_store
        redis_proc.stop()


async def test_frozen_worker_leaves_routing_and_comes_back(admission, stub, workers):
    service, _ = admission
    frozen = workers[0]
    os.killpg(frozen.popen.pid, signal.SIGSTOP)
    try:
        await wait_until(
            lambda: frozen.address not in {w.address for w in service.pool.routable()},
            timeout_s=10,
            what="the frozen worker to leave routing",
        )
        for _ in range(2):
            _, n, completion = await run(stub, gen_request(100, 2))
            assert n == 2 and completion.worker == workers[1].address
        prediction = await stub.Predict(gen_request(100))
        assert not {w.worker: w for w in prediction.workers}[frozen.address].routable
    finally:
        os.killpg(frozen.popen.pid, signal.SIGCONT)
    await wait_until(
        lambda: frozen.address in {w.address for w in service.pool.routable()},
        timeout_s=15,
        what="the worker to be back in routing once it answers",
    )


async def admitted(call) -> admission_pb2.GenerateResponse:
    """Reads a Generate stream up to its ADMITTED decision."""
    while True:
        msg = await call.read()
        assert msg is not grpc.aio.EOF and msg.HasField("decision"), msg
        if msg.decision.kind == admission_pb2.DECISION_KIND_ADMITTED:
            return msg


async def test_worker_killed_mid_run_is_routed_around(admission, stub, workers, redis_server):
    """Last in the module: it kills a worker."""
    service, _ = admission
    victim, survivor = workers
    # Fill the survivor's KV so that admission puts long prompts on the victim.
    occupier = Occupier(survivor.address)
    try:
        await wait_until(
            lambda: kv_full(service, survivor.address), timeout_s=120, what="survivor KV full"
        )
        rids = [f"kill-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
        # 1400 output tokens (the most max_model_len allows): still streaming at the kill.
        calls = [stub.Generate(gen_request(600, 1400, request_id=r)) for r in rids]
        # The ADMITTED decisions (the second may be QUEUED first: late binding holds it
        # until the victim can start it, i.e. once the first has started).
        first_events = [await admitted(c) for c in calls]
    finally:
        await occupier.close()
    assert [e.decision.worker for e in first_events] == [victim.address] * 2
    on_victim = list(zip(calls, rids, strict=True))

    async def tokens_flowing(call):
        msg = await call.read()
        return msg.HasField("tokens")

    for call, _ in on_victim:
        assert await tokens_flowing(call)
    os.killpg(victim.popen.pid, signal.SIGKILL)
    killed = time.monotonic()
    for call, _ in on_victim:
        seen, last = 0, None
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with asyncio.timeout(30):
                while True:
                    msg = await call.read()
                    assert msg is not grpc.aio.EOF, (
                        f"stream ended without an error, {seen} messages after the kill "
                        f"({time.monotonic() - killed:.2f} s), the last: {last}"
                    )
                    seen, last = seen + 1, msg
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert victim.address in err.value.details() and "failed after" in err.value.details()
    assert time.monotonic() - killed < 20
    await wait_until(
        lambda: victim.address not in {w.address for w in service.pool.routable()},
        what="the dead worker out of routing",
    )
    for _ in range(3):
        _, n, completion = await run(stub, gen_request(100, 2))
        assert n == 2 and completion.worker == survivor.address
    store = MetricsStore.from_url(redis_server.extra["url"])
    for _, rid in on_victim:
        await wait_until(lambda rid=rid: store.get_outcome(rid), what="the failed outcome")
        assert store.get_outcome(rid)["status"] == "error"
