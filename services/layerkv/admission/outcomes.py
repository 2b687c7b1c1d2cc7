"""Writes request outcomes to Redis off the request path.

Requests never wait for Redis and never fail because of it: outcomes go into a bounded
in-memory buffer that a background task drains. While Redis is down the buffer keeps
the newest ``capacity`` outcomes (the oldest are dropped and counted) and is flushed,
in order, when Redis answers again."""

from __future__ import annotations

import asyncio
import contextlib
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
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
    ) -> None:
        self.store = store
        self.capacity = capacity
        self._buffer: deque[tuple[RequestOutcome, SloTarget | None]] = deque()
        self._wakeup = asyncio.Event()
        self._empty = asyncio.Event()  # set whenever the buffer is empty
        self._empty.set()
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
            outcome, target = self._buffer[0]
            try:
                await asyncio.to_thread(self.store.record_outcome, outcome, target)
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
            # Only now is it safe to drop it: a failed write keeps it at the head.
            if self._buffer and self._buffer[0][0] is outcome:
                self._buffer.popleft()
            self.written += 1
            metrics.OUTCOMES_WRITTEN.inc()
            metrics.OUTCOMES_BUFFERED.set(len(self._buffer))
