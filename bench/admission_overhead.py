"""Per-request overhead of the admission service: the same requests sent to the worker
directly, through admission and through a bare gRPC relay (``grpc_relay.py``, the
cost of the extra hop alone), interleaved, in one run.

    python bench/admission_overhead.py --requests 300

Starts Redis, one worker and the admission service as real processes on loopback, sends
sequential small greedy requests (so queueing does not blur the difference), the paths
in a shuffled order each round, and reports p50/p99 of client-side time-to-first-token
and total latency per path and the latency added by admission and by the bare relay.
Writes bench/results/admission_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import grpc
import grpc_relay

from layerkv.tools import local_stack
from layerkv.v1 import admission_pb2, admission_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def timed(start_call) -> tuple[float, float]:
    """(time to first token, total) of one call, timed from before it is started."""
    start = time.perf_counter()
    first = None
    for resp in start_call():
        if first is None and resp.HasField("tokens"):
            first = time.perf_counter()
    end = time.perf_counter()
    return first - start, end - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300, help="per path")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--model", default="models/tiny-llama")
    ap.add_argument("--out", type=Path, default=Path("bench/results/admission_overhead.json"))
    args = ap.parse_args(argv)

    log_dir = Path(".run/bench")
    procs = []
    relay = None
    try:
        redis = local_stack.start_redis(local_stack.free_port(), log_dir)
        procs.append(redis)
        worker = local_stack.start_worker(
            local_stack.free_port(), model=args.model, log_dir=log_dir,
            extra_args=["--dtype", "float32"],
        )  # fmt: skip
        procs.append(worker)
        local_stack.wait_serving(worker, timeout_s=300)
        # In this process's session, as the relay is (see admission_bench.py: a session
        # of its own is scheduled apart, which costs a process sharing a core).
        admission = local_stack.start_admission(
            local_stack.free_port(), workers=[worker.address], redis_url=redis.extra["url"],
            log_dir=log_dir, new_session=False,
        )  # fmt: skip
        procs.append(admission)
        local_stack.wait_serving(admission, timeout_s=60)
        relay_port = local_stack.free_port()
        relay = grpc_relay.start(worker.address, relay_port)

        sampling = common_pb2.SamplingParams(
            max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True
        )
        prompt = "Once upon a time there was a small model"
        with (
            grpc.insecure_channel(worker.address) as wch,
            grpc.insecure_channel(admission.address) as ach,
            grpc.insecure_channel(f"127.0.0.1:{relay_port}") as rch,
        ):
            direct = worker_pb2_grpc.WorkerStub(wch)
            via = admission_pb2_grpc.AdmissionStub(ach)
            bare = admission_pb2_grpc.AdmissionStub(rch)
            paths = {
                "direct": lambda: direct.Generate(
                    worker_pb2.WorkerGenerateRequest(prompt=prompt, sampling=sampling)
                ),
                "admission": lambda: via.Generate(
                    admission_pb2.GenerateRequest(prompt=prompt, sampling=sampling)
                ),
                "relay": lambda: bare.Generate(
                    admission_pb2.GenerateRequest(prompt=prompt, sampling=sampling)
                ),
            }
            for call in paths.values():  # warm-up: connections, first-request paths
                for _ in range(10):
                    timed(call)
            samples = {name: {"ttft": [], "total": []} for name in paths}
            rng = random.Random(3)
            for _ in range(args.requests):
                order = list(paths)
                rng.shuffle(order)  # none always follows another
                for name in order:
                    ttft, total = timed(paths[name])
                    samples[name]["ttft"].append(ttft)
                    samples[name]["total"].append(total)
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(timeout=10)
        for proc in reversed(procs):
            proc.stop()

    result: dict = {"requests_per_path": args.requests, "max_tokens": args.max_tokens}
    for name, s in samples.items():
        for kind, values in s.items():
            result[f"{name}_{kind}_p50_ms"] = pct(values, 50) * 1000
            result[f"{name}_{kind}_p99_ms"] = pct(values, 99) * 1000
            result[f"{name}_{kind}_mean_ms"] = statistics.fmean(values) * 1000
    for kind in ("ttft", "total"):
        for q in ("p50", "p99"):
            for path, prefix in (("admission", "added"), ("relay", "relay_added")):
                result[f"{prefix}_{kind}_{q}_ms"] = (
                    result[f"{path}_{kind}_{q}_ms"] - result[f"direct_{kind}_{q}_ms"]
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'path':<10} {'ttft p50':>9} {'ttft p99':>9} {'total p50':>10} {'total p99':>10}  (ms)")
    for name in ("direct", "admission", "relay"):
        print(
            f"{name:<10} {result[f'{name}_ttft_p50_ms']:9.2f} {result[f'{name}_ttft_p99_ms']:9.2f}"
            f" {result[f'{name}_total_p50_ms']:10.2f} {result[f'{name}_total_p99_ms']:10.2f}"
        )
    print(
        f"added by admission: ttft p50 {result['added_ttft_p50_ms']:.2f} ms, "
        f"p99 {result['added_ttft_p99_ms']:.2f} ms; total p50 {result['added_total_p50_ms']:.2f}"
        f" ms, p99 {result['added_total_p99_ms']:.2f} ms"
    )
    print(
        f"added by a bare gRPC relay: ttft p50 {result['relay_added_ttft_p50_ms']:.2f} ms, "
        f"p99 {result['relay_added_ttft_p99_ms']:.2f} ms"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
