"""One real vLLM engine for the whole test run, served by the real worker service, with
the real admission service in front of it, both on loopback gRPC in this process's
event loop (so tests can also call the engine directly, bypassing gRPC)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio

from layerkv.admission.app import AdmissionSettings, build_service
from layerkv.admission.app import start_server as start_admission_server
from layerkv.admission.server import AdmissionService
from layerkv.common.serving import RunningServer
from layerkv.v1 import admission_pb2_grpc, worker_pb2_grpc
from layerkv.worker.engine import EngineSettings
from layerkv.worker.server import WorkerService, start_engine
from layerkv.worker.server import start_server as start_worker_server

# float32 keeps greedy decoding deterministic across batch shapes on CPU.
ENGINE_SETTINGS = dict(dtype="float32", kv_cache_gib=0.25, max_num_seqs=16, max_model_len=2048)


@dataclass
class WorkerHandle:
    service: WorkerService
    running: RunningServer

    @property
    def engine(self):
        return self.service.engine

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"


@dataclass
class AdmissionHandle:
    service: AdmissionService
    running: RunningServer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def worker(model_dir):
    settings = EngineSettings(model=str(model_dir), **ENGINE_SETTINGS)
    service = WorkerService(settings)
    running = await start_worker_server(service, "127.0.0.1", 0)
    engine, stats = await asyncio.to_thread(start_engine, settings)
    service.attach(engine, stats)
    await running.set_serving(True)
    yield WorkerHandle(service, running)
    await running.server.stop(1)
    engine.shutdown()


async def start_admission(workers: list[str], redis_url: str) -> AdmissionHandle:
    service = build_service(AdmissionSettings(workers=tuple(workers), redis_url=redis_url))
    service.recorder.start()
    service.start()  # worker polling, as serve() does
    running = await start_admission_server(service, "127.0.0.1", 0)
    await running.set_serving(True)
    return AdmissionHandle(service, running)


async def stop_admission(handle: AdmissionHandle) -> None:
    await handle.running.server.stop(1)
    await handle.service.recorder.close(timeout_s=1)
    await handle.service.pool.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def admission(worker, redis_server):
    handle = await start_admission([worker.address], redis_server.extra["url"])
    yield handle
    await stop_admission(handle)


@pytest_asyncio.fixture(loop_scope="session")
async def admission_stub(admission):
    async with grpc.aio.insecure_channel(admission.address) as channel:
        yield admission_pb2_grpc.AdmissionStub(channel)


@pytest_asyncio.fixture(loop_scope="session")
async def worker_stub(worker):
    async with grpc.aio.insecure_channel(worker.address) as channel:
        yield worker_pb2_grpc.WorkerStub(channel)


async def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition"):
    """Poll ``predicate`` (sync or async) until true; fail the test after the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)
