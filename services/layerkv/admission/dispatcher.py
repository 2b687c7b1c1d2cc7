"""The admission queue and the decisions made on it: which worker a request goes to,
now or later, or whether it is refused.

One decision path for a new request, :meth:`Dispatcher.decide_new`: ``Generate``
acts on it (:meth:`Dispatcher.route`), ``Predict`` reports it. Queued requests are
decided in dispatch passes (:meth:`Dispatcher.dispatch`), run on arrival, after every
worker poll answer (the dispatcher subscribes to the pool), and when a request gets
its first token or ends. The rules themselves are pure (``policy/routing.py``); this
module applies them to the live worker state and the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import time
from dataclasses import dataclass
from typing import TextIO

import grpc
from google.protobuf.json_format import MessageToDict

from layerkv.admission import metrics
from layerkv.admission.request_state import Abort, Rejected, Routed
from layerkv.admission.slo_classes import SloCatalog
from layerkv.admission.worker_state import WorkerEndpoint
from layerkv.admission.workers import WorkerPool
from layerkv.common.slo import SloTarget
from layerkv.policy.queue import QueuedRequest, QueueFull, create_queue
from layerkv.policy.routing import (
    Rejection,
    Verdict,
    best_prediction,
    deadline_for,
    queued_decision,
    retry_after_s,
    should_reject,
)
from layerkv.policy.tpot_guard import (
    NO_LIMIT,
    TpotRoom,
    tpot_room,
)
from layerkv.policy.ttft import TtftPrediction, WorkerSnapshot, predict_ttft
from layerkv.v1 import admission_pb2

# Queued requests examined per dispatch pass (bounds its cost under a deep queue).
_DISPATCH_SCAN = 32

NO_ROOM_NOW = (
    "no worker can start it now within its TTFT target and the running requests' TPOT targets"
)


@dataclass
class View:
    """The routable workers as one dispatch pass sees them: their snapshots and the
    TPOT room each has left (the guard), refreshed for a worker once a request is sent
    there. Built once per pass: on this path every microsecond is added latency."""

    now: float
    workers: list[WorkerEndpoint]
    snaps: dict[str, WorkerSnapshot]
    rooms: dict[str, TpotRoom]

    def predictions(self, prompt_tokens: int, max_tokens: int) -> list[TtftPrediction]:
        return [
            predict_ttft(self.snaps[w.address], prompt_tokens, max_tokens) for w in self.workers
        ]


class Action(enum.Enum):
    REJECT = "reject"
    DISPATCH = "dispatch"  # to ``chosen``'s worker, now, without queueing
    QUEUE = "queue"


@dataclass
class NewRequestDecision:
    """What happens to a new request now, and the predictions it was made from."""

    action: Action
    best: TtftPrediction | None  # the best prediction over all routable workers
    predictions: list[TtftPrediction]  # one per routable worker
    chosen: TtftPrediction | None = None  # DISPATCH: where it goes
    rejection: Rejection | None = None  # REJECT: why, and when to retry


def queued_request(
    request_id: str,
    target: SloTarget,
    prompt_tokens: int,
    max_tokens: int,
    priority: int,
    client_deadline: float | None,
    arrival: float,
) -> QueuedRequest:
    """A new request's queue entry: what ``Generate`` queues and ``Predict`` decides on."""
    return QueuedRequest(
        request_id=request_id,
        slo_class=target.name,
        arrival=arrival,
        deadline=deadline_for(arrival, target.ttft_s, client_deadline),
        ttft_target_s=target.ttft_s,
        priority=priority,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        client_deadline=client_deadline,
        tpot_target_s=target.tpot_s,
    )


def decision_message(
    kind, best: TtftPrediction | None, *, predicted_s: float | None = None, **kw
) -> admission_pb2.Decision:
    return admission_pb2.Decision(
        kind=kind,
        predicted_ttft_s=(best.ttft_s if best else 0.0) if predicted_s is None else predicted_s,
        worker=best.worker if best else "",
        **kw,
    )


class Dispatcher:
    """The admission queue and the routing decisions on it."""

    def __init__(
        self,
        pool: WorkerPool,
        catalog: SloCatalog,
        *,
        queue_capacity: int = 1024,
        queue_policy: str = "edf",
        max_hold_factor: float = 4.0,
        decision_log: TextIO | None = None,
        tpot_guard: bool = True,
    ) -> None:
        self.pool = pool
        self.catalog = catalog
        self.queue = create_queue(queue_policy, queue_capacity)
        # A request held for TPOT room goes after max_hold_factor x its TTFT target to
        # a worker with prefill room, or (a queue class, which must be served) to the
        # one where it does least harm: bounded hold, no starvation.
        self.max_hold_factor = max_hold_factor
        # JSON lines, one per dispatch: the worker state the prediction was made from and
        # the prediction, so a wrong one can be replayed offline (``--decision-log``).
        self.decision_log = decision_log
        # Send a request only where the decoding requests' TPOT slack covers its
        # prefill (routing.route_verdict); off: TTFT alone decides.
        self.tpot_guard = tpot_guard
        # Fresh worker state may let queued requests go: a pass right after each poll
        # answer, synchronously.
        pool.subscribe(self.dispatch)

    # -- decisions ----------------------------------------------------------------------

    def decide_new(self, item: QueuedRequest, view: View) -> NewRequestDecision:
        """What to do with a new request now (changes nothing). With nothing queued
        ahead of it, one that can go now goes without touching the queue: the decision
        the queue's dispatch pass would make, made once. Otherwise it queues."""
        preds = view.predictions(item.prompt_tokens, item.max_tokens)
        best = best_prediction(preds)
        rejection = should_reject(best, item.ttft_target_s, self.catalog.policy(item.slo_class))
        if rejection is not None:
            return NewRequestDecision(Action.REJECT, best, preds, rejection=rejection)
        if not self.queue:
            verdict, chosen, rejection = self._decide(item, view, preds)
            if rejection is None and verdict is Verdict.DISPATCH:
                return NewRequestDecision(Action.DISPATCH, best, preds, chosen=chosen)
        return NewRequestDecision(Action.QUEUE, best, preds)

    def _decide(
        self, item: QueuedRequest, view: View, preds: list[TtftPrediction] | None = None
    ) -> tuple[Verdict, TtftPrediction | None, Rejection | None]:
        if preds is None:
            preds = view.predictions(item.prompt_tokens, item.max_tokens)
        policy = self.catalog.policy(item.slo_class)
        return queued_decision(item, preds, view.rooms, view.now, policy, self.max_hold_factor)

    async def route(self, item: QueuedRequest):
        """Yields a QUEUED decision if the request has to wait, then its ``Routed``;
        raises ``Rejected`` if its class refuses it (or the queue is full), ``Abort``
        if the client's deadline passes while it is queued."""
        view = self.view()
        decision = self.decide_new(item, view)
        if decision.action is Action.REJECT:
            raise Rejected(decision.rejection)
        if decision.action is Action.DISPATCH:
            yield self._send(item, decision.chosen, view, last=True)
            return
        item.payload = asyncio.get_running_loop().create_future()
        try:
            self.queue.push(item)
        except QueueFull as e:
            raise Rejected(
                Rejection(retry_after_s(decision.best, item.ttft_target_s), str(e))
            ) from e
        try:
            self.dispatch(view)
            if not item.payload.done():
                metrics.DECISIONS.labels(item.slo_class, "queued").inc()
                yield decision_message(
                    admission_pb2.DECISION_KIND_QUEUED,
                    decision.best,
                    queue_position=self.queue.position(item),
                    reason=NO_ROOM_NOW,
                    prompt_tokens=item.prompt_tokens,
                )
            yield await item.payload
        finally:
            if self.queue.remove(item):
                self.queue_metrics()

    # -- the admission queue ------------------------------------------------------------

    def dispatch(self, view: View | None = None) -> None:
        """One pass over the queue in service order: send what can go now.

        Called when a request arrives, when worker state is refreshed and when a
        request gets its first token or ends (capacity may have freed)."""
        if not self.queue:
            return
        view = self.view() if view is None else view
        for i, item in enumerate(self.queue):
            if i >= _DISPATCH_SCAN:
                break
            future: asyncio.Future = item.payload
            if future.done():
                self.queue.remove(item)
                continue
            verdict, best, rejection = self._decide(item, view)
            if rejection is not None:
                self.queue.remove(item)
                future.set_exception(Rejected(rejection))
            elif verdict is Verdict.DISPATCH:
                self.queue.remove(item)
                future.set_result(self._send(item, best, view))
            elif verdict is Verdict.EXPIRED:
                self.queue.remove(item)
                future.set_exception(
                    Abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "the client's deadline passed while the request was queued",
                        "error",
                    )
                )
            elif verdict is Verdict.LATE:
                self.queue.mark_late(item)
        self.queue_metrics()

    def view(self) -> View:
        now = time.monotonic()
        routable = self.pool.routable(now)
        snaps = {w.address: w.snapshot(self.pool.prior, now) for w in routable}
        rooms = {
            w.address: self._tpot_room(w, snaps[w.address], now) if self.tpot_guard else NO_LIMIT
            for w in routable
        }
        return View(now, routable, snaps, rooms)

    def _send(
        self, item: QueuedRequest, best: TtftPrediction, view: View, *, last: bool = False
    ) -> Routed:
        """Book ``item`` on the worker ``best`` names, and update ``view`` for the next
        request of the pass (``last``: there is none)."""
        worker = next(w for w in view.workers if w.address == best.worker)
        snap = view.snaps[worker.address]
        worker.dispatched(
            item.request_id,
            item.prompt_tokens,
            item.max_tokens,
            item.tpot_target_s,
            offloaded_groups=snap.kv.groups - best.resident_groups,
            first_token_due=item.deadline,
        )
        if self.decision_log is not None:
            self._log_decision(item, worker, snap, best, view.now)
        if not last:
            view.snaps[worker.address] = snap = worker.snapshot(self.pool.prior, view.now)
            if self.tpot_guard:
                view.rooms[worker.address] = self._tpot_room(worker, snap, view.now)
        return Routed(worker, best, view.now, view.now - item.arrival)

    @staticmethod
    def _tpot_room(worker: WorkerEndpoint, snap: WorkerSnapshot, now: float) -> TpotRoom:
        factor = worker.decode_step_factor(snap.latency)
        return tpot_room(snap, factor, worker.decode_progress(now), now)

    def _log_decision(
        self,
        item: QueuedRequest,
        worker: WorkerEndpoint,
        snap: WorkerSnapshot,
        best: TtftPrediction,
        now: float,
    ) -> None:
        entry = {
            "request_id": item.request_id,
            "at": now,
            "held_s": now - item.arrival,  # in the admission queue before this dispatch
            "prompt_tokens": item.prompt_tokens,
            "max_tokens": item.max_tokens,
            # The worker's last report as received, and the snapshot made from it.
            "report_age_s": now - worker.load_at,
            "report": MessageToDict(worker.load, preserving_proto_field_name=True),
            "snapshot": dataclasses.asdict(snap),
            "prediction": dataclasses.asdict(best),
        }
        self.decision_log.write(json.dumps(entry) + "\n")

    def queue_metrics(self) -> None:
        depth: dict[str, int] = dict.fromkeys(self.catalog.names(), 0)
        for item in self.queue:
            depth[item.slo_class] = depth.get(item.slo_class, 0) + 1
        for name, n in depth.items():
            metrics.QUEUE_DEPTH.labels(name).set(n)
