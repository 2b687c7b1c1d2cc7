"""The workers the admission service routes to: discovery, polling, health.

* Discovery: a fixed list of ``host:port``, and/or ``dns:NAME:PORT`` entries resolved
  periodically (a Kubernetes headless Service's DNS name returns one A record per
  ready pod), so pods that come and go are picked up.
* State: each worker's ``GetLoad`` is polled every ``poll_interval_s``; after each
  answer the pool's subscribers are told (:meth:`WorkerPool.subscribe`). A worker
  whose last answer is older than ``stale_after_s``, that does not answer, that
  drains, or whose call just failed (``cooldown_s``) is out of routing; it is back as
  soon as it answers again.
* One worker's state, and the snapshot merged from it and what this service did
  since, is ``worker_state.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable

import grpc

from layerkv.admission import metrics
from layerkv.admission.worker_state import WorkerEndpoint
from layerkv.common.serving import KEEPALIVE_CLIENT_OPTIONS
from layerkv.policy.latency import LatencyCoefficients
from layerkv.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


def resolve(spec: str) -> list[str]:
    """``host:port`` as is; ``dns:NAME:PORT`` -> one ``ip:port`` per address record."""
    if not spec.startswith("dns:"):
        return [spec]
    name, _, port = spec.removeprefix("dns:").lstrip("/").rpartition(":")
    try:
        infos = socket.getaddrinfo(name, int(port), proto=socket.IPPROTO_TCP)
    except (socket.gaierror, ValueError) as e:
        log.warning("cannot resolve %s: %s", spec, e)
        return []
    out = []
    for family, *_, sockaddr in infos:
        host = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
        out.append(f"{host}:{sockaddr[1]}")
    return sorted(set(out))


class WorkerPool:
    def __init__(
        self,
        addresses: list[str],
        *,
        cooldown_s: float = 2.0,
        poll_interval_s: float = 0.1,
        poll_timeout_s: float = 2.0,
        stale_after_s: float = 3.0,
        discover_interval_s: float = 5.0,
        prior: LatencyCoefficients | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one worker address is needed")
        self.specs = list(addresses)
        self.cooldown_s = cooldown_s
        self.poll_interval_s = poll_interval_s
        self.poll_timeout_s = poll_timeout_s
        self.stale_after_s = stale_after_s
        self.discover_interval_s = discover_interval_s
        self.prior = prior or LatencyCoefficients()
        self.workers: list[WorkerEndpoint] = []
        self._by_address: dict[str, WorkerEndpoint] = {}
        self._discover()
        self._next = itertools.count()
        self._task: asyncio.Task | None = None
        # Called, in order, after every poll answer (or failure): fresh worker state.
        self._subscribers: list[Callable[[], None]] = []

    def _discover(self) -> None:
        wanted: list[str] = []
        for spec in self.specs:
            for address in resolve(spec):
                if address not in wanted:
                    wanted.append(address)
        for address in wanted:
            if address not in self._by_address:
                ep = self._connect(address)
                self._by_address[address] = ep
                self.workers.append(ep)
                log.info("worker %s added", address)
        gone = [w for w in self.workers if w.address not in wanted]
        for w in gone:
            if w.local:
                continue  # keep until its in-flight requests end
            self.workers.remove(w)
            del self._by_address[w.address]
            metrics.WORKER_STATE_AGE.remove(w.address)
            metrics.WORKER_ROUTABLE.remove(w.address)
            asyncio.get_event_loop().create_task(w.channel.close())
            log.info("worker %s removed", w.address)

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Have ``callback()`` called right after each poll updates a worker's state
        (synchronously: what it decides on is as fresh as it gets)."""
        self._subscribers.append(callback)

    @staticmethod
    def _connect(address: str) -> WorkerEndpoint:
        channel = grpc.aio.insecure_channel(address, options=KEEPALIVE_CLIENT_OPTIONS)
        return WorkerEndpoint(address, channel, worker_pb2_grpc.WorkerStub(channel))

    # -- routing views ------------------------------------------------------------------

    def routable(self, now: float | None = None) -> list[WorkerEndpoint]:
        now = time.monotonic() if now is None else now
        return [w for w in self.workers if w.routable(now, self.stale_after_s)]

    def candidates(self) -> list[WorkerEndpoint]:
        """Workers to try when no state is known, in order: healthy ones round-robin,
        then the ones cooling down (better a retry than a refusal)."""
        now = time.monotonic()
        if not self.workers:
            return []
        start = next(self._next) % len(self.workers)
        ring = self.workers[start:] + self.workers[:start]
        return [w for w in ring if w.healthy(now)] + [w for w in ring if not w.healthy(now)]

    def mark_failed(self, worker: WorkerEndpoint) -> None:
        worker.consecutive_failures += 1
        worker.unhealthy_until = time.monotonic() + self.cooldown_s

    def mark_ok(self, worker: WorkerEndpoint) -> None:
        worker.consecutive_failures = 0
        worker.unhealthy_until = 0.0

    # -- polling ------------------------------------------------------------------------

    async def poll_once(self) -> None:
        """Poll every worker once (concurrently)."""
        await asyncio.gather(*(self._poll(w) for w in list(self.workers)))

    def _publish_metrics(self, w: WorkerEndpoint) -> None:
        now = time.monotonic()
        age = w.state_age(now)
        metrics.WORKER_STATE_AGE.labels(w.address).set(-1 if age is None else age)
        metrics.WORKER_ROUTABLE.labels(w.address).set(int(w.routable(now, self.stale_after_s)))

    async def _poll(self, w: WorkerEndpoint) -> None:
        try:
            load = await w.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=self.poll_timeout_s)
        except grpc.aio.AioRpcError as e:
            if w.reachable:
                log.warning("worker %s out of routing: %s", w.address, e.code().name)
            w.reachable = False
        else:
            if not w.reachable:
                log.info("worker %s answers: in routing", w.address)
            w.load, w.load_at, w.reachable = load, time.monotonic(), True
        self._publish_metrics(w)
        for callback in self._subscribers:
            callback()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="worker-discovery")

    async def _poll_forever(self, w: WorkerEndpoint) -> None:
        # One loop per worker: a slow or frozen worker does not delay the others' state.
        while True:
            try:
                await self._poll(w)
            except Exception:  # the poller must outlive any one bad answer
                log.exception("polling %s failed", w.address)
            await asyncio.sleep(self.poll_interval_s)

    async def _run(self) -> None:
        pollers: dict[str, asyncio.Task] = {}
        try:
            while True:
                if any(s.startswith("dns:") for s in self.specs):
                    self._discover()
                for w in self.workers:
                    if w.address not in pollers:
                        pollers[w.address] = asyncio.create_task(self._poll_forever(w))
                for address in [a for a in pollers if a not in self._by_address]:
                    pollers.pop(address).cancel()
                await asyncio.sleep(self.discover_interval_s)
        finally:
            for task in pollers.values():
                task.cancel()
            await asyncio.gather(*pollers.values(), return_exceptions=True)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for w in self.workers:
            await w.channel.close()
