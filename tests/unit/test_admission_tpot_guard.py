"""The dispatch TPOT guard: a request goes only to a worker whose decoding requests'
TPOT slack covers its prefill (``tpot_guard.worker_room``, applied in
``Dispatcher.dispatch``). Worker state is set by hand; no network is used."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from layerkv.admission.dispatcher import Dispatcher, queued_request
from layerkv.admission.outcomes import OutcomeRecorder
from layerkv.admission.request_state import Rejected, Routed
from layerkv.admission.server import AdmissionService
from layerkv.admission.slo_classes import SloCatalog
from layerkv.admission.workers import WorkerPool
from layerkv.common.slo import SloTarget
from layerkv.policy.queue import QueuedRequest
from layerkv.policy.routing import (
    ClassPolicy,
    MissPolicy,
    Verdict,
    prefill_reserve,
    route_verdict,
)
from layerkv.policy.slack import DecodeProgress
from layerkv.policy.tpot_guard import (
    has_room,
    worker_room,
)
from layerkv.policy.ttft import TtftPrediction
from layerkv.v1 import admission_pb2, worker_pb2

# Prefill 10 ms + 0.1 ms per token; decode step 10 ms.
LOAD = dict(
    kv_blocks_total=200,
    kv_blocks_free=200,
    config=worker_pb2.EngineConfig(block_size=32),
    max_num_seqs=16,
    prefill_s_coeffs=[0.01, 1e-4, 0.0],
    decode_step_s=0.010,
    latency_samples=10,
)


def test_tpot_room_is_the_smallest_slack_less_queued_prefills():
    now = 100.0
    # 10 tokens in 0.09 s at a 20 ms target, 10 to go at 5 ms: budget 19 x 0.02 =
    # 0.38, spent 0.09, future 0.05 -> 0.24 s of slack.
    tight = DecodeProgress(0.02, 10, now - 0.09, 10)
    loose = DecodeProgress(1.0, 10, now - 0.09, 10)
    assert worker_room([tight, loose], now, 0.005, 0.005).prefill_s == pytest.approx(0.24)
    queued = worker_room([tight], now, 0.005, 0.005, queued_prefill_s=0.04)
    assert queued.prefill_s == pytest.approx(0.20)
    assert worker_room([], now, 0.005, 0.005).prefill_s == math.inf  # nothing decoding


def test_a_long_prompt_costs_room_for_the_context_it_adds_to_every_step():
    # One protected request with 0.2 s of slack (budget 96 x 50 ms, 0.8 s spent, 80
    # tokens to go at 47.5 ms). Each token of a new request's context adds 1.3 us to
    # every later step, on each of those 80 tokens: a 100-token prompt leaves 0.19 s
    # for its 20 ms prefill; a 1500-token one leaves 44 ms, too little for 160 ms.
    now = 100.0
    protected = DecodeProgress(0.05, 17, now - 0.8, 80)
    room = worker_room([protected], now, 0.0475, 0.004, step_s_per_token=1.3e-6)
    assert room.prefill_s == pytest.approx(0.2)
    short = QueuedRequest("s", "c", now, now + 1, 1.0, prompt_tokens=100, max_tokens=10)
    long = QueuedRequest("l", "c", now, now + 1, 1.0, prompt_tokens=1500, max_tokens=10)
    assert has_room(short, TtftPrediction("w", 0.02, 0, 0, 0.02, 1), room)
    assert not has_room(long, TtftPrediction("w", 0.16, 0, 0, 0.16, 1), room)
    # Where the step does not depend on context, the long prefill fits.
    blind = worker_room([protected], now, 0.0475, 0.004)
    assert has_room(long, TtftPrediction("w", 0.16, 0, 0, 0.16, 1), blind)


def test_a_request_that_can_wait_goes_only_where_its_prefill_leaves_slack_to_spare():
    # The same protected request, 0.2 s of slack; a long prompt (100 ms prefill, 1.5 s
    # TTFT target) fits it, but the guard's slack is a prediction: while the request
    # can wait, it asks for room to spare, up to its prefill again, none once due.
    now = 100.0
    room = {"w": worker_room([DecodeProgress(0.05, 17, now - 0.8, 80)], now, 0.0475, 0.004)}
    pred = TtftPrediction("w", 0.1, 0, 0, 0.1, 1)
    item = QueuedRequest("b", "c", now, now + 1.5, 1.5, prompt_tokens=1000, max_tokens=10)
    assert has_room(item, pred, room["w"])
    # Arrived: it can wait (1.5 - 0.1 - 0.3) / 1.5 = 0.73 of its target, so asks for
    # 0.73 x its prefill more, 0.173 s of room in all... which 0.2 s covers; where the
    # slack is 0.15 s it waits.
    assert prefill_reserve(item, pred, now) == pytest.approx(1.1 / 1.5)
    verdict, chosen = route_verdict(item, [pred], room, now)
    assert verdict is Verdict.DISPATCH and chosen.worker == "w"
    room = {"w": worker_room([DecodeProgress(0.05, 17, now - 0.85, 80)], now, 0.0475, 0.004)}
    assert room["w"].prefill_s == pytest.approx(0.15)
    assert route_verdict(item, [pred], room, now)[0] is Verdict.WAIT
    # 0.9 s later it can wait 0.13 of its target: 0.113 s of room will do.
    assert prefill_reserve(item, pred, now + 0.9) == pytest.approx(0.2 / 1.5)
    verdict, chosen = route_verdict(item, [pred], room, now + 0.9)
    assert verdict is Verdict.DISPATCH and chosen.worker == "w"
    # Due: no reserve at all.
    assert prefill_reserve(item, pred, now + 1.2) == 0.0
    # Where nothing decodes there is nothing to spare room for: it goes at once.
    assert route_verdict(item, [pred], {"w": worker_room([], now, 0.005, 0.004)}, now)[0] is (
        Verdict.DISPATCH
    )


async def dispatcher_with(
    loads: dict[str, list[tuple[str, float, int]]], queued_prompts: dict[str, int] | None = None
) -> Dispatcher:
    """Workers with the given decoding requests: (id, TPOT target, tokens so far),
    each started 10 ms per token ago and going to 100 tokens; and optionally one
    queued prompt of the given length."""
    pool = WorkerPool(list(loads))
    dispatcher = Dispatcher(pool, SloCatalog([SloTarget("c", 1.0, 0.02)], None))
    now = time.monotonic()
    for w in pool.workers:
        running = loads[w.address]
        waiting = []
        if queued_prompts and w.address in queued_prompts:
            waiting = [
                worker_pb2.RequestProgress(
                    request_id="q", prompt_tokens=queued_prompts[w.address], max_tokens=10
                )
            ]
        w.load = worker_pb2.WorkerLoad(
            running=len(running), waiting=len(waiting), requests=waiting, **LOAD
        )
        w.load_at, w.reachable = now, True
        for rid, tpot, tokens in running:
            w.dispatched(rid, 100, 100, tpot)
            w.streamed(rid, tokens)
            w.local[rid].first_token_at = now - 0.01 * tokens
    return dispatcher


def queued_and_dispatched(
    dispatcher: Dispatcher, rid: str, prompt_tokens: int, ttft_s: float = 1.0
) -> QueuedRequest:
    """A request queued, then one dispatch pass (it may go, or stay queued)."""
    item = queued(dispatcher, rid, prompt_tokens, ttft_s)
    dispatcher.dispatch()
    return item


def queued(
    dispatcher: Dispatcher, rid: str, prompt_tokens: int, ttft_s: float = 1.0
) -> QueuedRequest:
    now = time.monotonic()
    item = QueuedRequest(
        rid, "c", now, now + ttft_s, ttft_s, prompt_tokens=prompt_tokens, max_tokens=10,
        tpot_target_s=0.02, payload=asyncio.get_running_loop().create_future(),
    )  # fmt: skip
    dispatcher.queue.push(item)
    return item


async def test_a_prefill_goes_to_the_worker_whose_decodes_can_absorb_it():
    # On "tight:1" a request 19 intervals in at 12 ms, 80 to go at 10 ms, against an
    # 11.5 ms target, has 99 x 11.5 - 228 - 800 = 110 ms of slack: a 1500-token
    # prefill (160 ms) would break it. "idle:1" decodes nothing but has a prompt
    # queued, so without the guard "tight:1" would predict the sooner first token.
    dispatcher = await dispatcher_with(
        {"tight:1": [("t", 0.0115, 20)], "idle:1": []}, queued_prompts={"idle:1": 800}
    )
    dispatcher.pool.workers[0].local["t"].first_token_at = time.monotonic() - 0.012 * 19
    try:
        preds = {p.worker: p for p in dispatcher.view().predictions(1500, 10)}
        assert preds["tight:1"].ttft_s < preds["idle:1"].ttft_s
        # Due in 0.4 s: too close to wait for a worker that could start it at once.
        item = queued_and_dispatched(dispatcher, "long", 1500, ttft_s=0.4)
        assert item.payload.done() and item.payload.result().worker.address == "idle:1"
        # A short prompt (20 ms) fits in the tight worker's slack: either may take it.
        small = queued_and_dispatched(dispatcher, "short", 100)
        assert small.payload.done()
    finally:
        await dispatcher.pool.close()


async def test_a_prefill_no_worker_can_absorb_waits_in_admission():
    # 30 tokens at 10 ms against 10.5 ms, 70 to go at 10 ms: 40 ms of slack each.
    dispatcher = await dispatcher_with({"a:1": [("x", 0.0105, 30)], "b:1": [("y", 0.0105, 30)]})
    try:
        item = queued_and_dispatched(dispatcher, "long", 1500)
        assert not item.payload.done() and len(dispatcher.queue) == 1
        # The decoding requests finish: it goes.
        for w in dispatcher.pool.workers:
            for rid in list(w.local):
                w.finished(rid)
        dispatcher.dispatch()
        assert item.payload.done()
    finally:
        await dispatcher.pool.close()


async def test_a_request_due_now_waits_rather_than_break_a_running_one():
    # Same two tight workers, and a request its class may reject (at 10 x its target
    # here) is due in 0.3 s: sent now, it would meet its own TTFT but break the TPOT
    # of a request that can still meet its SLO. It waits, past its bounded hold too,
    # until a worker has prefill room: then it goes there.
    dispatcher = await dispatcher_with({"a:1": [("x", 0.0105, 30)], "b:1": [("y", 0.0105, 30)]})
    dispatcher.catalog = SloCatalog(
        [SloTarget("c", 1.0, 0.02)], None, {"c": ClassPolicy(MissPolicy.REJECT, 10.0)}
    )
    try:
        item = queued_and_dispatched(dispatcher, "due", 1500, ttft_s=0.3)
        assert not item.payload.done()
        item.arrival -= dispatcher.max_hold_factor * item.ttft_target_s
        dispatcher.dispatch()
        assert not item.payload.done()
        dispatcher.pool.workers[1].finished("y")
        dispatcher.dispatch()
        assert item.payload.done() and item.payload.result().worker.address == "b:1"
    finally:
        await dispatcher.pool.close()


async def test_a_queue_class_request_due_now_goes_where_it_does_least_harm():
    # A queue class must serve the request anyway: held past its deadline it would
    # miss its own TTFT and still stall decodes later. Due in 2 s it waits for room;
    # due in 0.3 s it goes, to the worker whose tightest slack its 160 ms prefill
    # overruns least: "y" (11 ms target) has 99 x 11 - 300 - 700 = 89 ms, "x" 40 ms.
    dispatcher = await dispatcher_with({"a:1": [("x", 0.0105, 30)], "b:1": [("y", 0.0110, 30)]})
    try:
        item = queued_and_dispatched(dispatcher, "due", 1500, ttft_s=2.0)
        assert not item.payload.done()
        item.deadline = time.monotonic() + 0.3
        dispatcher.dispatch()
        assert item.payload.done() and item.payload.result().worker.address == "b:1"
    finally:
        await dispatcher.pool.close()


def test_a_queue_class_request_that_can_no_longer_make_it_waits_for_room():
    # No room anywhere (50 ms of slack, a 100 ms prefill). Due now and still able to
    # meet its deadline, a queue-class request goes where it does least harm; predicted
    # past its deadline, it has missed already and waits for room instead.
    now = 100.0
    rooms = {"w": worker_room([DecodeProgress(0.05, 17, now - 0.95, 80)], now, 0.0475, 0.004)}
    pred = TtftPrediction("w", 0.15, 0.05, 0, 0.1, 1)
    assert not has_room(
        QueuedRequest("x", "c", now, now, 1.5, prompt_tokens=1000), pred, rooms["w"], 1.0
    )
    in_time = QueuedRequest("b", "c", now, now + 0.2, 1.5, prompt_tokens=1000, max_tokens=10)
    verdict, chosen = route_verdict(in_time, [pred], rooms, now, must_serve=True)
    assert verdict is Verdict.DISPATCH and chosen is pred
    too_late = QueuedRequest("b", "c", now, now + 0.12, 1.5, prompt_tokens=1000, max_tokens=10)
    assert route_verdict(too_late, [pred], rooms, now, must_serve=True)[0] in (
        Verdict.WAIT,
        Verdict.LATE,
    )


async def test_a_late_queue_class_request_goes_where_it_does_least_harm_after_the_hold():
    # Two tight workers, no room for a 160 ms prefill: a queue-class request already
    # past its deadline waits for room, but only for max_hold_factor x its target.
    dispatcher = await dispatcher_with({"a:1": [("x", 0.0105, 30)], "b:1": [("y", 0.0110, 30)]})
    try:
        item = queued(dispatcher, "late", 1500, ttft_s=0.5)
        item.deadline = time.monotonic() - 0.01
        dispatcher.dispatch()
        assert not item.payload.done()
        item.arrival -= dispatcher.max_hold_factor * item.ttft_target_s
        dispatcher.dispatch()
        assert item.payload.done() and item.payload.result().worker.address == "b:1"
    finally:
        await dispatcher.pool.close()


async def test_a_reject_class_request_that_waited_too_long_for_room_is_rejected():
    # A reject class (factor 2) on the same two tight workers: the request waits for
    # room; once its wait + the best prediction exceed 2x its target it is refused
    # with a retry-after, not sent late into decodes it would stall.
    dispatcher = await dispatcher_with({"a:1": [("x", 0.0105, 30)], "b:1": [("y", 0.0105, 30)]})
    dispatcher.catalog = SloCatalog(
        [SloTarget("c", 1.0, 0.02)], None, {"c": ClassPolicy(MissPolicy.REJECT, 2.0)}
    )
    try:
        item = queued_and_dispatched(dispatcher, "r", 1500, ttft_s=1.0)
        assert not item.payload.done()
        item.arrival -= 1.9  # waited 1.9 s; + a 160 ms prefill > 2 x 1 s
        dispatcher.dispatch()
        assert item.payload.done() and len(dispatcher.queue) == 0
        err = item.payload.exception()
        assert isinstance(err, Rejected) and err.rejection.retry_after_s > 0
        assert "TPOT" in err.rejection.reason
    finally:
        await dispatcher.pool.close()


async def test_requests_that_already_violate_their_slo_hold_nothing_back():
    # The same tight decodes, but on "a:1" the first token came after its TTFT
    # deadline and on "b:1" the TPOT budget is overspent (30 tokens in 0.6 s against
    # 10.5 ms): stalling them changes nothing for their SLO, so the prefill goes.
    dispatcher = await dispatcher_with({"a:1": [("x", 0.0105, 30)], "b:1": [("y", 0.0105, 30)]})
    a, b = dispatcher.pool.workers
    a.local["x"].first_token_due = a.local["x"].first_token_at - 0.001
    b.local["y"].first_token_at = time.monotonic() - 0.6
    try:
        item = queued_and_dispatched(dispatcher, "long", 1500)
        assert item.payload.done() and item.payload.result().worker.address == "a:1"
    finally:
        await dispatcher.pool.close()


async def test_a_request_behind_only_at_todays_step_still_holds_prefills_back():
    # On "a:1" "x" (12 ms target) and two loose requests decode at 13 ms a step (10 ms
    # + 1 ms per request, with the new one): "x", 30 tokens in 0.3 s with 70 to go, is
    # 92 ms behind at that step but 118 ms ahead at the 11 ms step it would get alone.
    # It can still make it, so a 1500-token prefill (160 ms) goes to "b:1" instead,
    # though "b:1" has a prompt queued and "a:1" would give the sooner first token.
    dispatcher = await dispatcher_with(
        {"a:1": [("x", 0.012, 30), ("l1", 1.0, 30), ("l2", 1.0, 30)], "b:1": []},
        queued_prompts={"b:1": 800},
    )
    for w in dispatcher.pool.workers:
        w.load.decode_step_s_per_seq = 0.001
    try:
        preds = {p.worker: p for p in dispatcher.view().predictions(1500, 10)}
        assert preds["a:1"].ttft_s < preds["b:1"].ttft_s
        item = queued_and_dispatched(dispatcher, "long", 1500, ttft_s=0.4)
        assert item.payload.done() and item.payload.result().worker.address == "b:1"
    finally:
        await dispatcher.pool.close()


async def test_a_request_sent_but_not_started_is_protected_too():
    # "p" was sent to the only worker and has no first token yet. Whatever is sent
    # there after it is prefilled after its own prefill, into its decode: 99 intervals
    # at the 10 ms step against an 11.5 ms target leave 99 x 1.5 = 148 ms of slack,
    # less its own queued prefill (100 tokens, 20 ms). Both due soon (a class that
    # may reject, so that nothing goes without room), a 1500-token prompt (160 ms)
    # waits; a 100-token one (20 ms) goes.
    dispatcher = await dispatcher_with({"a:1": []})
    dispatcher.catalog = SloCatalog(
        [SloTarget("c", 1.0, 0.02)], None, {"c": ClassPolicy(MissPolicy.REJECT, 10.0)}
    )
    (w,) = dispatcher.pool.workers
    try:
        w.dispatched("p", 100, 100, 0.0115, first_token_due=time.monotonic() + 1.0)
        long = queued_and_dispatched(dispatcher, "long", 1500, ttft_s=0.4)
        assert not long.payload.done()
        short = queued_and_dispatched(dispatcher, "short", 100, ttft_s=0.3)
        assert short.payload.done() and short.payload.result().worker is w
        w.finished("short")
        # Its first token is due and not there: it has missed its SLO, and holds
        # nothing back any more.
        w.local["p"].first_token_due = time.monotonic() - 0.001
        dispatcher.dispatch()
        assert long.payload.done() and long.payload.result().worker is w
    finally:
        await dispatcher.pool.close()


def stream_at(w, rid: str, tokens: int, interval_s: float) -> None:
    """``tokens`` token messages of ``rid``, ``interval_s`` apart, the last one now."""
    start = time.monotonic() - interval_s * (tokens - 1)
    for i in range(tokens):
        w.streamed(rid, 1, now=start + interval_s * i)


async def test_the_room_uses_the_cadence_tokens_stream_at():
    # One request decoding, 30 tokens against a 20 ms target, 70 to go, tokens 10 ms
    # apart so far (0.29 s): with the engine's 10 ms step its slack is
    # 99 x 20 - 290 - 700 = 990 ms, room for a 6000-token prefill (610 ms). Once its
    # tokens stream 15 ms apart (0.435 s so far; 1.5x the engine's step) the 70 to go
    # take 1.05 s, the slack is 495 ms: a 6000-token prompt waits, a 1500-token one
    # (160 ms) goes.
    dispatcher = await dispatcher_with({"a:1": []})
    (w,) = dispatcher.pool.workers
    try:
        w.dispatched("x", 100, 100, 0.020)
        w.streamed("x", 1, now=time.monotonic() - 0.29)  # first token: no interval yet
        w.local["x"].first_token_at = time.monotonic() - 0.29
        w.local["x"].output_tokens = 30
        big = queued_and_dispatched(dispatcher, "big", 6000)
        assert big.payload.done()
        w.local.pop("big")
        w.dispatched("x", 100, 100, 0.020)
        stream_at(w, "x", 30, 0.015)
        again = queued_and_dispatched(dispatcher, "big2", 6000)
        assert not again.payload.done()
        small = queued_and_dispatched(dispatcher, "small", 1500)
        assert small.payload.done()
    finally:
        await dispatcher.pool.close()


async def streaming_past_its_budget(interval_s: float) -> Dispatcher:
    """One worker (engine step 10 ms + 2 ms per sequence) where "x", against a 10 ms
    TPOT target, has streamed 30 tokens ``interval_s`` apart: unprotected, so any
    prefill fits, and the step there is as slow as its tokens came."""
    dispatcher = await dispatcher_with({"a:1": []})
    (w,) = dispatcher.pool.workers
    w.load.decode_step_s_per_seq = 0.002
    w.dispatched("x", 100, 100, 0.010)
    stream_at(w, "x", 30, interval_s)
    return dispatcher


async def test_a_request_waits_where_the_decode_step_is_too_slow_for_its_own_target():
    # Engine step 10 ms + 2 ms per sequence. The request decoding there is past its own
    # TPOT budget (unprotected: any prefill fits), but its tokens stream 18 ms apart,
    # 1.5x the engine's 12 ms step for one sequence: with one more, every step takes
    # 1.5 x 14 = 21 ms, more than 0.8 of a new request's 20 ms target. It waits.
    dispatcher = await streaming_past_its_budget(0.018)
    (w,) = dispatcher.pool.workers
    try:
        item = queued_and_dispatched(dispatcher, "short", 100)
        assert not item.payload.done()
        # The slow decode ends. Alone there it would step 1.5 x 12 = 18 ms, still over
        # 0.8 x 20 ms, but no worker does better than idle: holding it gains nothing.
        w.finished("x")
        dispatcher.dispatch()
        assert item.payload.done()
    finally:
        await dispatcher.pool.close()


async def test_a_request_due_now_takes_a_step_that_meets_its_own_target():
    # Engine step 10 ms + 2 ms per sequence; "x" (unprotected: past its budget) streams
    # 15 ms apart, 1.25x the engine's 12 ms: with one more decode every step takes
    # 1.25 x 14 = 17.5 ms, over 0.8 of a new request's 20 ms target, under the target
    # itself. Due in 2 s, the request waits for a better moment; due now, it goes.
    dispatcher = await streaming_past_its_budget(0.015)
    try:
        item = queued_and_dispatched(dispatcher, "short", 100, ttft_s=2.0)
        assert not item.payload.done()
        item.deadline = time.monotonic() + 0.2
        dispatcher.dispatch()
        assert item.payload.done()
    finally:
        await dispatcher.pool.close()


async def route(dispatcher: Dispatcher, rid: str, prompt_tokens: int) -> list:
    """What ``route`` yields for a new request with nothing ahead of it, up to the
    point where it would wait for a dispatch pass."""
    target = dispatcher.catalog.get("c")
    steps = dispatcher.route(
        queued_request(rid, target, prompt_tokens, 10, 0, None, time.monotonic())
    )
    out = [await anext(steps)]
    if not isinstance(out[0], Routed):
        await steps.aclose()  # leaves the queue as it found it
    return out


async def test_an_arrival_with_an_empty_queue_is_decided_as_a_dispatch_pass_would():
    # The fast path (empty queue: decided without queueing) keeps the guard: the
    # 1500-token prompt no worker can absorb is held (QUEUED), the 100-token one goes.
    dispatcher = await dispatcher_with({"a:1": [("x", 0.0105, 30)], "b:1": [("y", 0.0105, 30)]})
    try:
        (held,) = await route(dispatcher, "long", 1500)
        assert not isinstance(held, Routed)
        assert held.kind == admission_pb2.DECISION_KIND_QUEUED
        assert len(dispatcher.queue) == 0 and "long" not in dispatcher.pool.workers[0].local
        (sent,) = await route(dispatcher, "short", 100)
        assert isinstance(sent, Routed) and sent.queued_s >= 0
        assert "short" in sent.worker.local and len(dispatcher.queue) == 0
    finally:
        await dispatcher.pool.close()


class _DryRunContext:
    """What ``Predict`` asks of its gRPC context: no client deadline, no abort."""

    def time_remaining(self) -> None:
        return None

    async def abort(self, code, details: str):
        raise AssertionError(f"aborted: {code} {details}")


async def test_the_dry_run_answers_as_the_request_would_be_decided():
    # Predict applies the guard as Generate does: on the same two tight workers the
    # 1500-token prompt would be held (QUEUED), the 100-token one sent (ADMITTED);
    # nothing is queued or sent by asking.
    dispatcher = await dispatcher_with({"a:1": [("x", 0.0105, 30)], "b:1": [("y", 0.0105, 30)]})
    service = AdmissionService(dispatcher, OutcomeRecorder(None))
    try:

        async def dry_run(prompt_tokens: int) -> admission_pb2.Decision:
            request = admission_pb2.GenerateRequest(
                prompt_token_ids=[7] * prompt_tokens, slo_class="c"
            )
            return (await service.Predict(request, _DryRunContext())).decision

        held = await dry_run(1500)
        assert held.kind == admission_pb2.DECISION_KIND_QUEUED
        assert "TPOT" in held.reason and held.predicted_ttft_s > 0
        sent = await dry_run(100)
        assert sent.kind == admission_pb2.DECISION_KIND_ADMITTED and sent.worker
        assert len(dispatcher.queue) == 0
        assert all(set(w.local) <= {"x", "y"} for w in dispatcher.pool.workers)
    finally:
        await dispatcher.pool.close()
