"""One request's state in the admission service: where it went and what was
predicted (:class:`Routed`), what was measured while streaming it (:class:`Measured`),
how it ended early (:class:`Abort`, :class:`Rejected`), and the outcome recorded when
it ends (:func:`record_outcome`, :func:`learn_overhead`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from layerkv.admission import metrics
from layerkv.admission.outcomes import OutcomeRecorder
from layerkv.admission.worker_state import WorkerEndpoint
from layerkv.common.slo import RequestOutcome, SloTarget
from layerkv.policy.routing import START_NOW_S, Rejection
from layerkv.policy.ttft import TtftPrediction


@dataclass
class Measured:
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


class Abort(Exception):
    """Ends a request with a gRPC status; ``status`` is the outcome recorded."""

    def __init__(self, code: grpc.StatusCode, message: str, status: str) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class Rejected(Exception):
    """Ends a request its class refuses (RESOURCE_EXHAUSTED with a retry-after)."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection


@dataclass
class Routed:
    """Where a request went and what was predicted for it."""

    worker: WorkerEndpoint
    prediction: TtftPrediction
    dispatched_at: float
    queued_s: float

    @property
    def predicted_from_arrival_s(self) -> float:
        return self.queued_s + self.prediction.ttft_s


def learn_overhead(routed: Routed, measured: Measured) -> None:
    """Fit the per-worker overhead on requests predicted to start at once, where
    the whole prediction is the prefill: the residual is overhead."""
    p = routed.prediction
    if measured.first_token_at is None or p.wait_s > START_NOW_S or measured.tokens < 1:
        return
    if measured.worker != routed.worker.address:
        return
    ttft_since_dispatch = measured.first_token_at - (measured.start + routed.queued_s)
    routed.worker.learn_overhead(ttft_since_dispatch - p.prefill_s)


def record_outcome(
    recorder: OutcomeRecorder,
    request_id: str,
    target: SloTarget,
    status: str,
    measured: Measured,
    error: str,
    routed: Routed | None = None,
) -> None:
    """The request's metrics, and its outcome for Redis (TTFT and TPOT as the client
    saw them, and the predicted TTFT)."""
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
    recorder.submit(outcome, target)
