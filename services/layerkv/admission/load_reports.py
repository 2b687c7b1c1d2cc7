"""Publishes the workers' load to Redis for the operator.

The operator scales on the cause: it must see whether LayerKV offload is absorbing KV
pressure, which only the workers' load reports show. The admission service polls them
anyway (for routing), so it writes the newest one of each worker into the store every
``interval_s`` (``MetricsStore.put_worker_load``), keyed by the worker pool (the worker
Deployment's name). Reports expire, so workers that are gone drop out by themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis

from layerkv.admission.workers import WorkerPool
from layerkv.common.load import WorkerLoadReport
from layerkv.common.store import MetricsStore

log = logging.getLogger(__name__)


def load_report(address: str, load, reported_at: float) -> WorkerLoadReport:
    """A store record from a worker's ``WorkerLoad`` answer."""
    host_total = load.host_kv_blocks_total
    return WorkerLoadReport(
        worker=address,
        reported_at=reported_at,
        running=load.running,
        waiting=load.waiting,
        in_flight=load.in_flight,
        kv_blocks_total=load.kv_blocks_total,
        kv_blocks_free=min(load.kv_blocks_free, load.kv_blocks_total),
        offloaded_requests=load.offloaded_requests,
        host_kv_blocks_used=max(host_total - load.host_kv_blocks_free, 0),
        host_kv_blocks_total=host_total,
        draining=load.draining,
    )


class LoadPublisher:
    def __init__(
        self, pool: WorkerPool, store: MetricsStore, pool_name: str, *, interval_s: float = 2.0
    ) -> None:
        self.pool = pool
        self.store = store
        self.pool_name = pool_name
        self.interval_s = interval_s
        # Reports outlive a few missed rounds, not a worker that is gone.
        self.ttl_s = max(1, round(5 * interval_s))
        self.published = 0

    def reports(self, now_monotonic: float, now_unix: float) -> list[WorkerLoadReport]:
        """One report per worker whose state is fresh (what routing would trust)."""
        out = []
        for w in self.pool.workers:
            if w.load is None or not w.routable(now_monotonic, self.pool.stale_after_s):
                continue
            age = now_monotonic - w.load_at
            out.append(load_report(w.address, w.load, now_unix - age))
        return out

    async def publish_once(self) -> int:
        reports = self.reports(time.monotonic(), time.time())

        def write() -> None:
            for report in reports:
                self.store.put_worker_load(self.pool_name, report, ttl_s=self.ttl_s)

        await asyncio.to_thread(write)
        self.published += len(reports)
        return len(reports)

    async def run_forever(self) -> None:
        failing = False
        while True:
            try:
                await self.publish_once()
                failing = False
            except redis.RedisError as e:
                if not failing:
                    log.warning("cannot publish worker load to Redis: %s", e)
                failing = True
            await asyncio.sleep(self.interval_s)
