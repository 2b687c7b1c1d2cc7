"""The TPOT guard: how much prefill a worker's decoding requests can absorb. Pure.

Every prefill stalls every decode on its worker once, so admission sends a request
only where the decoding requests' TPOT slack (``policy/slack.py``, the rule the LayerKV
engine scheduler applies) covers its predicted prefill, and where one more decode step
still meets its own TPOT target. :func:`tpot_room` builds a worker's
:class:`TpotRoom` from its snapshot; :func:`has_room` is the check routing applies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from layerkv.policy.queue import QueuedRequest
from layerkv.policy.slack import DecodeProgress, protected_slacks
from layerkv.policy.ttft import TtftPrediction, WorkerSnapshot


@dataclass(frozen=True)
class TpotRoom:
    """What a worker's decoding can take on without missing TPOT targets."""

    # Prefill time its decoding requests can absorb (:func:`worker_room`).
    prefill_s: float = math.inf
    # The decode step every request there would take with one more decoding (before
    # its own context: see ``step_s_per_token``).
    next_step_s: float = 0.0
    # The step with one request decoding: no worker does better than idle.
    idle_step_s: float = 0.0
    # What each token of a new request's context adds to every later step (decode
    # steps read every request's KV), and what that costs: ``(slack, remaining
    # tokens)`` of each protected request, and the prefills queued ahead.
    step_s_per_token: float = 0.0
    protected: tuple[tuple[float, int], ...] = ()
    queued_prefill_s: float = 0.0

    def for_prompt(self, prompt_tokens: int) -> tuple[float, float, float]:
        """``(prefill room, next step, idle step)`` for a new request of
        ``prompt_tokens``: its context slows every step after its prefill, and each
        protected request pays that on each of its remaining tokens
        (docs/decisions/0001-tpot-guard.md)."""
        extra = self.step_s_per_token * prompt_tokens
        if extra <= 0:
            return self.prefill_s, self.next_step_s, self.idle_step_s
        room = self.prefill_s
        if self.protected:
            room = min(s - extra * n for s, n in self.protected) - self.queued_prefill_s
        return room, self.next_step_s + extra, self.idle_step_s + extra


NO_LIMIT = TpotRoom()
# A request goes only where one more decode step leaves it this share of its own TPOT
# target: the rest is the slack that later prefills on that worker may use (with the
# step at 0.8 x target, a 96-token request can absorb about one long prefill).
OWN_STEP_SHARE = 0.8


def worker_room(
    running: Iterable[DecodeProgress],
    now: float,
    step_s: float,
    idle_step_s: float,
    queued_prefill_s: float = 0.0,
    step_s_per_token: float = 0.0,
) -> TpotRoom:
    """A worker's :class:`TpotRoom`. Its ``prefill_s`` is the prefill time the worker
    can still take without its requests missing their TPOT targets: the smallest TPOT
    slack (``policy/slack.py``) at ``step_s`` (the step with one more request
    decoding) among those that can still meet their SLO (decoding, or sent and
    waiting for their first token; at ``idle_step_s``, the worker's fastest step, if
    not at ``step_s``), less the prefills already queued there. Every prefill stalls
    every decode on the worker once, so a request whose prefill does not fit waits
    here rather than break the others' targets. What a new request's own context will
    cost comes with it (:meth:`TpotRoom.for_prompt`)."""
    protected = protected_slacks(running, now, step_s, idle_step_s)
    return TpotRoom(
        min((s for s, _ in protected), default=math.inf) - queued_prefill_s,
        step_s,
        idle_step_s,
        step_s_per_token,
        tuple(protected),
        queued_prefill_s,
    )


def has_room(
    item: QueuedRequest,
    prediction: TtftPrediction,
    room: TpotRoom,
    own_step_share: float = OWN_STEP_SHARE,
    reserve: float = 0.0,
) -> bool:
    """Whether ``item`` can go to ``prediction``'s worker without breaking a decoding
    request's TPOT target there, or its own: requests that already miss their SLO
    are not protected (:func:`worker_room`), so without its own check a request would be
    sent to decode among them, at a step too slow for its target. ``reserve``: the
    room must also hold that many times its prefill more (:func:`prefill_reserve`)."""
    prefill_room, next_step, idle_step = room.for_prompt(item.prompt_tokens)
    if prediction.prefill_s * (1.0 + reserve) > prefill_room:
        return False
    own = item.tpot_target_s
    if own is None or item.max_tokens <= 1:
        return True
    # A target even an idle worker cannot keep is not the queue's to enforce: holding
    # the request would not make it any faster.
    return next_step <= max(own_step_share * own, idle_step)


def tpot_room(
    snap: WorkerSnapshot, step_factor: float, progress: Iterable[DecodeProgress], now: float
) -> TpotRoom:
    """A worker's :class:`TpotRoom` (:func:`worker_room`) from its snapshot, the
    TPOT state of the requests sent there (``progress``) and ``step_factor``."""
    lat = snap.latency
    # The step everyone there would take once the queued requests and one more
    # decode too, scaled by how much slower tokens have been streaming through
    # here than the engine's step fit says (it misses the output path around it).
    context = sum(r.prompt_tokens + r.output_tokens for r in (*snap.running, *snap.waiting))
    step = step_factor * lat.decode_step(len(snap.running) + len(snap.waiting) + 1, context)
    idle_step = step_factor * lat.decode_step(1)
    return worker_room(
        progress,
        now,
        step,
        idle_step,
        queued_prefill_s=sum(lat.prefill_s(r.prompt_tokens) for r in snap.waiting),
        step_s_per_token=step_factor * lat.decode_step_s_per_token,
    )
