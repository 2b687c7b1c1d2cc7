"""The admission service: the client-facing ``layerkv.v1.Admission`` gRPC servicer.

Validates a request and resolves its SLO class, has the dispatcher decide where it
goes (``dispatcher.py``: reject, send to the worker with the best predicted TTFT, or
hold it in the admission queue until a worker can serve it in time), streams the
decision and the tokens back through the relay (``relay.py``), and records the
outcome (``request_state.py``). ``Predict`` is a dry run of the same decision.
The wiring (settings, server start, drain) is ``app.py``.
"""

from __future__ import annotations

import asyncio
import functools
import time

import grpc

from layerkv.admission import metrics
from layerkv.admission.dispatcher import (
    NO_ROOM_NOW,
    Action,
    Dispatcher,
    NewRequestDecision,
    decision_message,
    queued_request,
)
from layerkv.admission.outcomes import OutcomeRecorder
from layerkv.admission.relay import Relay
from layerkv.admission.request_state import (
    Abort,
    Measured,
    Rejected,
    Routed,
    learn_overhead,
    record_outcome,
)
from layerkv.admission.slo_classes import SloCatalog
from layerkv.admission.workers import WorkerPool
from layerkv.common.requests import (
    InvalidRequest,
    check_prompt,
    request_id_or_new,
    sampling_from_proto,
)
from layerkv.common.slo import DEFAULT_CLASS, SloTarget
from layerkv.policy.routing import Rejection
from layerkv.policy.ttft import TtftPrediction
from layerkv.v1 import admission_pb2, common_pb2, worker_pb2


class AdmissionService:
    """Implements ``layerkv.v1.Admission``."""

    def __init__(self, dispatcher: Dispatcher, recorder: OutcomeRecorder) -> None:
        self.dispatcher = dispatcher
        self.recorder = recorder
        self.relay = Relay(dispatcher.pool, dispatcher.dispatch)
        self.in_flight: set[str] = set()
        self.draining = False
        # Prompt tokens per byte of text, learned from the workers' usage reports (text
        # prompts are tokenised by the worker; admission only needs an estimate).
        self.tokens_per_byte = 0.3

    @property
    def pool(self) -> WorkerPool:
        return self.dispatcher.pool

    @property
    def catalog(self) -> SloCatalog:
        return self.dispatcher.catalog

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

    # -- RPCs ---------------------------------------------------------------------------

    async def Generate(self, request: admission_pb2.GenerateRequest, context):
        self.start()
        request_id, target, max_tokens = await self._accept(request, context)
        arrival = time.monotonic()
        remaining = context.time_remaining()
        client_deadline = arrival + remaining if remaining is not None else None
        prompt_tokens = self._prompt_tokens(request)
        worker_request = _worker_request(request, request_id, target)
        measured = Measured(start=arrival)
        status, error = "error", ""
        routed: Routed | None = None
        self.in_flight.add(request_id)
        metrics.IN_FLIGHT.inc()
        try:
            if self.pool.routable():
                item = queued_request(
                    request_id, target, prompt_tokens, max_tokens, request.priority,
                    client_deadline, arrival,
                )  # fmt: skip
                async for step in self.dispatcher.route(item):
                    if isinstance(step, Routed):
                        routed = step
                    else:
                        yield admission_pb2.GenerateResponse(request_id=request_id, decision=step)
            async for response in self.relay.forward(
                worker_request,
                request_id,
                measured,
                context.time_remaining(),
                routed,
                prompt_tokens,
                max_tokens,
                functools.partial(self._admitted, request_id, target, routed, prompt_tokens),
            ):
                yield response
            status = "ok"
            self._learn_tokens_per_byte(request, measured.prompt_tokens)
        except Rejected as e:
            status, error = "rejected", e.rejection.reason
            await _abort_rejected(context, target, e.rejection)
        except Abort as e:
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
                learn_overhead(routed, measured)
            if status != "client_error":
                record_outcome(self.recorder, request_id, target, status, measured, error, routed)
            self.dispatcher.dispatch()

    async def _accept(self, request, context) -> tuple[str, SloTarget, int]:
        """``_admit``'s answer, or the call aborted: invalid, draining, or a duplicate."""
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
        return request_id, target, max_tokens

    def _admitted(
        self, request_id: str, target: SloTarget, routed: Routed | None, prompt_tokens: int
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
            decision = decision_message(
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
        view = self.dispatcher.view()
        now = view.now
        item = queued_request(
            "", target, prompt_tokens, max_tokens, request.priority,
            now + remaining if remaining is not None else None, now,
        )  # fmt: skip
        decided = self.dispatcher.decide_new(item, view)
        return admission_pb2.Prediction(
            decision=self._dry_run_decision(decided, prompt_tokens),
            workers=self._worker_predictions(decided.predictions, now),
        )

    def _dry_run_decision(
        self, decided: NewRequestDecision, prompt_tokens: int
    ) -> admission_pb2.Decision:
        """What Generate would answer now: with nothing queued, the decision of its
        fast path (the TPOT guard included); otherwise it would queue."""
        kw = dict(prompt_tokens=prompt_tokens)
        best = decided.best
        if best is None:
            kind = admission_pb2.DECISION_KIND_UNSPECIFIED
            return decision_message(kind, None, reason="no worker state known", **kw)
        if decided.action is Action.REJECT:
            return decision_message(
                admission_pb2.DECISION_KIND_REJECTED,
                best,
                retry_after_s=decided.rejection.retry_after_s,
                reason=decided.rejection.reason,
                **kw,
            )
        if decided.action is Action.DISPATCH:
            return decision_message(admission_pb2.DECISION_KIND_ADMITTED, decided.chosen, **kw)
        queue = self.dispatcher.queue
        return decision_message(
            admission_pb2.DECISION_KIND_QUEUED,
            best,
            queue_position=len(queue) + 1,
            reason="requests are queued ahead" if queue else NO_ROOM_NOW,
            **kw,
        )

    def _worker_predictions(
        self, predictions: list[TtftPrediction], now: float
    ) -> list[admission_pb2.WorkerPrediction]:
        """Every worker's prediction for the request (a worker out of routing has
        none), with the age of the state it was made from."""
        preds = {p.worker: p for p in predictions}
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
        return workers


def _worker_request(
    request: admission_pb2.GenerateRequest, request_id: str, target: SloTarget
) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(
        request_id=request_id,
        prompt=request.prompt,
        prompt_token_ids=request.prompt_token_ids,
        sampling=request.sampling,
        slo=common_pb2.SloTargets(ttft_s=target.ttft_s, tpot_s=target.tpot_s),
        slo_class=target.name,
    )


async def _abort_rejected(context, target: SloTarget, rejection: Rejection) -> None:
    """RESOURCE_EXHAUSTED with the rejection's reason and retry-after."""
    metrics.DECISIONS.labels(target.name, "rejected").inc()
    retry_ms = max(1, round(rejection.retry_after_s * 1000))
    await context.abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{rejection.reason}; retry after {rejection.retry_after_s:.3f} s",
        trailing_metadata=(("retry-after-ms", str(retry_ms)),),
    )
