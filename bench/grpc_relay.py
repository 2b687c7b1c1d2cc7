"""A bare gRPC relay: ``layerkv.v1.Admission/Generate`` passed to one worker and its
stream passed back, with nothing else (no prediction, queue, decision message,
metrics or Redis). A reference for the benchmarks, not a service: the latency it adds
is what any extra Python grpc.aio hop costs on this machine, so the admission
service's added latency can be split into that floor and its own work.

    python bench/grpc_relay.py --port 50070 --worker 127.0.0.1:50061

Prints ``serving`` once it listens; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import uuid

import grpc

from layerkv.v1 import admission_pb2, admission_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc


class Relay(admission_pb2_grpc.AdmissionServicer):
    def __init__(self, worker: str) -> None:
        self.stub = worker_pb2_grpc.WorkerStub(grpc.aio.insecure_channel(worker))

    async def Generate(self, request, context):
        # The worker request the admission service would send (id, targets, class), so
        # the worker does the same work on both paths.
        call = self.stub.Generate(
            worker_pb2.WorkerGenerateRequest(
                request_id=request.request_id or uuid.uuid4().hex,
                prompt=request.prompt,
                prompt_token_ids=request.prompt_token_ids,
                sampling=request.sampling,
                slo=common_pb2.SloTargets(ttft_s=2.0, tpot_s=0.1),
                slo_class=request.slo_class or "default",
            ),
            timeout=context.time_remaining(),
        )
        async for response in call:
            if response.HasField("tokens"):
                yield admission_pb2.GenerateResponse(
                    request_id=request.request_id, tokens=response.tokens
                )
            elif response.HasField("completion"):
                yield admission_pb2.GenerateResponse(
                    request_id=request.request_id, completion=response.completion
                )


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--worker", required=True, help="host:port of the worker")
    args = ap.parse_args()
    asyncio.run(serve(args.port, args.worker))


def start(worker: str, port: int) -> subprocess.Popen:
    """Run a relay to ``worker`` on ``port`` as a child process; returns once it
    listens (raises RuntimeError with its output if it exits first)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--port", str(port), "--worker", worker],
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
