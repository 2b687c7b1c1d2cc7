"""The workers the admission service can send requests to, and their health as seen
from here. A worker whose call fails before it streamed anything is skipped for
``cooldown_s``; one that answers is used again at once."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import grpc

from layerkv.common.serving import KEEPALIVE_CLIENT_OPTIONS
from layerkv.v1 import worker_pb2_grpc


@dataclass
class WorkerEndpoint:
    address: str
    channel: grpc.aio.Channel = field(repr=False)
    stub: worker_pb2_grpc.WorkerStub = field(repr=False)
    unhealthy_until: float = 0.0  # time.monotonic()
    consecutive_failures: int = 0

    def healthy(self, now: float) -> bool:
        return now >= self.unhealthy_until


class WorkerPool:
    def __init__(self, addresses: list[str], *, cooldown_s: float = 2.0) -> None:
        if not addresses:
            raise ValueError("at least one worker address is needed")
        self.cooldown_s = cooldown_s
        self.workers = [self._connect(a) for a in addresses]
        self._next = itertools.count()

    @staticmethod
    def _connect(address: str) -> WorkerEndpoint:
        channel = grpc.aio.insecure_channel(address, options=KEEPALIVE_CLIENT_OPTIONS)
        return WorkerEndpoint(address, channel, worker_pb2_grpc.WorkerStub(channel))

    def candidates(self) -> list[WorkerEndpoint]:
        """Workers to try for one request, in order: healthy ones round-robin, then
        the ones cooling down (better a retry than a refusal)."""
        now = time.monotonic()
        start = next(self._next) % len(self.workers)
        ring = self.workers[start:] + self.workers[:start]
        return [w for w in ring if w.healthy(now)] + [w for w in ring if not w.healthy(now)]

    def mark_failed(self, worker: WorkerEndpoint) -> None:
        worker.consecutive_failures += 1
        worker.unhealthy_until = time.monotonic() + self.cooldown_s

    def mark_ok(self, worker: WorkerEndpoint) -> None:
        worker.consecutive_failures = 0
        worker.unhealthy_until = 0.0

    async def close(self) -> None:
        for w in self.workers:
            await w.channel.close()
