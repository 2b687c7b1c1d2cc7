"""Writes request outcomes to Redis off the request path.

Requests never wait for Redis and never fail because of it: outcomes go into a bounded
in-memory buffer that a background task drains. While Redis is down the buffer keeps
the newest ``capacity`` outcomes (the oldest are dropped and counted) and is flushed,
in order, when Redis answers again."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque

import redis

from layerkv.admission import metrics
from layerkv.common.slo import RequestOutcome, SloTarget
from layerkv.common.store import MetricsStore

log = logging.getLogger(__name__)


class OutcomeRecorder:
    def __init__(
        self,
        store: MetricsStore | None,
        *,
        capacity: int = 10_000,
        batch_size: int = 256,
        flush_interval_s: float = 0.1,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
    ) -> None:
        self.store = store
        self.capacity = capacity
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._buffer: deque[tuple[RequestOutcome, SloTarget | None]] = deque()
        self._wakeup = asyncio.Event()
        self._empty = asyncio.Event()  # set whenever the buffer is empty
        self._empty.set()
        self._batch_full = asyncio.Event()  # set: batch_size waiting, or closing
        self._closing = False
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._task: asyncio.Task | None = None
        self.dropped = 0
        self.written = 0
        self.redis_ok = True

    def submit(self, outcome: RequestOutcome, target: SloTarget | None) -> None:
        """Queue one outcome; never blocks, never raises."""
        if self.store is None:
            return
        if len(self._buffer) >= self.capacity:
            self._buffer.popleft()
            self.dropped += 1
            metrics.OUTCOMES_DROPPED.inc()
        self._buffer.append((outcome, target))
        self._empty.clear()
        metrics.OUTCOMES_BUFFERED.set(len(self._buffer))
        self._wakeup.set()
        if len(self._buffer) >= self.batch_size:
            self._batch_full.set()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def start(self) -> None:
        if self.store is not None and self._task is None:
            self._task = asyncio.create_task(self._run(), name="outcome-recorder")

    async def close(self, timeout_s: float = 5.0) -> None:
        """Flush what can be flushed within ``timeout_s`` (used when draining)."""
        if self._task is None:
            return
        self._closing = True  # write what is left at once
        self._batch_full.set()
        if self._buffer:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), timeout_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._buffer:
            log.warning("exiting with %d outcomes not written to Redis", len(self._buffer))

    async def _run(self) -> None:
        delay = self._retry_initial_s
        while True:
            if not self._buffer:
                self._empty.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            lingering = self.flush_interval_s > 0 and not self._closing
            if lingering and len(self._buffer) < self.batch_size:
                self._batch_full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._batch_full.wait(), self.flush_interval_s)
            batch = list(itertools.islice(self._buffer, self.batch_size))
            try:
                refused = await asyncio.to_thread(self.store.record_outcomes, batch)
            except redis.RedisError as e:
                metrics.OUTCOME_WRITE_ERRORS.inc()
                if self.redis_ok:
                    log.warning("Redis unreachable, buffering outcomes: %s", e)
                self.redis_ok = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
            if not self.redis_ok:
                log.info("Redis is back; flushing %d buffered outcomes", len(self._buffer))
            self.redis_ok = True
            delay = self._retry_initial_s
            # Only now is it safe to drop them: a failed write keeps them at the head
            # (those the buffer dropped meanwhile, when full, are gone already).
            written = {id(item) for item in batch}
            while self._buffer and id(self._buffer[0]) in written:
                self._buffer.popleft()
            if refused:  # bad data, not an outage: retrying would count the rest twice
                self.dropped += refused
                metrics.OUTCOMES_DROPPED.inc(refused)
            self.written += len(batch) - refused
            metrics.OUTCOMES_WRITTEN.inc(len(batch) - refused)
            metrics.OUTCOMES_BUFFERED.set(len(self._buffer))
