"""Routing and admission policy: which worker, now or later, or not at all. Pure.

* Route to the worker with the best predicted TTFT (:func:`best_prediction`).
* A new request of a ``reject`` class whose best predicted TTFT exceeds its target by
  more than ``reject_factor`` is refused at once with a retry-after (the predicted
  excess): the client learns in milliseconds what it would otherwise learn as a late
  first token, and the capacity goes to requests that can still make it.
* Otherwise the request waits in the admission queue until :func:`dispatch_verdict`
  lets it go: when some worker can start it at once, or just before it must go to
  meet its deadline; and preferably to a worker whose decoding requests' TPOT slack
  covers its prefill (:func:`tpot_room`, :func:`route_verdict`). Holding requests
  here rather than in the workers' FIFO queues lets urgent requests overtake and
  routes each request late, to whichever worker frees up first.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from layerkv.admission.queue import QueuedRequest
from layerkv.admission.ttft import TtftPrediction
from layerkv.policy.slack import DecodeProgress, min_slack


class MissPolicy(enum.Enum):
    """What a class does with a request no worker can serve within its target now."""

    QUEUE = "queue"
    REJECT = "reject"


@dataclass(frozen=True)
class ClassPolicy:
    on_miss: MissPolicy = MissPolicy.QUEUE
    # Reject when predicted TTFT > reject_factor * target (REJECT classes only).
    reject_factor: float = 2.0

    def __post_init__(self) -> None:
        if not self.reject_factor >= 1.0:
            raise ValueError("reject_factor must be >= 1")


MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 60.0
# A predicted wait this short counts as "can start now" (the predictor's resolution).
START_NOW_S = 0.005
# A queued request is sent when its slack (deadline - now - predicted TTFT) falls below
# this: a few dispatch passes (worker polls) ahead of the last moment.
DISPATCH_MARGIN_S = 0.3


# Predicted TTFTs closer than this are a tie (below the predictor's resolution).
TIE_S = 0.002


def best_prediction(predictions: Iterable[TtftPrediction]) -> TtftPrediction | None:
    """Lowest predicted TTFT; requests that fit beat ones that never can. Near-ties go
    to the worker holding fewer requests (spreads a burst instead of piling it on the
    first address), then the address (deterministic)."""
    preds = list(predictions)
    if not preds:
        return None
    fitting = [p for p in preds if p.fits] or preds
    lowest = min(p.ttft_s for p in fitting)
    near = [p for p in fitting if p.ttft_s <= lowest + TIE_S]
    return min(near, key=lambda p: (p.load, p.ttft_s, p.worker))


def retry_after_s(best: TtftPrediction | None, target_ttft_s: float) -> float:
    """When a retry may meet the target: the predicted excess over it."""
    if best is None:
        return 1.0
    excess = best.ttft_s - target_ttft_s
    return min(max(excess, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)


@dataclass(frozen=True)
class Rejection:
    retry_after_s: float
    reason: str


def should_reject(
    best: TtftPrediction | None, target_ttft_s: float, policy: ClassPolicy
) -> Rejection | None:
    """A REJECT class's verdict on a new request; None means "admit or queue"."""
    if policy.on_miss is not MissPolicy.REJECT or best is None:
        return None
    limit = target_ttft_s * policy.reject_factor
    if best.ttft_s <= limit:
        return None
    return Rejection(
        retry_after_s(best, target_ttft_s),
        f"predicted TTFT {best.ttft_s:.3f} s on {best.worker} exceeds "
        f"{policy.reject_factor:g} x the {target_ttft_s:.3f} s target",
    )


class Verdict(enum.Enum):
    DISPATCH = "dispatch"
    WAIT = "wait"
    LATE = "late"  # cannot meet its deadline any more: wait behind those that can
    EXPIRED = "expired"  # the client's own deadline has passed


def dispatch_verdict(
    item: QueuedRequest,
    best: TtftPrediction | None,
    now: float,
    margin_s: float = DISPATCH_MARGIN_S,
) -> Verdict:
    """Whether a queued request goes to ``best``'s worker now.

    Late binding: a request goes at once if some worker can start it now; otherwise
    it stays here until just before it must be sent to meet its deadline (slack below
    ``margin_s``). Sent earlier, it would sit in that worker's FIFO queue where a more
    urgent request arriving meanwhile could not overtake it, and it would be bound to
    that worker even if another frees up first."""
    if item.client_deadline is not None and now >= item.client_deadline:
        return Verdict.EXPIRED
    if best is None:
        return Verdict.WAIT
    if best.wait_s <= START_NOW_S or not best.fits:
        return Verdict.DISPATCH
    slack = item.deadline - now - best.ttft_s
    if 0 <= slack < margin_s:
        return Verdict.DISPATCH
    # Even an immediate start would be too late: stop competing with on-time requests.
    if not item.late and best.ttft_s - best.wait_s > item.deadline - now:
        return Verdict.LATE
    return Verdict.WAIT


def tpot_room(
    running: Iterable[DecodeProgress],
    now: float,
    decode_step_s: float,
    queued_prefill_s: float = 0.0,
) -> float:
    """Prefill time a worker can still take without its decoding requests missing
    their TPOT targets: their smallest TPOT slack (``policy/slack.py``, the rule the
    LayerKV engine scheduler applies to early admissions), less the prefills already
    queued there. Every prefill stalls every decode on the worker once, so a request
    whose prefill does not fit waits here rather than break the others' targets."""
    return min_slack(running, now, decode_step_s) - queued_prefill_s


def route_verdict(
    item: QueuedRequest,
    predictions: Iterable[TtftPrediction],
    rooms: dict[str, float],
    now: float,
    margin_s: float = DISPATCH_MARGIN_S,
) -> tuple[Verdict, TtftPrediction | None]:
    """Where and whether a queued request goes now, TPOT-aware.

    Among workers whose decoding requests can absorb its prefill (``rooms``, from
    :func:`tpot_room`) the usual :func:`dispatch_verdict` applies. When none can, it
    waits for room while it can afford to; once waiting longer would make it miss its
    own TTFT target, it goes to the best worker anyway (as stock vLLM would run it):
    its own target is not sacrificed to others' TPOT. A request already past its
    deadline waits for room."""
    preds = list(predictions)
    roomy = best_prediction(p for p in preds if p.prefill_s <= rooms.get(p.worker, math.inf))
    if roomy is not None:
        return dispatch_verdict(item, roomy, now, margin_s), roomy
    best = best_prediction(preds)
    verdict = dispatch_verdict(item, best, now, margin_s)
    can_wait = best is not None and (item.late or item.deadline - now - best.ttft_s >= margin_s)
    if verdict is Verdict.DISPATCH and best is not None and best.fits and can_wait:
        return Verdict.WAIT, best
    return verdict, best


def deadline_for(arrival: float, ttft_target_s: float, client_deadline: float | None) -> float:
    """A request's TTFT deadline: its class target, or the client's deadline if sooner."""
    due = arrival + ttft_target_s
    if client_deadline is not None and math.isfinite(client_deadline):
        due = min(due, client_deadline)
    return due
