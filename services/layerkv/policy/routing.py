"""Routing and admission policy: which worker, now or later, or not at all. Pure.

* Route to the worker with the best predicted TTFT (:func:`best_prediction`).
* A new request of a ``reject`` class whose best predicted TTFT exceeds its target by
  more than ``reject_factor`` is refused at once with a retry-after (the predicted
  excess): the client learns in milliseconds what it would otherwise learn as a late
  first token, and the capacity goes to requests that can still make it.
* Otherwise the request waits in the admission queue until :func:`dispatch_verdict`
  lets it go: when some worker can start it at once, or just before it must go to
  meet its deadline; and only to a worker whose decoding requests' TPOT slack covers
  its prefill (``policy/tpot_guard.py``, :func:`route_verdict`), with slack to spare while
  its own deadline allows (:func:`prefill_reserve`). Holding requests
  here rather than in the workers' FIFO queues lets urgent requests overtake and
  routes each request late, to whichever worker frees up first.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from layerkv.policy.queue import QueuedRequest
from layerkv.policy.tpot_guard import NO_LIMIT, TpotRoom, has_room
from layerkv.policy.ttft import TtftPrediction


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


def queued_rejection(
    item: QueuedRequest, best: TtftPrediction | None, now: float, policy: ClassPolicy
) -> Rejection | None:
    """A REJECT class's verdict on a request still waiting in the queue: refused once
    its first token, counted from its arrival (the wait so far + the best prediction
    now), would come later than ``reject_factor`` x its target. The check at arrival
    cannot foresee a wait for TPOT room; without this one such a request would wait on
    and then be sent late, into decodes it stalls, under overload."""
    if policy.on_miss is not MissPolicy.REJECT or best is None:
        return None
    expected = now - item.arrival + best.ttft_s
    limit = item.ttft_target_s * policy.reject_factor
    if expected <= limit:
        return None
    return Rejection(
        min(max(expected - item.ttft_target_s, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S),
        f"no worker can start it within {policy.reject_factor:g} x the "
        f"{item.ttft_target_s:.3f} s target without breaking running requests' TPOT "
        f"targets (waited {now - item.arrival:.3f} s)",
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


# A request whose whole TTFT target is still ahead goes only where its prefill leaves
# the decoding requests this many times its prefill in TPOT slack (see prefill_reserve).
PREFILL_RESERVE = 1.0


def prefill_reserve(
    item: QueuedRequest,
    prediction: TtftPrediction,
    now: float,
    margin_s: float = DISPATCH_MARGIN_S,
    most: float = PREFILL_RESERVE,
) -> float:
    """The TPOT room, in multiples of its prefill, that ``item`` leaves the decoding
    requests on ``prediction``'s worker before it goes there: ``most`` x the share of
    its TTFT target it can still wait (its deadline less the predicted TTFT and the
    dispatch margin), so none once it must go (:func:`must_go_now`).

    Why: the guard's slack is a prediction, and sending every prefill that fits used
    it to the brim: short interactive requests then missed their TPOT under long
    prefills sent because they fitted. A long prompt with a loose TTFT target can wait
    for a moment with room to spare (docs/decisions/0001-tpot-guard.md)."""
    if item.ttft_target_s <= 0:
        return 0.0
    can_wait = (item.deadline - now - prediction.ttft_s - margin_s) / item.ttft_target_s
    return most * min(max(can_wait, 0.0), 1.0)


def must_go_now(
    item: QueuedRequest, best: TtftPrediction, now: float, margin_s: float = DISPATCH_MARGIN_S
) -> bool:
    """Whether waiting any longer would make ``item`` miss its TTFT deadline (or it
    cannot meet it any more): what it waits for must then be worth its own SLO."""
    return item.deadline - now - best.ttft_s < margin_s


def least_harm_route(
    predictions: Iterable[TtftPrediction], rooms: dict[str, TpotRoom]
) -> TtftPrediction | None:
    """The worker where a prefill that fits nowhere does the least damage: the one
    whose tightest protected slack it overruns least; then the sooner first token."""
    preds = list(predictions)
    fitting = [p for p in preds if p.fits] or preds
    return max(
        fitting,
        key=lambda p: (rooms.get(p.worker, NO_LIMIT).prefill_s - p.prefill_s, -p.ttft_s),
        default=None,
    )


def overdue_route(
    predictions: Iterable[TtftPrediction], rooms: dict[str, TpotRoom]
) -> TtftPrediction | None:
    """Where a request held past its bounded hold may go: the best worker whose
    decoding requests can absorb its prefill, whatever its own TPOT then; None while
    no worker can. Past its deadline it has already missed its SLO: sending it into
    decodes it would stall would only add more misses."""
    return best_prediction(
        p for p in predictions if p.prefill_s <= rooms.get(p.worker, NO_LIMIT).prefill_s
    )


def route_verdict(
    item: QueuedRequest,
    predictions: Iterable[TtftPrediction],
    rooms: dict[str, TpotRoom],
    now: float,
    margin_s: float = DISPATCH_MARGIN_S,
    must_serve: bool = False,
) -> tuple[Verdict, TtftPrediction | None]:
    """Where and whether a queued request goes now, TPOT-aware.

    Among workers with room for it (:func:`has_room`, with room to spare while it
    can still wait: :func:`prefill_reserve`) the usual :func:`dispatch_verdict`
    applies. Once it must go to meet its deadline
    (:func:`must_go_now`), a worker whose next step meets its own TPOT target in full
    will do: the 20% margin (``OWN_STEP_SHARE``) is for requests that can wait for a
    better moment. When no worker has prefill room:

    * a request its class may reject waits for room, even past its own deadline:
      sent now, its prefill would break the TPOT target of a request that can still
      meet its SLO; held, it costs one violation (its own) at most, and the caller
      rejects it past ``reject_factor`` x its target, so its prefill never runs. Past
      the caller's bounded hold (``max_hold_factor``) it goes to the first worker with
      prefill room (:func:`overdue_route`).
    * a request that ``must_serve`` (a ``queue`` class) goes when it must go, to the
      worker where it does the least harm (:func:`least_harm_route`), while it can
      still meet its deadline: its prefill will run anyway, and held past its
      deadline it would only add its own miss and stall the decodes running later
      instead. Under sustained overload, holding such requests for room that does not
      come grew the admission queue until all of them missed.
    * one that can no longer meet it has missed its SLO whatever it does now: it waits
      for room like a rejectable request, so that its prefill does not also break the
      requests that can still meet theirs; past the bounded hold the caller sends it
      anyway. In a burst that the workers cannot absorb, sending these at once took
      the room of the requests behind them (docs/decisions/0001-tpot-guard.md).

    A request that cannot fit on any worker at all goes at once (its error is the
    worker's to give)."""
    preds = list(predictions)
    roomy = best_prediction(
        p
        for p in preds
        if has_room(
            item,
            p,
            rooms.get(p.worker, NO_LIMIT),
            reserve=prefill_reserve(item, p, now, margin_s),
        )
    )
    if roomy is not None:
        return dispatch_verdict(item, roomy, now, margin_s), roomy
    best = best_prediction(preds)
    verdict = dispatch_verdict(item, best, now, margin_s)
    if (
        best is not None
        and verdict is not Verdict.EXPIRED
        and must_go_now(item, best, now, margin_s)
    ):
        due = best_prediction(
            p for p in preds if has_room(item, p, rooms.get(p.worker, NO_LIMIT), 1.0)
        )
        if due is not None:
            return Verdict.DISPATCH, due
        if must_serve and item.deadline - now - best.ttft_s >= 0:
            return Verdict.DISPATCH, least_harm_route(preds, rooms)
    if verdict is Verdict.DISPATCH and best is not None and best.fits:
        if not item.late and best.ttft_s - best.wait_s > item.deadline - now:
            return Verdict.LATE, best
        return Verdict.WAIT, best
    return verdict, best


def deadline_for(arrival: float, ttft_target_s: float, client_deadline: float | None) -> float:
    """A request's TTFT deadline: its class target, or the client's deadline if sooner."""
    due = arrival + ttft_target_s
    if client_deadline is not None and math.isfinite(client_deadline):
        due = min(due, client_deadline)
    return due


def queued_decision(
    item: QueuedRequest,
    predictions: list[TtftPrediction],
    rooms: dict[str, TpotRoom],
    now: float,
    policy: ClassPolicy,
    max_hold_factor: float,
) -> tuple[Verdict, TtftPrediction | None, Rejection | None]:
    """What to do with ``item`` now: its verdict (:func:`route_verdict`), the worker
    prediction it would go with, and a rejection if its class gives up on it
    (:func:`queued_rejection`). A request held for TPOT room goes after
    ``max_hold_factor`` x its TTFT target to a worker with prefill room
    (:func:`overdue_route`), or (a queue class, which must be served) to the one where
    it does least harm (:func:`least_harm_route`): bounded hold, no starvation."""
    must_serve = policy.on_miss is MissPolicy.QUEUE
    verdict, best = route_verdict(item, predictions, rooms, now, must_serve=must_serve)
    if verdict in (Verdict.WAIT, Verdict.LATE):
        rejection = queued_rejection(item, best, now, policy)
        if rejection is not None:
            return verdict, best, rejection
        if now - item.arrival >= max_hold_factor * item.ttft_target_s:
            overdue = overdue_route(predictions, rooms)
            if overdue is None and must_serve:
                # It must be served: the hold is as long as it waits for room.
                overdue = least_harm_route(predictions, rooms)
            if overdue is not None:
                return Verdict.DISPATCH, overdue, None
    return verdict, best, None
