"""The memory-aware TTFT predictor and the latency fits behind it (pure, fast)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerkv.policy.latency import (
    ENGINE_FIT_MIN_SAMPLES,
    LatencyCoefficients,
    OnlineLatencyModel,
    least_squares_nonneg,
    reported_prefill_fit,
)
from layerkv.policy.ttft import KvState, RequestLoad, WorkerSnapshot, predict_ttft

LAT = LatencyCoefficients(
    prefill_a_s=0.01, prefill_b_s=1e-4, prefill_c_s=0.0, decode_step_s=0.02
)  # fmt: skip


def snap(free=100, total=100, running=(), waiting=(), **kv) -> WorkerSnapshot:
    return WorkerSnapshot(
        address="w",
        kv=KvState(block_size=32, blocks_total=total, blocks_free=free, **kv),
        latency=LAT,
        running=tuple(running),
        waiting=tuple(waiting),
    )


def test_idle_worker_ttft_is_the_prefill_time():
    p = predict_ttft(snap(), 320)
    assert p.ttft_s == pytest.approx(0.01 + 320 * 1e-4)
    assert p.queue_s == 0 and p.kv_wait_s == 0 and p.wait_s == 0
    assert p.resident_groups == 1 and p.fits


def test_waits_for_running_requests_to_free_blocks():
    # 10 free blocks; the prompt needs 20 (640 tokens). The running request holds 90
    # blocks and finishes after 50 more tokens at 20 ms per step: 1 s of waiting.
    running = [RequestLoad(prompt_tokens=2850, max_tokens=100, output_tokens=50, started=True)]
    p = predict_ttft(snap(free=10, running=running), 640)
    assert p.kv_wait_s == pytest.approx(50 * 0.02)
    assert p.ttft_s == pytest.approx(1.0 + 0.01 + 640 * 1e-4)


def test_the_wait_for_blocks_counts_the_context_each_step_reads():
    # The same wait with a step of 20 ms + 1 us per token of context: the running
    # request holds 2900 tokens, 2949 at its last step; 50 steps read 2924.5 on average.
    running = [RequestLoad(prompt_tokens=2850, max_tokens=100, output_tokens=50, started=True)]
    lat = LatencyCoefficients(0.01, 1e-4, 0.0, 0.02, decode_step_s_per_token=1e-6)
    base = snap(free=10, running=running)
    p = predict_ttft(WorkerSnapshot(base.address, base.kv, lat, base.running), 640)
    assert p.kv_wait_s == pytest.approx(50 * (0.02 + 1e-6 * 2924.5))


def test_fits_now_despite_running_requests():
    running = [RequestLoad(2000, 500, 10, True)]
    p = predict_ttft(snap(free=30, running=running), 640)
    assert p.kv_wait_s == 0


def test_queue_ahead_adds_their_prefill():
    waiting = [RequestLoad(600, 10), RequestLoad(600, 10)]
    alone = predict_ttft(snap(), 100)
    behind = predict_ttft(snap(waiting=waiting), 100)
    assert behind.ttft_s > alone.ttft_s
    # Batched into one step with them: one fixed step cost, not three; it starts with
    # that step, so it does not wait, its prefill step is longer.
    assert behind.ttft_s == pytest.approx(0.01 + 1300 * 1e-4)
    assert behind.wait_s == 0 and behind.prefill_s == pytest.approx(behind.ttft_s)
    # Past the step's token budget (2048) a new step starts: now it waits for one.
    long_ahead = [RequestLoad(1000, 10), RequestLoad(1000, 10)]
    p = predict_ttft(snap(waiting=long_ahead), 100)
    assert p.ttft_s == pytest.approx(0.23)
    assert p.queue_s == pytest.approx(0.21) and p.prefill_s == pytest.approx(0.02)


def test_a_shared_prefill_step_pays_attention_per_prompt():
    # Attention is quadratic per request: three prompts in one step cost
    # a + b*(P1+P2+P3) + c*(P1^2+P2^2+P3^2), not c*(P1+P2+P3)^2 (which predicted twice
    # the measured step for three ~600-token prompts).
    lat = LatencyCoefficients(prefill_a_s=0.01, prefill_b_s=1e-4, prefill_c_s=1e-7)
    waiting = (RequestLoad(600, 10), RequestLoad(500, 10))
    s = WorkerSnapshot("w", KvState(32, 100, 100), lat, waiting=waiting)
    p = predict_ttft(s, 400)
    assert p.ttft_s == pytest.approx(0.01 + 1500 * 1e-4 + (600**2 + 500**2 + 400**2) * 1e-7)


def test_layerkv_starts_with_fewer_resident_groups_instead_of_waiting():
    # The running request keeps 1 of 8 groups resident: 2 block lists, 62 blocks for
    # its remaining 1000 tokens, which LayerKV admission keeps back.
    running = [RequestLoad(2000, max_tokens=1000, started=True, offloaded_groups=7)]
    # A 319-token prompt plus its one output token: 10 blocks per group, 80 all resident.
    stock = predict_ttft(snap(free=79, total=600, running=running, groups=8), 319)
    kv = dict(groups=8, min_resident_groups=0, host_blocks_free=1000)
    lkv = predict_ttft(snap(free=79, total=600, running=running, layerkv=True, **kv), 319)
    assert stock.kv_wait_s > 10  # waits ~1000 decode steps
    assert lkv.kv_wait_s == 0 and lkv.resident_groups == 0  # 1 list of 10 <= 79 - 62
    assert lkv.ttft_s < stock.ttft_s


def test_layerkv_keeps_back_the_blocks_running_requests_will_decode_into():
    # As the engine scheduler does: offloading a new request into blocks a running
    # one will need before its max_tokens would end in a recompute preemption.
    kv = dict(groups=8, layerkv=True, min_resident_groups=0, host_blocks_free=1000)
    ending = [RequestLoad(2000, max_tokens=1000, output_tokens=990, started=True)]
    assert predict_ttft(snap(free=60, total=600, running=ending, **kv), 319).kv_wait_s == 0
    # 1000 tokens to go, all 8 groups resident: 8 x 31 blocks kept back.
    starting = [RequestLoad(2000, max_tokens=1000, started=True)]
    p = predict_ttft(snap(free=60, total=600, running=starting, **kv), 319)
    assert p.kv_wait_s > 10
    # It sizes a new request for its whole output too: the prompt's 80 blocks fit with
    # room for one more, but 640 tokens (20 blocks per group) leave room for 3 groups.
    room = dict(kv, reserve_requests=1)
    assert predict_ttft(snap(free=100, total=600, **room), 319).resident_groups == 8
    p = predict_ttft(snap(free=100, total=600, **room), 319, max_tokens=321)
    assert p.resident_groups == 3  # (3 + 1) x 20 + 1 x 20 = 100


def test_layerkv_keeps_room_for_more_requests_as_its_scheduler_does():
    # 100 free blocks hold the 319-token prompt all resident (80), but the engine
    # scheduler keeps room for reserve_requests more with min_resident_groups = 1
    # ((1 + 1) lists x 10 blocks each): it starts this one with fewer groups.
    kv = dict(groups=8, layerkv=True, min_resident_groups=1, host_blocks_free=1000)
    alone = predict_ttft(snap(free=100, total=600, **kv), 319)
    assert alone.resident_groups == 8
    room = predict_ttft(snap(free=100, total=600, reserve_requests=2, **kv), 319)
    assert room.resident_groups == 5  # (5 + 1) x 10 + 2 x 20 = 100
    assert room.kv_wait_s == 0


def test_layerkv_needs_host_memory_for_the_offloaded_groups():
    running = [RequestLoad(2000, 100, 0, True)]
    kv = dict(groups=8, layerkv=True, min_resident_groups=1, host_blocks_free=5)
    p = predict_ttft(snap(free=40, total=600, running=running, **kv), 320)
    assert p.kv_wait_s > 0  # no host room: must wait as stock vLLM would


def test_prompt_that_never_fits_is_flagged():
    p = predict_ttft(snap(free=5, total=5), 2000)
    assert not p.fits


def test_max_num_seqs_makes_it_wait():
    running = [RequestLoad(10, 5, 0, True)] * 2
    s = WorkerSnapshot("w", KvState(32, 100, 90), LAT, running=tuple(running), max_num_seqs=2)
    p = predict_ttft(s, 10)
    assert p.kv_wait_s == pytest.approx(5 * 0.02)


requests = st.builds(
    RequestLoad,
    prompt_tokens=st.integers(1, 1500),
    max_tokens=st.integers(1, 300),
    output_tokens=st.integers(0, 300),
    started=st.booleans(),
)


@settings(max_examples=1000, deadline=None)
@given(
    reqs=st.lists(requests, max_size=12),
    free=st.integers(0, 200),
    prompt=st.integers(1, 1500),
    extra=st.integers(1, 1500),
)
def test_properties(reqs, free, prompt, extra):
    running = [r for r in reqs if r.started]
    waiting = [r for r in reqs if not r.started]
    s = snap(free=free, total=200, running=running, waiting=waiting)
    p = predict_ttft(s, prompt)
    # Components add up and are non-negative.
    assert p.queue_s >= 0 and p.kv_wait_s >= 0 and p.prefill_s >= 0
    assert p.ttft_s == pytest.approx(p.queue_s + p.kv_wait_s + p.prefill_s)
    # More free memory never predicts a later first token, give or take a step's
    # fixed cost per queued request (requests that start earlier are grouped into
    # batched prefill steps differently: after a KV wait they all start in one step,
    # without it they may start in several); an empty queue never does.
    more = snap(free=min(free + extra, 200), total=200, running=running, waiting=waiting)
    slack = LAT.prefill_a_s * (len(waiting) + 1)
    assert predict_ttft(more, prompt).ttft_s <= p.ttft_s + slack + 1e-9
    assert predict_ttft(snap(free=free, total=200, running=running), prompt).ttft_s <= (
        p.ttft_s + 1e-9
    )


def test_latency_model_recovers_a_quadratic():
    m = OnlineLatencyModel()
    for p in range(100, 2100, 100):
        m.observe_prefill(p, 0.005 + 2e-5 * p + 1e-8 * p * p)
    for n in range(1, 9):
        m.observe_decode(n, 0.01 + 0.002 * n)
    c = m.coefficients()
    assert c.prefill_s(1500) == pytest.approx(0.005 + 2e-5 * 1500 + 1e-8 * 1500**2, rel=1e-3)
    assert c.decode_step(4) == pytest.approx(0.018, rel=1e-3)
    assert c.samples == 28


def test_latency_model_fits_the_decode_step_by_count_and_context():
    # The step grows with the context the running requests hold (attention reads their
    # whole KV), not only with their count: 4 ms + 0.4 ms per request + 1.3 us per
    # token of context. The fit by count alone (what older admissions read) is kept.
    m = OnlineLatencyModel()
    for n in range(1, 9):
        for per_request in (64, 512, 1800):
            m.observe_decode(n, 0.004 + 0.0004 * n + 1.3e-6 * n * per_request, n * per_request)
    c = m.coefficients()
    assert c.decode_step(4, 4 * 64) == pytest.approx(0.004 + 0.0016 + 1.3e-6 * 256, rel=1e-3)
    assert c.decode_step(4, 4 * 1800) == pytest.approx(0.004 + 0.0016 + 1.3e-6 * 7200, rel=1e-3)
    _, d1 = m.decode_fit_by_count()
    assert d1 > 0.0004  # the count alone absorbs the context of the mix it saw
    # Contexts unknown (a worker that does not count them): the fit stays by count.
    blind = OnlineLatencyModel()
    for n in range(1, 9):
        blind.observe_decode(n, 0.01 + 0.002 * n)
    assert blind.coefficients().decode_step_s_per_token == 0.0
    # Every step's cost on the context alone (no fixed cost) cannot be told from a
    # fixed cost when contexts are all long: no context fit, the count fit stays.
    long_only = OnlineLatencyModel()
    for n in range(1, 9):
        for per_request in (1500, 1600, 1800):
            long_only.observe_decode(n, 2.5e-6 * n * per_request, n * per_request)
    assert long_only.decode_fit_with_context() is None
    assert long_only.coefficients().decode_step_s_per_token == 0.0


def test_latency_model_uses_prior_until_enough_samples_and_never_goes_negative():
    prior = LatencyCoefficients(0.02, 1e-4, 0, 0.03, 0)
    m = OnlineLatencyModel(prior, min_samples=4)
    m.observe_prefill(100, 0.5)
    assert m.coefficients() == prior
    # Decreasing times with length would fit a negative slope: clamped to >= 0.
    for p, t in [(100, 0.05), (200, 0.04), (300, 0.03), (400, 0.02)]:
        m.observe_prefill(p, t)
    c = m.coefficients()
    assert c.prefill_b_s >= 0 and c.prefill_c_s >= 0 and c.prefill_s(10_000) >= 0


def test_prefill_fit_ignores_samples_lengthened_by_shared_steps():
    """Half the requests shared their prefill step with a 1500-token prompt (their
    measured time includes it): the fit must stay on the solo cost, where a plain
    least-squares fit would be pulled up by about half that prompt's time."""
    rng = random.Random(3)
    solo = LatencyCoefficients(0.004, 3e-5, 2e-8, 0.01, 0.0)
    m = OnlineLatencyModel()
    for i in range(200):
        p = rng.randrange(64, 2000)
        t = solo.prefill_s(p) * rng.uniform(1.0, 1.05)
        if i % 2:
            t += solo.prefill_s(1500)
        m.observe_prefill(p, t)
    c = m.coefficients()
    for p in (100, 800, 1800):
        assert c.prefill_s(p) == pytest.approx(solo.prefill_s(p), rel=0.1), p


def test_nonneg_least_squares_drops_negative_coefficients():
    rows = [[1.0, float(x)] for x in range(10)]
    ys = [5.0 - 0.1 * x for x in range(10)]
    w = least_squares_nonneg(rows, ys)
    assert w[1] == 0.0 and w[0] == pytest.approx(sum(ys) / len(ys))


def test_a_worker_reports_the_engine_fit_only_once_it_rests_on_enough_steps():
    per_request = LatencyCoefficients(prefill_a_s=0.004, prefill_b_s=6e-5, prefill_c_s=3e-8)
    engine = (0.001, 7e-5, 2e-8)
    mine = (0.004, 6e-5, 3e-8)
    # A LayerKV engine reports its fit from its first step, on its priors at first.
    assert reported_prefill_fit(per_request, engine, ENGINE_FIT_MIN_SAMPLES - 1) == mine
    assert reported_prefill_fit(per_request, engine, ENGINE_FIT_MIN_SAMPLES) == engine
    assert reported_prefill_fit(per_request, None, 0) == mine


def test_the_head_of_the_queue_is_credited_with_the_time_since_it_was_sent():
    # The report lists a 1000-token prompt as waiting, but it was sent 50 ms ago to an
    # idle engine: its 110 ms prefill step is half done, and the new prompt cannot
    # join a step already under way: it waits 60 ms, then takes its own step.
    fresh = predict_ttft(snap(waiting=[RequestLoad(1000, 10)]), 100)
    sent = predict_ttft(snap(waiting=[RequestLoad(1000, 10, sent_s_ago=0.05)]), 100)
    assert fresh.ttft_s == pytest.approx(0.01 + 1100 * 1e-4)  # one shared step
    assert sent.queue_s == pytest.approx(0.11 - 0.05)
    assert sent.ttft_s == pytest.approx(0.06 + 0.01 + 100 * 1e-4)
    # Sent longer ago than its step takes: done, nothing left to wait for.
    done = predict_ttft(snap(waiting=[RequestLoad(1000, 10, sent_s_ago=0.5)]), 100)
    assert done.queue_s == 0 and done.ttft_s == pytest.approx(0.01 + 100 * 1e-4)
