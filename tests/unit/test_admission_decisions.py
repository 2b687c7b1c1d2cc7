"""The pure parts of the admission's decisions (``policy/routing.py``): what a queued
request's class and its bounded hold make of the routing verdict
(:func:`queued_decision`), and a worker's TPOT room from its snapshot
(:func:`tpot_room`)."""

from __future__ import annotations

import math

import pytest

from layerkv.policy.latency import LatencyCoefficients
from layerkv.policy.queue import QueuedRequest
from layerkv.policy.routing import (
    ClassPolicy,
    MissPolicy,
    Verdict,
    queued_decision,
)
from layerkv.policy.slack import DecodeProgress
from layerkv.policy.tpot_guard import (
    NO_LIMIT,
    TpotRoom,
    tpot_room,
    worker_room,
)
from layerkv.policy.ttft import KvState, RequestLoad, TtftPrediction, WorkerSnapshot

NOW = 100.0
QUEUE = ClassPolicy(MissPolicy.QUEUE)


def request(arrival: float = NOW, deadline: float = NOW + 2.0, **kw) -> QueuedRequest:
    kw = dict(prompt_tokens=1000, max_tokens=10, tpot_target_s=0.02) | kw
    return QueuedRequest("r", "c", arrival, deadline, 2.0, **kw)


def pred(worker: str, ttft: float = 0.1, wait: float = 0.0) -> TtftPrediction:
    return TtftPrediction(worker, ttft, wait, 0.0, ttft - wait, 1)


def room(prefill_s: float, next_step_s: float = 0.005) -> TpotRoom:
    return TpotRoom(prefill_s=prefill_s, next_step_s=next_step_s, idle_step_s=0.004)


def test_a_request_with_room_goes_now_to_the_best_worker():
    preds = [pred("a", 0.2), pred("b", 0.1)]
    verdict, chosen, rejection = queued_decision(request(), preds, {}, NOW, QUEUE, 4.0)
    assert verdict is Verdict.DISPATCH and chosen.worker == "b" and rejection is None


def test_without_room_it_waits_until_its_bounded_hold_is_over():
    # "a" cannot absorb the 100 ms prefill; "b" can, but its step (30 ms) is too slow
    # for the request's own 20 ms TPOT target: it waits, for at most 4 x 2 s.
    preds = [pred("a"), pred("b")]
    rooms = {"a": room(0.05), "b": room(1.0, next_step_s=0.03)}
    held = queued_decision(request(), preds, rooms, NOW, QUEUE, 4.0)
    assert held == (Verdict.WAIT, preds[0], None)
    overdue = request(arrival=NOW - 8.0)
    verdict, chosen, rejection = queued_decision(overdue, preds, rooms, NOW, QUEUE, 4.0)
    assert verdict is Verdict.DISPATCH and chosen.worker == "b" and rejection is None
    # No hold at all.
    assert queued_decision(request(), preds, rooms, NOW, QUEUE, 0.0)[:2] == (
        Verdict.DISPATCH,
        preds[1],
    )


def test_past_its_hold_a_queue_class_goes_where_it_does_least_harm():
    # No worker can absorb its prefill: a queue class must be served anyway, a reject
    # class keeps waiting for room.
    preds = [pred("a"), pred("b")]
    rooms = {"a": room(0.02), "b": room(0.06)}
    overdue = request(arrival=NOW - 8.0)
    verdict, chosen, _ = queued_decision(overdue, preds, rooms, NOW, QUEUE, 4.0)
    assert verdict is Verdict.DISPATCH and chosen.worker == "b"
    lenient = ClassPolicy(MissPolicy.REJECT, reject_factor=100.0)
    verdict, _, rejection = queued_decision(overdue, preds, rooms, NOW, lenient, 4.0)
    assert verdict in (Verdict.WAIT, Verdict.LATE) and rejection is None


def test_a_reject_class_gives_up_on_a_request_that_waited_too_long():
    preds = [pred("a")]
    rooms = {"a": room(0.05)}
    strict = ClassPolicy(MissPolicy.REJECT, reject_factor=2.0)
    assert queued_decision(request(arrival=NOW - 3.0), preds, rooms, NOW, strict, 4.0)[2] is None
    verdict, best, rejection = queued_decision(
        request(arrival=NOW - 3.95), preds, rooms, NOW, strict, 4.0
    )
    assert verdict in (Verdict.WAIT, Verdict.LATE) and best is preds[0]
    assert rejection is not None and rejection.retry_after_s > 0


LATENCY = LatencyCoefficients(
    prefill_a_s=0.01,
    prefill_b_s=1e-4,
    decode_step_s=0.01,
    decode_step_s_per_seq=0.001,
    decode_step_s_per_token=1e-6,
)


def snapshot() -> WorkerSnapshot:
    return WorkerSnapshot(
        "w",
        KvState(block_size=16, blocks_total=100, blocks_free=50),
        LATENCY,
        running=(RequestLoad(100, 50, 20, True, "x"), RequestLoad(200, 50, 10, True, "y")),
        waiting=(RequestLoad(300, 10, 0, False, "z"),),
    )


def test_tpot_room_steps_with_the_queued_requests_and_one_more():
    # Three requests there and the new one decode (4 sequences, 630 tokens of context);
    # the queued one's prefill is taken off the room.
    progress = [DecodeProgress(0.05, 20, NOW - 0.5, 30)]
    got = tpot_room(snapshot(), 1.0, progress, NOW)
    step = 0.01 + 0.001 * 4 + 1e-6 * 630
    assert got.next_step_s == pytest.approx(step)
    assert got.idle_step_s == pytest.approx(0.011)
    assert got.queued_prefill_s == pytest.approx(0.04)
    assert got == worker_room(
        progress, NOW, LATENCY.decode_step(4, 630), LATENCY.decode_step(1),
        LATENCY.prefill_s(300), 1e-6,
    )  # fmt: skip


def test_tpot_room_scales_the_steps_by_how_slow_tokens_stream():
    progress = [DecodeProgress(0.05, 20, NOW - 0.5, 30)]
    base = tpot_room(snapshot(), 1.0, progress, NOW)
    slow = tpot_room(snapshot(), 1.5, progress, NOW)
    assert slow.next_step_s == pytest.approx(1.5 * base.next_step_s)
    assert slow.idle_step_s == pytest.approx(1.5 * base.idle_step_s)
    assert slow.step_s_per_token == pytest.approx(1.5 * base.step_s_per_token)
    assert slow.queued_prefill_s == base.queued_prefill_s  # prefill is not decode
    assert slow.prefill_s < base.prefill_s


def test_tpot_room_with_nothing_to_protect_is_unlimited():
    assert tpot_room(snapshot(), 1.0, [], NOW).prefill_s == NO_LIMIT.prefill_s == math.inf
