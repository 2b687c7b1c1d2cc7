"""A worker as its own process (as in a pod): killed mid-stream, and drained by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest

from layerkv.common.store import MetricsStore
from layerkv.tools import local_stack
from layerkv.v1 import admission_pb2_grpc, worker_pb2, worker_pb2_grpc

from .conftest import start_admission, stop_admission, wait_until
from .test_serving import request

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def worker_process(model_dir, log_dir):
    proc = local_stack.start_worker(
        local_stack.free_port(),
        model=str(model_dir),
        log_dir=log_dir,
        extra_args=["--dtype", "float32", "--kv-cache-gib", "0.1", "--drain-timeout", "60"],
    )
    local_stack.wait_serving(proc, timeout_s=240)
    yield proc
    proc.kill()


async def test_worker_killed_mid_stream_ends_the_client_stream_promptly(
    worker_process, redis_server
):
    handle = await start_admission([worker_process.address], redis_server.extra["url"])
    try:
        async with grpc.aio.insecure_channel(handle.address) as channel:
            stub = admission_pb2_grpc.AdmissionStub(channel)
            call = stub.Generate(request("Once upon a time", 1800, request_id="killed-1"))
            tokens = 0
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async with asyncio.timeout(60):
                    async for resp in call:
                        tokens += len(resp.tokens.token_ids)
                        if tokens >= 3 and worker_process.alive():
                            # The worker and its engine process, as a lost pod would.
                            os.killpg(worker_process.popen.pid, signal.SIGKILL)
                            killed_at = asyncio.get_running_loop().time()
            ended_after = asyncio.get_running_loop().time() - killed_at
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed after" in err.value.details()
        assert ended_after < 10, f"stream hung {ended_after:.1f} s after the worker died"
        store = MetricsStore.from_url(redis_server.extra["url"])
        await wait_until(lambda: store.get_outcome("killed-1"), what="the failed outcome")
        assert store.get_outcome("killed-1")["status"] == "error"
    finally:
        await stop_admission(handle)


async def test_sigterm_drains_running_requests_then_exits(worker_process):
    async with grpc.aio.insecure_channel(worker_process.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        req = worker_pb2.WorkerGenerateRequest(
            prompt="Once upon a time", sampling=request("x", 300).sampling
        )
        call = stub.Generate(req)
        received = 0
        async for resp in call:
            if resp.HasField("tokens"):
                received += len(resp.tokens.token_ids)
                if received == 1:
                    worker_process.popen.send_signal(signal.SIGTERM)
            else:
                completion = resp.completion
        # The request that was running when SIGTERM came finished in full.
        assert received == 300 and completion.usage.completion_tokens == 300
        # New calls are refused while it drains or once it is gone.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(req):
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    code = await asyncio.to_thread(worker_process.popen.wait, 60)
    assert code == 0, worker_process.log_tail()
