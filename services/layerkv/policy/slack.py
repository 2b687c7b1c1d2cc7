"""TPOT slack of running requests: how much extra stall their SLOs can absorb.

A decoding request with TPOT target ``T`` that produced ``n`` tokens, the first at
``t1``, and has ``E`` tokens still to go, meets its target iff its remaining ``E``
intervals, each taking one decode step ``d`` plus whatever prefill we insert, finish
within ``T * (n - 1 + E) - (now - t1)``. The slack is that budget minus ``E * d``:
an admitted prefill stalls every running decode once, so it may be inserted only when
it is shorter than the smallest slack (LayerKV's SLO-aware scheduling).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeProgress:
    """What the slack of one running request depends on."""

    tpot_target_s: float | None
    output_tokens: int
    first_token_time_s: float | None
    remaining_tokens: int
    # When its first token was due (its TTFT deadline); None = not known here.
    first_token_due_s: float | None = None


def tpot_slack(progress: DecodeProgress, now_s: float, decode_step_s: float) -> float:
    """Seconds of stall the request can absorb and still meet its TPOT target;
    +inf for requests without a target or still in prefill (their TTFT, not TPOT,
    is at stake)."""
    if (
        progress.tpot_target_s is None
        or progress.first_token_time_s is None
        or progress.output_tokens < 1
    ):
        return math.inf
    intervals_total = progress.output_tokens - 1 + progress.remaining_tokens
    budget = progress.tpot_target_s * intervals_total
    spent = now_s - progress.first_token_time_s
    future = progress.remaining_tokens * decode_step_s
    return budget - spent - future


def min_slack(progress: Iterable[DecodeProgress], now_s: float, decode_step_s: float) -> float:
    return min((tpot_slack(p, now_s, decode_step_s) for p in progress), default=math.inf)


def missed_ttft(progress: DecodeProgress) -> bool:
    """Whether its first token came after it was due: its SLO is already violated."""
    return (
        progress.first_token_due_s is not None
        and progress.first_token_time_s is not None
        and progress.first_token_time_s > progress.first_token_due_s
    )


def protected_slack(
    progress: DecodeProgress,
    now_s: float,
    decode_step_s: float,
    best_step_s: float | None = None,
) -> float:
    """:func:`tpot_slack`, for the requests whose SLO can still be met; +inf for the
    others (first token late, or a TPOT budget that even the best step cannot meet).
    Stalling a request that violates its SLO whatever happens next changes nothing
    for it, and protecting it would hold back requests that can still make it: under
    overload, that is how one lost cause turns into several.

    A request behind at ``decode_step_s`` (today's step, with everyone on the worker
    decoding) is not lost yet if it would catch up at ``best_step_s`` (the worker's
    step with it alone): it can still make it if nothing else stalls it, so it is
    protected with no room at all (0). Given up at today's step instead, a request
    that the guard's own prefills had left a few milliseconds short was taken for
    lost and had more prefills sent over it (docs/decisions/0001-tpot-guard.md)."""
    if missed_ttft(progress):
        return math.inf
    slack = tpot_slack(progress, now_s, decode_step_s)
    if slack >= 0:
        return slack
    if best_step_s is not None and tpot_slack(progress, now_s, best_step_s) >= 0:
        return 0.0
    return math.inf


def protected_slacks(
    progress: Iterable[DecodeProgress],
    now_s: float,
    decode_step_s: float,
    best_step_s: float | None = None,
) -> list[tuple[float, int]]:
    """``(slack, remaining tokens)`` of each request :func:`protected_slack` protects:
    how much one more prefill may stall it, and over how many more steps a slower
    step would eat into that."""
    out = []
    for p in progress:
        slack = protected_slack(p, now_s, decode_step_s, best_step_s)
        if slack != math.inf:
            out.append((slack, p.remaining_tokens))
    return out


def admit_early(min_slack_s: float, already_inserted_s: float, predicted_prefill_s: float) -> bool:
    """Whether one more early-admitted prefill fits in the running requests' slack,
    on top of the prefill time already inserted in this step."""
    return already_inserted_s + predicted_prefill_s <= min_slack_s
