"""The admission queue: requests no worker can serve within their SLO yet. Pure.

Shaped like vLLM's ``v1/core/sched/request_queue.py``: one small interface
(:class:`AdmissionQueue`), two policies (earliest deadline first, and FIFO for the
baseline), a factory (:func:`create_queue`). The queue is bounded: a push into a full
queue raises :class:`QueueFull` (the caller answers RESOURCE_EXHAUSTED), so a request is
never silently dropped once queued.

EDF order key: ``(late, deadline - priority * ttft_target, arrival sequence)``.

* ``deadline`` is the request's TTFT deadline (arrival + its class's TTFT target,
  or the client's own gRPC deadline if sooner).
* A priority level within a class counts as one TTFT target of earlier deadline, so
  within a class a higher priority goes first; across classes, urgency still rules.
* ``late`` requests (that can no longer meet their deadline on any worker) go behind
  every request that still can: serving a lost cause first would make the next ones
  miss too (the EDF domino effect under overload).
"""

from __future__ import annotations

import bisect
import enum
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The admission queue is at capacity."""


@dataclass(eq=False)
class QueuedRequest:
    request_id: str
    slo_class: str
    arrival: float  # monotonic seconds
    deadline: float  # monotonic seconds: when its first token is due
    ttft_target_s: float
    priority: int = 0
    prompt_tokens: int = 0
    max_tokens: int = 1
    client_deadline: float | None = None  # monotonic; None = the client set none
    tpot_target_s: float | None = None  # once it decodes (the dispatch TPOT guard)
    late: bool = False
    payload: object = field(default=None, repr=False)  # what the adapter needs back
    seq: int = -1  # set by the queue

    @property
    def order_deadline(self) -> float:
        return self.deadline - self.priority * self.ttft_target_s


class QueuePolicy(enum.Enum):
    EDF = "edf"
    FIFO = "fifo"


class AdmissionQueue(ABC):
    """A bounded queue of :class:`QueuedRequest`; iteration is in service order."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._seq = itertools.count()
        self._keys: list[tuple] = []  # sorted
        self._items: dict[tuple, QueuedRequest] = {}
        self._ids: dict[str, tuple] = {}

    @abstractmethod
    def _key(self, item: QueuedRequest) -> tuple:
        """Service order: smaller first; must end with the unique ``seq``."""

    def push(self, item: QueuedRequest) -> None:
        if len(self._keys) >= self.capacity:
            raise QueueFull(f"admission queue full ({self.capacity})")
        if item.request_id in self._ids:
            raise ValueError(f"request {item.request_id!r} is already queued")
        item.seq = next(self._seq)
        self._insert(item)

    def _insert(self, item: QueuedRequest) -> None:
        key = self._key(item)
        bisect.insort(self._keys, key)
        self._items[key] = item
        self._ids[item.request_id] = key

    def peek(self) -> QueuedRequest:
        if not self._keys:
            raise IndexError("peek from an empty admission queue")
        return self._items[self._keys[0]]

    def pop(self) -> QueuedRequest:
        item = self.peek()
        self.remove(item)
        return item

    def remove(self, item: QueuedRequest) -> bool:
        """Take ``item`` out; False if it was not queued (already dispatched)."""
        key = self._ids.get(item.request_id)
        if key is None or self._items.get(key) is not item:
            return False
        i = bisect.bisect_left(self._keys, key)
        del self._keys[i]
        del self._items[key]
        del self._ids[item.request_id]
        return True

    def mark_late(self, item: QueuedRequest) -> None:
        """Move ``item`` behind the requests that can still meet their deadline."""
        if item.late or not self.remove(item):
            return
        item.late = True
        self._insert(item)  # keeps its seq: among late ones, the original order

    def position(self, item: QueuedRequest) -> int:
        """1-based position in service order; 0 if not queued."""
        key = self._ids.get(item.request_id)
        return 0 if key is None else bisect.bisect_left(self._keys, key) + 1

    def __contains__(self, item: QueuedRequest) -> bool:
        key = self._ids.get(item.request_id)
        return key is not None and self._items[key] is item

    def __len__(self) -> int:
        return len(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __iter__(self) -> Iterator[QueuedRequest]:
        return iter([self._items[k] for k in self._keys])


class EdfQueue(AdmissionQueue):
    """Earliest (priority-adjusted) deadline first; late requests last."""

    def _key(self, item: QueuedRequest) -> tuple:
        return (item.late, item.order_deadline, item.seq)


class FifoQueue(AdmissionQueue):
    """Arrival order (the baseline)."""

    def _key(self, item: QueuedRequest) -> tuple:
        return (item.seq,)


def create_queue(policy: QueuePolicy | str, capacity: int) -> AdmissionQueue:
    policy = QueuePolicy(policy)
    if policy is QueuePolicy.EDF:
        return EdfQueue(capacity)
    if policy is QueuePolicy.FIFO:
        return FifoQueue(capacity)
    raise ValueError(f"unknown queue policy {policy}")
