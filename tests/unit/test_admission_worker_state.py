"""The admission's view of one worker: the last load report merged with what admission
did since (pure parts of ``admission/workers.py``), and address discovery."""

from __future__ import annotations

import time

import pytest

from layerkv.admission.worker_state import WorkerEndpoint
from layerkv.admission.workers import resolve
from layerkv.policy.latency import LatencyCoefficients
from layerkv.v1 import worker_pb2

PRIOR = LatencyCoefficients()


def progress(rid, prompt, out, max_tokens, started):
    return worker_pb2.RequestProgress(
        request_id=rid,
        prompt_tokens=prompt,
        output_tokens=out,
        max_tokens=max_tokens,
        started=started,
    )


def endpoint(load: worker_pb2.WorkerLoad) -> WorkerEndpoint:
    ep = WorkerEndpoint("w:1", channel=None, stub=None)
    ep.load, ep.load_at, ep.reachable = load, time.monotonic(), True
    return ep


def load(**kw) -> worker_pb2.WorkerLoad:
    base = dict(
        kv_blocks_total=100,
        kv_blocks_free=50,
        config=worker_pb2.EngineConfig(block_size=32),
        max_num_seqs=16,
    )
    base.update(kw)
    return worker_pb2.WorkerLoad(**base)


def test_report_is_used_with_its_fit_and_requests():
    ep = endpoint(
        load(
            running=1,
            requests=[progress("a", 320, 10, 100, True), progress("b", 64, 0, 8, False)],
            prefill_s_coeffs=[0.02, 1e-4, 0.0],
            decode_step_s=0.01,
            decode_step_s_per_seq=0.001,
            latency_samples=9,
        )
    )
    snap = ep.snapshot(PRIOR)
    assert [r.request_id for r in snap.running] == ["a"]
    assert [r.request_id for r in snap.waiting] == ["b"]
    assert snap.latency.prefill_a_s == 0.02 and snap.latency.samples == 9
    assert snap.kv.blocks_free == 50 and snap.max_num_seqs == 16
    assert ep.routable(time.monotonic(), stale_after_s=1.0)
    assert not ep.routable(time.monotonic() + 2.0, stale_after_s=1.0)


def test_the_step_fit_with_context_is_used_when_the_worker_has_one():
    fit = dict(prefill_s_coeffs=[0.02, 1e-4, 0.0], decode_step_s=0.01, latency_samples=9)
    by_count = endpoint(load(decode_step_s_per_seq=0.002, **fit)).snapshot(PRIOR).latency
    assert by_count.decode_step(2, 5000) == pytest.approx(0.014)
    with_context = (
        endpoint(
            load(decode_step_s_per_seq=0.002, decode_step_coeffs=[0.004, 0.0004, 1.3e-6], **fit)
        )
        .snapshot(PRIOR)
        .latency
    )
    assert with_context.decode_step(2, 5000) == pytest.approx(0.004 + 0.0008 + 0.0065)
    # A malformed context fit (wrong length, NaN, negative) is ignored for the count fit.
    for bad in ([0.004, 0.0004], [0.004, float("nan"), 1e-6], [0.004, 0.0004, -1e-6]):
        odd = endpoint(load(decode_step_s_per_seq=0.002, decode_step_coeffs=bad, **fit))
        assert odd.snapshot(PRIOR).latency.decode_step(2, 5000) == pytest.approx(0.014), bad


def test_no_fit_yet_uses_the_prior():
    assert endpoint(load()).snapshot(PRIOR).latency == PRIOR


def test_requests_dispatched_and_finished_since_the_report():
    ep = endpoint(load(running=1, requests=[progress("a", 320, 10, 100, True)]))
    ep.dispatched("a", 320, 100)  # "a" came through this admission service too
    ep.streamed("a", 10)
    ep.dispatched("new", 64, 8)
    snap = ep.snapshot(PRIOR)
    assert [r.request_id for r in snap.waiting] == ["new"]
    ep.streamed("new", 1)  # first token: 65 tokens now hold 3 blocks
    snap = ep.snapshot(PRIOR)
    assert {r.request_id for r in snap.running} == {"a", "new"}
    assert snap.kv.blocks_free == 47
    ep.finished("a")  # its 11 blocks are free although the report still lists it
    snap = ep.snapshot(PRIOR)
    assert [r.request_id for r in snap.running] == ["new"]
    assert snap.kv.blocks_free == 47 + 11


def test_prefilling_request_counts_as_running():
    # The engine runs 2 requests, one without a token yet: it is prefilling (its
    # blocks are already taken), not queued.
    requests = [progress("old", 100, 50, 200, True), progress("pf", 500, 0, 10, False)]
    snap = endpoint(load(running=2, waiting=0, requests=requests)).snapshot(PRIOR)
    assert [r.request_id for r in snap.running] == ["old", "pf"] and not snap.waiting


def test_preempted_request_waits_again_and_recomputes():
    # Both had started, but the engine runs 1 and has 1 waiting: the newest was
    # preempted (vLLM's order) and must recompute prompt + output before going on.
    requests = [progress("old", 100, 50, 200, True), progress("newest", 100, 20, 200, True)]
    snap = endpoint(load(running=1, waiting=1, requests=requests)).snapshot(PRIOR)
    assert [r.request_id for r in snap.running] == ["old"]
    (preempted,) = snap.waiting
    assert preempted.request_id == "newest"
    assert preempted.prompt_tokens == 120 and preempted.max_tokens == 180


def test_draining_or_unreachable_worker_is_not_routable():
    ep = endpoint(load(draining=True))
    assert not ep.routable(time.monotonic(), 5.0)
    ep = endpoint(load())
    ep.reachable = False
    assert not ep.routable(time.monotonic(), 5.0)


def test_resolve_plain_and_dns():
    assert resolve("10.0.0.1:50061") == ["10.0.0.1:50061"]
    assert "127.0.0.1:50061" in resolve("dns:localhost:50061")
    assert resolve("dns:no-such-host.invalid:1") == []


def test_first_tokens_seen_after_the_report_do_not_look_like_preemption():
    # At report time the engine ran 1 and queued 2; since then admission saw the two
    # queued ones start. They run now and took their blocks; nothing was preempted.
    requests = [
        progress("a", 320, 10, 100, True),
        progress("b", 700, 0, 60, False),
        progress("c", 200, 0, 90, False),
    ]
    ep = endpoint(load(running=1, waiting=2, requests=requests))
    for rid, n in (("b", 700), ("c", 200)):
        ep.dispatched(rid, n, 60)
        ep.streamed(rid, 3)
    snap = ep.snapshot(PRIOR)
    assert [r.request_id for r in snap.running] == ["a", "b", "c"]
    assert not snap.waiting
    assert [r.prompt_tokens for r in snap.running] == [320, 700, 200]  # no recompute
    assert snap.kv.blocks_free == 50 - 22 - 7  # cdiv(703, 32) + cdiv(203, 32)


def test_prefilling_request_that_finished_since_gives_its_blocks_back():
    requests = [progress("pf", 500, 0, 1, False)]
    ep = endpoint(load(running=1, waiting=0, requests=requests))
    ep.dispatched("pf", 500, 1)
    ep.finished("pf")
    snap = ep.snapshot(PRIOR)
    assert not snap.running and not snap.waiting
    assert snap.kv.blocks_free == 50 + 16


def test_learned_overhead_is_robust_to_a_burst():
    ep = endpoint(load())
    for _ in range(20):
        ep.learn_overhead(0.004)
    for _ in range(3):  # three requests an unforeseen burst delayed by half a second
        ep.learn_overhead(0.5)
    assert ep.overhead_s == 0.004
    assert endpoint(load()).snapshot(PRIOR).overhead_s == 0.0  # nothing learned yet
    ep.learn_overhead(-1.0)  # never negative
    assert ep.snapshot(PRIOR).overhead_s >= 0.0


def test_layerkv_blocks_follow_each_requests_offloaded_groups():
    # 8 groups, 32-token blocks. "a" runs with 7 groups in host memory (a resident
    # group's and a staging list); "b" was sent since, predicted to offload 6.
    lkv = dict(layerkv=True, kv_groups=8, kv_blocks_total=800, kv_blocks_free=400)
    a = progress("a", 320, 0, 100, True)
    a.offloaded_groups = 7
    ep = endpoint(load(running=1, requests=[a], **lkv))
    ep.dispatched("a", 320, 100)  # sent by this service: its tokens are seen here
    ep.dispatched("b", 640, 10, offloaded_groups=6)
    ep.streamed("a", 32)  # one more block for each of its 2 lists
    ep.streamed("b", 1)  # started: 3 lists of 21 blocks (641 tokens)
    snap = ep.snapshot(PRIOR)
    assert {r.request_id: r.offloaded_groups for r in snap.running} == {"a": 7, "b": 6}
    assert snap.kv.blocks_free == 400 - 2 * 1 - 3 * 21
    # "b" waiting (not started) takes nothing yet and carries its time since sent.
    ep2 = endpoint(load(**lkv))
    ep2.dispatched("c", 640, 10, offloaded_groups=6)
    waiting = ep2.snapshot(PRIOR, now=time.monotonic() + 0.5).waiting
    assert [r.request_id for r in waiting] == ["c"] and waiting[0].sent_s_ago >= 0.5
