"""``make run``: the whole stack on localhost, on embedded defaults.

Starts Redis, one worker with the default model and the admission service, waits until
each answers its health check, prints how to send a request, and runs until Ctrl-C or
SIGTERM, then stops them in reverse order (each drains)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from layerkv.tools import local_stack


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run_local", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/tiny-llama")
    p.add_argument("--admission-port", type=int, default=50051)
    p.add_argument("--worker-port", type=int, default=50061)
    p.add_argument("--redis-port", type=int, default=6379)
    p.add_argument("--log-dir", type=Path, default=Path(".run"))
    p.add_argument("--worker-arg", action="append", default=[], help="extra worker flag")
    args = p.parse_args(argv)
    if not Path(args.model).exists():
        print(f"error: no model at {args.model} (run `make model`)", file=sys.stderr)
        return 2

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    procs: list[local_stack.Proc] = []
    try:
        print(f"logs in {args.log_dir}/", flush=True)
        redis = local_stack.start_redis(args.redis_port, args.log_dir)
        procs.append(redis)
        print(f"redis      {redis.extra['url']}", flush=True)
        worker = local_stack.start_worker(
            args.worker_port,
            model=args.model,
            metrics_port=9091,
            log_dir=args.log_dir,
            extra_args=["--dtype", "float32", *args.worker_arg],
        )
        procs.append(worker)
        print(
            f"worker     {worker.address} loading {args.model} (about a minute on 2 cores)...",
            flush=True,
        )
        local_stack.wait_serving(worker)
        admission = local_stack.start_admission(
            args.admission_port,
            workers=[worker.address],
            redis_url=redis.extra["url"],
            metrics_port=9090,
            log_dir=args.log_dir,
        )
        procs.append(admission)
        local_stack.wait_serving(admission, timeout_s=30)
        print(f"admission  {admission.address}  (metrics :9090/metrics, worker :9091/metrics)")
        print("\nready. In another terminal:\n")
        client = f".venv/bin/layerkv-client --target localhost:{args.admission_port}"
        print(f'  {client} "Once upon a time"\n')
        print("Ctrl-C stops everything.", flush=True)
        while not stop.is_set():
            for proc in procs:
                if not proc.alive():
                    print(f"{proc.name} exited:\n{proc.log_tail()}", file=sys.stderr)
                    return 1
            stop.wait(1.0)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            proc.stop()
        print("stopped.")


if __name__ == "__main__":
    sys.exit(main())
