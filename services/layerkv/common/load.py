"""Worker load snapshots: what the operator needs to "scale on the cause". Pure: no I/O.

The admission service polls every worker's ``GetLoad`` and writes one
:class:`WorkerLoadReport` per worker into the Redis store (``MetricsStore.put_worker_load``),
keyed by the worker *pool* (the name of the worker Deployment). The operator reads them
back (``MetricsStore.worker_loads``) and folds them into one :class:`PoolLoad` with
:func:`summarize_pool`.

Why the operator needs this besides the violation rate: with LayerKV a worker whose
device KV memory is full is not necessarily overloaded, because new prefills can start
with part of their layers' KV in host memory. A full KV cache plus offloaded requests
and no SLO violations means offload is absorbing the pressure: adding pods would be
waste. Only when the host side is exhausted too (or requests queue) is more capacity
the cure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerLoadReport:
    """One worker's load at one moment, as its ``GetLoad`` answered plus offload figures.

    The offload fields are zero when the worker runs without the LayerKV plug-in (or
    does not report them): "no offload known" reads the same as "no offload".
    """

    worker: str  # host:port
    reported_at: float  # unix time, seconds
    running: int = 0
    waiting: int = 0
    in_flight: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    # Requests that currently hold some of their layers' KV in host memory.
    offloaded_requests: int = 0
    # Host (CPU) KV blocks in use / available to the LayerKV offload.
    host_kv_blocks_used: int = 0
    host_kv_blocks_total: int = 0
    draining: bool = False

    def __post_init__(self) -> None:
        if not self.worker:
            raise ValueError("worker must be non-empty")
        for name in (
            "running",
            "waiting",
            "in_flight",
            "kv_blocks_total",
            "kv_blocks_free",
            "offloaded_requests",
            "host_kv_blocks_used",
            "host_kv_blocks_total",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.kv_blocks_free > self.kv_blocks_total:
            raise ValueError("kv_blocks_free must be <= kv_blocks_total")
        if self.host_kv_blocks_used > self.host_kv_blocks_total:
            raise ValueError("host_kv_blocks_used must be <= host_kv_blocks_total")


@dataclass(frozen=True)
class PoolLoad:
    """The fresh, non-draining reports of one worker pool, folded together."""

    workers: int = 0
    running: int = 0
    waiting: int = 0
    in_flight: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    offloaded_requests: int = 0
    host_kv_blocks_used: int = 0
    host_kv_blocks_total: int = 0
    newest_at: float | None = None

    @property
    def kv_utilization(self) -> float | None:
        """Fraction of device KV blocks in use across the pool; None if unknown."""
        if self.kv_blocks_total <= 0:
            return None
        return 1.0 - self.kv_blocks_free / self.kv_blocks_total

    @property
    def host_kv_utilization(self) -> float | None:
        """Fraction of host KV blocks (LayerKV offload space) in use; None if none."""
        if self.host_kv_blocks_total <= 0:
            return None
        return self.host_kv_blocks_used / self.host_kv_blocks_total


def summarize_pool(
    reports: Iterable[WorkerLoadReport], *, now: float, stale_after_s: float
) -> PoolLoad:
    """Fold the reports younger than ``stale_after_s`` from non-draining workers.

    Draining workers are leaving: their load says nothing about the capacity that stays.
    """
    fresh = [r for r in reports if not r.draining and now - r.reported_at <= stale_after_s]
    if not fresh:
        return PoolLoad()
    return PoolLoad(
        workers=len(fresh),
        running=sum(r.running for r in fresh),
        waiting=sum(r.waiting for r in fresh),
        in_flight=sum(r.in_flight for r in fresh),
        kv_blocks_total=sum(r.kv_blocks_total for r in fresh),
        kv_blocks_free=sum(r.kv_blocks_free for r in fresh),
        offloaded_requests=sum(r.offloaded_requests for r in fresh),
        host_kv_blocks_used=sum(r.host_kv_blocks_used for r in fresh),
        host_kv_blocks_total=sum(r.host_kv_blocks_total for r in fresh),
        newest_at=max(r.reported_at for r in fresh),
    )
