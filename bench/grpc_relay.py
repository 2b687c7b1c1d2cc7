"""A bare gRPC relay: ``layerkv.v1.Admission/Generate`` passed to one worker and its
stream passed back, with nothing else (no prediction, queue, decision message,
metrics or Redis). A reference for the benchmarks, not a service: the latency it adds
is what any extra Python gRPC hop costs on this machine, so the admission
service's added latency can be split into that floor and its own work.

    python bench/grpc_relay.py --port 50070 --worker 127.0.0.1:50061 [--api sync]

``--api aio`` (default) relays with grpc.aio, as the admission service does; ``--api
sync`` with grpc's thread-pool server and a blocking stub (fewer thread hand-offs per
message: the lower of the two is the floor of any Python gRPC hop here).

Prints ``serving`` once it listens; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import threading
import uuid
from concurrent import futures

import grpc

from layerkv.v1 import admission_pb2, admission_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc


def worker_request(request: admission_pb2.GenerateRequest) -> worker_pb2.WorkerGenerateRequest:
    # The worker request the admission service would send (id, targets, class), so
    # the worker does the same work on every path.
    return worker_pb2.WorkerGenerateRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt=request.prompt,
        prompt_token_ids=request.prompt_token_ids,
        sampling=request.sampling,
        slo=common_pb2.SloTargets(ttft_s=2.0, tpot_s=0.1),
        slo_class=request.slo_class or "default",
    )


def client_response(request_id: str, response: worker_pb2.WorkerGenerateResponse):
    if response.HasField("tokens"):
        return admission_pb2.GenerateResponse(request_id=request_id, tokens=response.tokens)
    if response.HasField("completion"):
        return admission_pb2.GenerateResponse(request_id=request_id, completion=response.completion)
    return None


class Relay(admission_pb2_grpc.AdmissionServicer):
    def __init__(self, worker: str) -> None:
        self.stub = worker_pb2_grpc.WorkerStub(grpc.aio.insecure_channel(worker))

    async def Generate(self, request, context):
        call = self.stub.Generate(worker_request(request), timeout=context.time_remaining())
        async for response in call:
            out = client_response(request.request_id, response)
            if out is not None:
                yield out


class SyncRelay(admission_pb2_grpc.AdmissionServicer):
    def __init__(self, worker: str) -> None:
        self.stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(worker))

    def Generate(self, request, context):
        # No timeout passed on: the benchmarks' calls carry no deadline.
        for response in self.stub.Generate(worker_request(request)):
            out = client_response(request.request_id, response)
            if out is not None:
                yield out


async def serve(port: int, worker: str) -> None:
    server = grpc.aio.server()
    admission_pb2_grpc.add_AdmissionServicer_to_server(Relay(worker), server)
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print("serving", flush=True)
    await stop.wait()
    await server.stop(1)


def serve_sync(port: int, worker: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    admission_pb2_grpc.add_AdmissionServicer_to_server(SyncRelay(worker), server)
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print("serving", flush=True)
    stop.wait()
    server.stop(1).wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--worker", required=True, help="host:port of the worker")
    ap.add_argument("--api", choices=("aio", "sync"), default="aio")
    args = ap.parse_args()
    if args.api == "sync":
        serve_sync(args.port, args.worker)
    else:
        asyncio.run(serve(args.port, args.worker))


def start(worker: str, port: int, api: str = "aio") -> subprocess.Popen:
    """Run a relay to ``worker`` on ``port`` as a child process; returns once it
    listens (raises RuntimeError with its output if it exits first)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--port", str(port), "--worker", worker, "--api", api],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first = proc.stdout.readline()
    if first.strip() != "serving":
        proc.kill()
        raise RuntimeError(f"grpc_relay did not start: {first}{proc.stdout.read()}")
    return proc


if __name__ == "__main__":
    main()
