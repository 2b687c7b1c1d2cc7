"""The admission service: the client-facing ``layerkv.v1.Admission`` gRPC server.

Validates a request, resolves its SLO class, predicts its TTFT on every worker
(``ttft.py``), then rejects it (``reject`` classes, far over target), sends it to the
worker with the best prediction, or holds it in the admission queue (EDF, ``queue.py``)
until a worker can serve it in time (``routing.py``). Streams the decision and the
tokens back, and records the outcome (TTFT and TPOT as the client sees them, and the
predicted TTFT) in Redis. Policy lives in the pure modules; this module does the I/O.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import grpc
from google.protobuf.json_format import MessageToDict

from layerkv.admission import metrics
from layerkv.admission.load_reports import LoadPublisher
from layerkv.admission.outcomes import OutcomeRecorder
from layerkv.admission.slo_classes import SloCatalog
from layerkv.admission.workers import WorkerEndpoint, WorkerPool
from layerkv.common import serving
from layerkv.common.requests import (
    InvalidRequest,
    check_prompt,
    request_id_or_new,
    sampling_from_proto,
)
from layerkv.common.slo import DEFAULT_CLASS, RequestOutcome, SloTarget
from layerkv.common.store import MetricsStore
from layerkv.policy.queue import QueuedRequest, QueueFull, create_queue
from layerkv.policy.routing import (
    NO_LIMIT,
    START_NOW_S,
    ClassPolicy,
    MissPolicy,
    Rejection,
    TpotRoom,
    Verdict,
    best_prediction,
    deadline_for,
    least_harm_route,
    overdue_route,
    queued_rejection,
    retry_after_s,
    route_verdict,
    should_reject,
    worker_room,
)
from layerkv.policy.ttft import TtftPrediction, WorkerSnapshot, predict_ttft
from layerkv.v1 import admission_pb2, common_pb2, worker_pb2

# Queued requests examined per dispatch pass (bounds its cost under a deep queue).
_DISPATCH_SCAN = 32

log = logging.getLogger(__name__)

SERVICE = admission_pb2.DESCRIPTOR.services_by_name["Admission"]

# Worker answers passed to the client as they are: the request itself is at fault.
_CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
}
# Worker answers after which the next worker may succeed (if nothing was streamed yet).
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@dataclass
class _Measured:
    """What the admission service measured of one request while streaming it."""

    start: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    worker: str = ""

    def token(self, n: int) -> None:
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.tokens += n

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.start

    @property
    def tpot_s(self) -> float | None:
        if self.tokens < 2 or self.first_token_at is None:
            return None
        return (self.last_token_at - self.first_token_at) / (self.tokens - 1)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, status: str) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class _Rejected(Exception):
    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection


@dataclass
class _Routed:
    """Where a request went and what was predicted for it."""

    worker: WorkerEndpoint
    prediction: TtftPrediction
    dispatched_at: float
    queued_s: float

    @property
    def predicted_from_arrival_s(self) -> float:
        return self.queued_s + self.prediction.ttft_s


@dataclass
class _View:
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


_NO_ROOM_NOW = (
    "no worker can start it now within its TTFT target and the running requests' TPOT targets"
)


def _queued_request(
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


class AdmissionService:
    """Implements ``layerkv.v1.Admission``."""

    def __init__(
        self,
        pool: WorkerPool,
        catalog: SloCatalog,
        recorder: OutcomeRecorder,
        *,
        queue_capacity: int = 1024,
        queue_policy: str = "edf",
        max_hold_factor: float = 4.0,
        decision_log: TextIO | None = None,
        tpot_guard: bool = True,
    ) -> None:
        self.pool = pool
        self.catalog = catalog
        self.recorder = recorder
        self.in_flight: set[str] = set()
        self.draining = False
        self.queue = create_queue(queue_policy, queue_capacity)
        # A request held for TPOT room goes after max_hold_factor x its TTFT target to
        # a worker with prefill room, or (a queue class, which must be served) to the
        # one where it does least harm: bounded hold, no starvation.
        self.max_hold_factor = max_hold_factor
        # Prompt tokens per byte of text, learned from the workers' usage reports (text
        # prompts are tokenised by the worker; admission only needs an estimate).
        self.tokens_per_byte = 0.3
        # JSON lines, one per dispatch: the worker state the prediction was made from and
        # the prediction, so a wrong one can be replayed offline (``--decision-log``).
        self.decision_log = decision_log
        # Send a request only where the decoding requests' TPOT slack covers its
        # prefill (routing.route_verdict); off: TTFT alone decides.
        self.tpot_guard = tpot_guard
        pool.on_update = self.dispatch

    def start(self) -> None:
        """Start the background work (worker polling); idempotent."""
        self.pool.start()

    def _admit(self, request: admission_pb2.GenerateRequest) -> tuple[str, SloTarget, int]:
        """The request's id, SLO target and max_tokens, or InvalidRequest."""
        request_id = request_id_or_new(request.request_id)
        check_prompt(request.prompt, request.prompt_token_ids)
        max_tokens = sampling_from_proto(request.sampling).max_tokens
        slo_class = request.slo_class or DEFAULT_CLASS
        target = self.catalog.get(slo_class)
        if target is None:
            raise InvalidRequest(
                f"unknown slo_class {slo_class!r}; known: {', '.join(self.catalog.names())}"
            )
        return request_id, target, max_tokens

    def _prompt_tokens(self, request: admission_pb2.GenerateRequest) -> int:
        if len(request.prompt_token_ids):
            return len(request.prompt_token_ids)
        return max(1, round(len(request.prompt.encode()) * self.tokens_per_byte))

    def _learn_tokens_per_byte(self, request, prompt_tokens: int) -> None:
        if request.prompt and prompt_tokens:
            ratio = prompt_tokens / max(len(request.prompt.encode()), 1)
            self.tokens_per_byte += 0.2 * (ratio - self.tokens_per_byte)

    # -- the admission queue ------------------------------------------------------------

    def dispatch(self, view: _View | None = None) -> None:
        """One pass over the queue in service order: send what can go now.

        Called when a request arrives, when worker state is refreshed and when a
        request gets its first token or ends (capacity may have freed)."""
        if not self.queue:
            return
        view = self._view() if view is None else view
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
                future.set_exception(_Rejected(rejection))
            elif verdict is Verdict.DISPATCH:
                self.queue.remove(item)
                future.set_result(self._send(item, best, view))
            elif verdict is Verdict.EXPIRED:
                self.queue.remove(item)
                future.set_exception(
                    _Abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "the client's deadline passed while the request was queued",
                        "error",
                    )
                )
            elif verdict is Verdict.LATE:
                self.queue.mark_late(item)
        self._queue_metrics()

    def _view(self) -> _View:
        now = time.monotonic()
        routable = self.pool.routable(now)
        snaps = {w.address: w.snapshot(self.pool.prior, now) for w in routable}
        rooms = {
            w.address: self._tpot_room(w, snaps[w.address], now) if self.tpot_guard else NO_LIMIT
            for w in routable
        }
        return _View(now, routable, snaps, rooms)

    def _decide(
        self, item: QueuedRequest, view: _View, preds: list[TtftPrediction] | None = None
    ) -> tuple[Verdict, TtftPrediction | None, Rejection | None]:
        """What to do with ``item`` now (changes nothing): its verdict, the worker
        prediction it would go with, and a rejection if its class gives up on it."""
        if preds is None:
            preds = view.predictions(item.prompt_tokens, item.max_tokens)
        policy = self.catalog.policy(item.slo_class)
        verdict, best = route_verdict(
            item, preds, view.rooms, view.now, must_serve=policy.on_miss is MissPolicy.QUEUE
        )
        if verdict in (Verdict.WAIT, Verdict.LATE):
            rejection = queued_rejection(item, best, view.now, policy)
            if rejection is not None:
                return verdict, best, rejection
            if view.now - item.arrival >= self.max_hold_factor * item.ttft_target_s:
                overdue = overdue_route(preds, view.rooms)
                if overdue is None and policy.on_miss is MissPolicy.QUEUE:
                    # It must be served: the hold is as long as it waits for room.
                    overdue = least_harm_route(preds, view.rooms)
                if overdue is not None:
                    return Verdict.DISPATCH, overdue, None
        return verdict, best, None

    def _send(
        self, item: QueuedRequest, best: TtftPrediction, view: _View, *, last: bool = False
    ) -> _Routed:
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
        return _Routed(worker, best, view.now, view.now - item.arrival)

    @staticmethod
    def _tpot_room(worker: WorkerEndpoint, snap: WorkerSnapshot, now: float) -> TpotRoom:
        lat = snap.latency
        # The step everyone there would take once the queued requests and one more
        # decode too, scaled by how much slower tokens have been streaming through
        # here than the engine's step fit says (it misses the output path around it).
        factor = worker.decode_step_factor(lat)
        context = sum(r.prompt_tokens + r.output_tokens for r in (*snap.running, *snap.waiting))
        step = factor * lat.decode_step(len(snap.running) + len(snap.waiting) + 1, context)
        idle_step = factor * lat.decode_step(1)
        return worker_room(
            worker.decode_progress(now),
            now,
            step,
            idle_step,
            queued_prefill_s=sum(lat.prefill_s(r.prompt_tokens) for r in snap.waiting),
            step_s_per_token=factor * lat.decode_step_s_per_token,
        )

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

    def _queue_metrics(self) -> None:
        depth: dict[str, int] = dict.fromkeys(self.catalog.names(), 0)
        for item in self.queue:
            depth[item.slo_class] = depth.get(item.slo_class, 0) + 1
        for name, n in depth.items():
            metrics.QUEUE_DEPTH.labels(name).set(n)

    async def _route(
        self,
        request_id: str,
        target: SloTarget,
        policy: ClassPolicy,
        prompt_tokens: int,
        max_tokens: int,
        priority: int,
        client_deadline: float | None,
        arrival: float,
    ):
        """Yields a QUEUED decision if the request has to wait, then its ``_Routed``."""
        view = self._view()
        preds = view.predictions(prompt_tokens, max_tokens)
        best = best_prediction(preds)
        rejection = should_reject(best, target.ttft_s, policy)
        if rejection is not None:
            raise _Rejected(rejection)
        item = _queued_request(
            request_id, target, prompt_tokens, max_tokens, priority, client_deadline, arrival
        )
        if not self.queue:
            # Nothing ahead of it: one that can go now goes without touching the queue
            # (the same decision the queue's dispatch pass would make, made once).
            verdict, chosen, rejection = self._decide(item, view, preds)
            if rejection is None and verdict is Verdict.DISPATCH:
                yield self._send(item, chosen, view, last=True)
                return
        item.payload = asyncio.get_running_loop().create_future()
        try:
            self.queue.push(item)
        except QueueFull as e:
            raise _Rejected(Rejection(retry_after_s(best, target.ttft_s), str(e))) from e
        try:
            self.dispatch(view)
            if not item.payload.done():
                metrics.DECISIONS.labels(target.name, "queued").inc()
                yield self._decision(
                    admission_pb2.DECISION_KIND_QUEUED,
                    best,
                    queue_position=self.queue.position(item),
                    reason=_NO_ROOM_NOW,
                    prompt_tokens=prompt_tokens,
                )
            yield await item.payload
        finally:
            if self.queue.remove(item):
                self._queue_metrics()

    @staticmethod
    def _decision(
        kind, best: TtftPrediction | None, *, predicted_s: float | None = None, **kw
    ) -> admission_pb2.Decision:
        return admission_pb2.Decision(
            kind=kind,
            predicted_ttft_s=(best.ttft_s if best else 0.0) if predicted_s is None else predicted_s,
            worker=best.worker if best else "",
            **kw,
        )

    # -- RPCs ---------------------------------------------------------------------------

    async def Generate(self, request: admission_pb2.GenerateRequest, context):
        self.start()
        try:
            request_id, target, max_tokens = self._admit(request)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "admission is draining; retry")
        if request_id in self.in_flight:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"request {request_id!r} is already running"
            )

        arrival = time.monotonic()
        remaining = context.time_remaining()
        client_deadline = arrival + remaining if remaining is not None else None
        prompt_tokens = self._prompt_tokens(request)
        worker_request = worker_pb2.WorkerGenerateRequest(
            request_id=request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            sampling=request.sampling,
            slo=common_pb2.SloTargets(ttft_s=target.ttft_s, tpot_s=target.tpot_s),
            slo_class=target.name,
        )
        measured = _Measured(start=arrival)
        status, error = "error", ""
        routed: _Routed | None = None
        self.in_flight.add(request_id)
        metrics.IN_FLIGHT.inc()
        try:
            if self.pool.routable():
                async for step in self._route(
                    request_id,
                    target,
                    self.catalog.policy(target.name),
                    prompt_tokens,
                    max_tokens,
                    request.priority,
                    client_deadline,
                    arrival,
                ):
                    if isinstance(step, _Routed):
                        routed = step
                    else:
                        yield admission_pb2.GenerateResponse(request_id=request_id, decision=step)
            async for response in self._forward(
                worker_request,
                request_id,
                measured,
                context,
                routed,
                prompt_tokens,
                max_tokens,
                functools.partial(self._admitted, request_id, target, routed, prompt_tokens),
            ):
                yield response
            status = "ok"
            self._learn_tokens_per_byte(request, measured.prompt_tokens)
        except _Rejected as e:
            status, error = "rejected", e.rejection.reason
            metrics.DECISIONS.labels(target.name, "rejected").inc()
            retry_ms = max(1, round(e.rejection.retry_after_s * 1000))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{e.rejection.reason}; retry after {e.rejection.retry_after_s:.3f} s",
                trailing_metadata=(("retry-after-ms", str(retry_ms)),),
            )
        except _Abort as e:
            status, error = e.status, e.message
            if e.code == grpc.StatusCode.DEADLINE_EXCEEDED and routed is None:
                metrics.DECISIONS.labels(target.name, "expired").inc()
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            self.in_flight.discard(request_id)
            metrics.IN_FLIGHT.dec()
            if routed is not None:
                self._learn_overhead(routed, measured)
            if status != "client_error":
                self._record(request_id, target, status, measured, error, routed)
            self.dispatch()

    def _admitted(
        self, request_id: str, target: SloTarget, routed: _Routed | None, prompt_tokens: int
    ) -> admission_pb2.GenerateResponse:
        """The ADMITTED decision message, and its metrics."""
        if routed is None:
            # No worker has answered a poll yet (start-up) or all are out of routing:
            # the request is tried on the workers in turn rather than refused.
            metrics.DECISIONS.labels(target.name, "fallback").inc()
            decision = admission_pb2.Decision(
                kind=admission_pb2.DECISION_KIND_ADMITTED,
                reason="no worker state known; trying workers in turn",
                prompt_tokens=prompt_tokens,
            )
        else:
            metrics.DECISIONS.labels(target.name, "admitted").inc()
            metrics.QUEUE_WAIT.labels(target.name).observe(routed.queued_s)
            metrics.PREDICTED_TTFT.labels(target.name).observe(routed.predicted_from_arrival_s)
            decision = self._decision(
                admission_pb2.DECISION_KIND_ADMITTED,
                routed.prediction,
                predicted_s=routed.predicted_from_arrival_s,
                queued_s=routed.queued_s,
                prompt_tokens=prompt_tokens,
            )
        return admission_pb2.GenerateResponse(request_id=request_id, decision=decision)

    async def Predict(self, request: admission_pb2.GenerateRequest, context):
        """Dry run of Generate's decision; nothing is queued or sent."""
        self.start()
        try:
            _, target, max_tokens = self._admit(request)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        prompt_tokens = self._prompt_tokens(request)
        remaining = context.time_remaining()
        view = self._view()
        now = view.now
        preds = {p.worker: p for p in view.predictions(prompt_tokens, max_tokens)}
        workers = []
        for w in self.pool.workers:
            p = preds.get(w.address)
            age = w.state_age(now)
            workers.append(
                admission_pb2.WorkerPrediction(
                    worker=w.address,
                    routable=p is not None,
                    predicted_ttft_s=p.ttft_s if p else 0.0,
                    queue_s=p.queue_s if p else 0.0,
                    kv_wait_s=p.kv_wait_s if p else 0.0,
                    prefill_s=p.prefill_s if p else 0.0,
                    resident_groups=p.resident_groups if p else 0,
                    state_age_s=-1.0 if age is None else age,
                )
            )
        best = best_prediction(preds.values())
        policy = self.catalog.policy(target.name)
        rejection = should_reject(best, target.ttft_s, policy)
        kw = dict(prompt_tokens=prompt_tokens)
        if best is None:
            decision = self._decision(
                admission_pb2.DECISION_KIND_UNSPECIFIED,
                None,
                reason="no worker state known",
                **kw,
            )
        elif rejection is not None:
            decision = self._decision(
                admission_pb2.DECISION_KIND_REJECTED,
                best,
                retry_after_s=rejection.retry_after_s,
                reason=rejection.reason,
                **kw,
            )
        else:
            # What Generate would decide now: with nothing queued, the decision of its
            # fast path (the TPOT guard included); otherwise it would queue.
            chosen = None
            if not self.queue:
                item = _queued_request(
                    "",
                    target,
                    prompt_tokens,
                    max_tokens,
                    request.priority,
                    now + remaining if remaining is not None else None,
                    now,
                )
                verdict, chosen, rejected = self._decide(item, view, list(preds.values()))
                if rejected is not None or verdict is not Verdict.DISPATCH:
                    chosen = None
            if chosen is not None:
                decision = self._decision(admission_pb2.DECISION_KIND_ADMITTED, chosen, **kw)
            else:
                decision = self._decision(
                    admission_pb2.DECISION_KIND_QUEUED,
                    best,
                    queue_position=len(self.queue) + 1,
                    reason="requests are queued ahead" if self.queue else _NO_ROOM_NOW,
                    **kw,
                )
        return admission_pb2.Prediction(decision=decision, workers=workers)

    async def _forward(
        self,
        worker_request,
        request_id: str,
        measured: _Measured,
        context,
        routed: _Routed | None,
        prompt_tokens: int,
        max_tokens: int,
        admitted: Callable[[], admission_pb2.GenerateResponse] | None,
    ):
        """Stream ``worker_request`` from the routed worker, or else from the first
        worker that takes it (a worker that fails before streaming anything). The
        ``admitted()`` decision goes to the client once the first worker call is under
        way."""
        timeout = context.time_remaining()
        tried: list[str] = []
        if routed is not None:
            others = [w for w in self.pool.routable() if w is not routed.worker]
            order = [routed.worker, *others]
        else:
            order = self.pool.candidates()
        for worker in order:
            if routed is None or worker is not routed.worker:
                worker.dispatched(request_id, prompt_tokens, max_tokens)
            call = worker.stub.Generate(worker_request, timeout=timeout)
            measured.worker = worker.address
            if admitted is not None:
                # After the call is started: a yield waits for its write to finish, and
                # the request to the worker should not wait behind it. (Waiting until
                # the request was sent, ``call.wait_for_connection()``, measured 0.12 ms
                # slower p50 over 1,500 requests.)
                yield admitted()
                admitted = None
            try:
                async for response in call:
                    if response.HasField("tokens"):
                        first = measured.tokens == 0
                        n = len(response.tokens.token_ids)
                        measured.token(n)
                        worker.streamed(request_id, n)
                        if first:
                            self.dispatch()  # its blocks are now taken: re-plan the queue
                        yield admission_pb2.GenerateResponse(
                            request_id=request_id, tokens=response.tokens
                        )
                    elif response.HasField("completion"):
                        measured.prompt_tokens = response.completion.usage.prompt_tokens
                        yield admission_pb2.GenerateResponse(
                            request_id=request_id,
                            completion=self._completion(response.completion, measured),
                        )
                self.pool.mark_ok(worker)
                return
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code in _CLIENT_ERRORS:
                    raise _Abort(code, e.details() or code.name, "client_error") from e
                streamed = measured.tokens > 0
                metrics.WORKER_FAILURES.labels(
                    worker.address, "mid_stream" if streamed else "before_stream"
                ).inc()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise _Abort(code, "deadline exceeded", "error") from e
                if streamed or code not in _RETRYABLE:
                    self.pool.mark_failed(worker)
                    raise _Abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"worker {worker.address} failed after {measured.tokens} tokens: "
                        f"{code.name}: {e.details()}",
                        "error",
                    ) from e
                log.warning(
                    "worker %s unavailable (%s); trying the next", worker.address, code.name
                )
                self.pool.mark_failed(worker)
                tried.append(worker.address)
            finally:
                call.cancel()  # no-op when finished; aborts the worker request otherwise
                worker.finished(request_id)
        raise _Abort(
            grpc.StatusCode.UNAVAILABLE,
            f"no worker could take the request (tried {tried})",
            "error",
        )

    @staticmethod
    def _completion(c: common_pb2.Completion, measured: _Measured) -> common_pb2.Completion:
        """The worker's completion with the latencies the client actually saw."""
        return common_pb2.Completion(
            finish_reason=c.finish_reason,
            usage=c.usage,
            ttft_s=measured.ttft_s or 0.0,
            tpot_s=measured.tpot_s or 0.0,
            worker=measured.worker,
        )

    @staticmethod
    def _learn_overhead(routed: _Routed, measured: _Measured) -> None:
        """Fit the per-worker overhead on requests predicted to start at once, where
        the whole prediction is the prefill: the residual is overhead."""
        p = routed.prediction
        if measured.first_token_at is None or p.wait_s > START_NOW_S or measured.tokens < 1:
            return
        if measured.worker != routed.worker.address:
            return
        ttft_since_dispatch = measured.first_token_at - (measured.start + routed.queued_s)
        routed.worker.learn_overhead(ttft_since_dispatch - p.prefill_s)

    def _record(
        self,
        request_id,
        target,
        status,
        measured: _Measured,
        error: str,
        routed: _Routed | None = None,
    ) -> None:
        metrics.REQUESTS.labels(target.name, status).inc()
        predicted = routed.predicted_from_arrival_s if routed is not None else None
        if measured.ttft_s is not None:
            metrics.TTFT.labels(target.name).observe(measured.ttft_s)
            if predicted is not None:
                err = abs(predicted - measured.ttft_s)
                metrics.PREDICTION_ERROR.labels(target.name).observe(err)
                metrics.PREDICTION_RELATIVE_ERROR.labels(target.name).observe(
                    err / max(measured.ttft_s, 1e-6)
                )
        if measured.tpot_s is not None:
            metrics.TPOT.labels(target.name).observe(measured.tpot_s)
        outcome = RequestOutcome(
            request_id=request_id,
            slo_class=target.name,
            status=status,
            finished_at=time.time(),
            ttft_s=measured.ttft_s,
            tpot_s=measured.tpot_s,
            prompt_tokens=measured.prompt_tokens,
            output_tokens=measured.tokens,
            worker=measured.worker,
            predicted_ttft_s=predicted,
            error=error,
        )
        self.recorder.submit(outcome, target)


@dataclass(frozen=True)
class AdmissionSettings:
    workers: tuple[str, ...]
    redis_url: str = ""  # empty: outcomes are not recorded
    # Name under which worker load reports are written to Redis for the operator (the
    # worker Deployment's name); empty: not published.
    worker_pool: str = ""
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9090
    default_ttft_s: float = 2.0
    default_tpot_s: float = 0.1
    slo_refresh_s: float = 5.0
    outcome_buffer: int = 10_000
    outcome_flush_interval_s: float = 0.1
    drain_timeout_s: float = 30.0
    # Extra SLO classes from config (Redis targets override them), and what each class
    # does when no worker can meet its target now.
    classes: tuple[SloTarget, ...] = ()
    policies: tuple[tuple[str, ClassPolicy], ...] = ()
    default_policy: ClassPolicy = field(default_factory=ClassPolicy)
    queue_capacity: int = 1024
    queue_policy: str = "edf"
    max_hold_factor: float = 4.0
    poll_interval_s: float = 0.1
    stale_after_s: float = 3.0
    decision_log: str = ""  # path of a JSON-lines log of every dispatch ('' = none)
    tpot_guard: bool = True


def build_service(settings: AdmissionSettings) -> AdmissionService:
    # Open for the process's life; line-buffered, so a crash loses at most one line.
    decisions = (
        open(settings.decision_log, "a", buffering=1)  # noqa: SIM115
        if settings.decision_log
        else None
    )
    store = MetricsStore.from_url(settings.redis_url) if settings.redis_url else None
    default = SloTarget(DEFAULT_CLASS, settings.default_ttft_s, settings.default_tpot_s)
    classes = {default.name: default, **{c.name: c for c in settings.classes}}
    return AdmissionService(
        WorkerPool(
            list(settings.workers),
            poll_interval_s=settings.poll_interval_s,
            stale_after_s=settings.stale_after_s,
        ),
        SloCatalog(
            list(classes.values()),
            store,
            dict(settings.policies),
            settings.default_policy,
        ),
        OutcomeRecorder(
            store,
            capacity=settings.outcome_buffer,
            flush_interval_s=settings.outcome_flush_interval_s,
        ),
        queue_capacity=settings.queue_capacity,
        queue_policy=settings.queue_policy,
        max_hold_factor=settings.max_hold_factor,
        decision_log=decisions,
        tpot_guard=settings.tpot_guard,
    )


async def start_server(service: AdmissionService, host: str, port: int) -> serving.RunningServer:
    return await serving.start_grpc_server(
        SERVICE, service, [admission_pb2, common_pb2], host, port
    )


async def serve(settings: AdmissionSettings) -> None:
    """Run until SIGTERM/SIGINT, then drain: refuse new calls, let running ones finish
    (up to ``drain_timeout_s``), flush buffered outcomes."""
    stop = asyncio.Event()
    serving.install_shutdown_signals(stop)
    service = build_service(settings)
    running = await start_server(service, settings.host, settings.port)
    serving.start_metrics_server(settings.metrics_port)
    service.recorder.start()
    service.start()
    background = [asyncio.create_task(service.catalog.refresh_forever(settings.slo_refresh_s))]
    if settings.worker_pool and service.recorder.store is not None:
        publisher = LoadPublisher(service.pool, service.recorder.store, settings.worker_pool)
        background.append(asyncio.create_task(publisher.run_forever()))
    await running.set_serving(True)
    log.info(
        "admission serving on %s:%d, workers %s", settings.host, running.port, settings.workers
    )
    try:
        await stop.wait()
    finally:
        log.info("draining (%d in flight)", len(service.in_flight))
        service.draining = True
        await running.set_serving(False)
        await running.server.stop(settings.drain_timeout_s)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await service.recorder.close()
        await service.pool.close()
        log.info("admission stopped")
