"""LayerKV policy: placement, sizing, slack, step-time model, host ranges, settings."""

import itertools
import math
import random

import pytest

from layerkv.policy.host_ranges import HostRangeAllocator
from layerkv.policy.latency import OnlineStepTimeModel, PrefillCoefficients
from layerkv.policy.placement import layer_groups, offloaded_groups, resident_groups
from layerkv.policy.settings import (
    LayerKVConfigError,
    LayerKVSettings,
    ModelGeometry,
    resolve,
)
from layerkv.policy.sizing import blocks_needed, max_resident_groups, promotion_target
from layerkv.policy.slack import (
    DecodeProgress,
    admit_early,
    min_slack,
    missed_ttft,
    protected_slack,
    protected_slacks,
    tpot_slack,
)


def test_layer_groups_are_strided_and_cover_every_layer_once():
    groups = layer_groups(8, 3)
    assert groups == [(0, 3, 6), (1, 4, 7), (2, 5)]
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert layer_groups(8, 8) == [(i,) for i in range(8)]


@pytest.mark.parametrize("groups", [0, 9])
def test_layer_groups_rejects_bad_counts(groups):
    with pytest.raises(ValueError, match="num_groups"):
        layer_groups(8, groups)


@pytest.mark.parametrize("g", range(1, 13))
def test_resident_groups_interleave_offloaded_ones(g):
    for n in range(g + 1):
        res = resident_groups(g, n)
        assert len(set(res)) == n and all(0 <= x < g for x in res)
        off = offloaded_groups(g, res)
        assert sorted(res + off) == list(range(g))
        if n > 0 and len(off) <= n:
            # No two offloaded groups are adjacent when there are enough resident ones.
            assert not any(b - a == 1 for a, b in itertools.pairwise(off))


def test_resident_groups_half():
    assert resident_groups(8, 4) == (1, 3, 5, 7)
    assert resident_groups(8, 0) == ()
    assert resident_groups(8, 8) == tuple(range(8))


def test_sizing():
    assert blocks_needed(8, 8, 10) == 80
    assert blocks_needed(8, 2, 10) == 30  # two resident lists + one staging list
    assert max_resident_groups(80, 8, 10, 1) == 7
    assert max_resident_groups(35, 8, 10, 1) == 2
    assert max_resident_groups(19, 8, 10, 1) is None
    assert max_resident_groups(20, 8, 10, 1) == 1
    assert max_resident_groups(10, 8, 10, 0) == 0


def test_promotion_target():
    # Holds 3 lists of 10 (2 resident + staging); 50 free: 80 total budget -> full.
    assert promotion_target(50, 8, 2, 10, 0) == 8
    # 20 free + 30 held = 50 -> 5 lists -> 4 resident.
    assert promotion_target(20, 8, 2, 10, 0) == 4
    # Headroom eats the gain.
    assert promotion_target(20, 8, 2, 10, 20) is None
    assert promotion_target(5, 8, 2, 10, 0) is None


def test_slack_arithmetic():
    p = DecodeProgress(
        tpot_target_s=0.1, output_tokens=11, first_token_time_s=0.0, remaining_tokens=10
    )
    # Budget 0.1 * 20 = 2.0 s; spent 1.0 s; future 10 * 0.05 = 0.5 s -> slack 0.5 s.
    assert tpot_slack(p, now_s=1.0, decode_step_s=0.05) == pytest.approx(0.5)
    no_target = DecodeProgress(None, 11, 0.0, 10)
    prefilling = DecodeProgress(0.1, 0, None, 10)
    assert tpot_slack(no_target, 1.0, 0.05) == math.inf
    assert tpot_slack(prefilling, 1.0, 0.05) == math.inf
    assert min_slack([p, no_target, prefilling], 1.0, 0.05) == pytest.approx(0.5)
    assert min_slack([], 1.0, 0.05) == math.inf
    assert admit_early(0.5, 0.2, 0.3)
    assert not admit_early(0.5, 0.2, 0.31)


def test_slack_negative_when_behind():
    p = DecodeProgress(0.05, 11, 0.0, 100)  # decode step slower than target
    assert tpot_slack(p, 1.0, 0.06) < 0
    assert not admit_early(tpot_slack(p, 1.0, 0.06), 0.0, 0.0001)


def test_protected_slack_skips_requests_that_violate_their_slo_already():
    on_time = DecodeProgress(0.1, 11, 0.0, 10, first_token_due_s=0.5)
    late = DecodeProgress(0.1, 11, 0.0, 10, first_token_due_s=-0.01)
    behind = DecodeProgress(0.05, 11, 0.0, 100, first_token_due_s=0.5)
    unknown_due = DecodeProgress(0.1, 11, 0.0, 10)
    assert not missed_ttft(on_time) and missed_ttft(late) and not missed_ttft(unknown_due)
    assert protected_slack(on_time, 1.0, 0.05) == pytest.approx(0.5)
    assert protected_slack(late, 1.0, 0.05) == math.inf  # its first token was late
    assert protected_slack(behind, 1.0, 0.06) == math.inf  # its TPOT budget is spent
    assert protected_slack(unknown_due, 1.0, 0.05) == pytest.approx(0.5)
    assert protected_slacks([late, behind], 1.0, 0.06) == []
    assert protected_slacks([late, on_time], 1.0, 0.05) == [(pytest.approx(0.5), 10)]


def test_a_request_behind_that_can_catch_up_alone_is_protected_with_no_room():
    # Budget 0.05 x 110 = 5.5 s, 1 s spent, 100 tokens to go: at today's 60 ms step it
    # is 1.5 s behind; at a 40 ms step (the worker with it alone) 0.5 s ahead. Not lost:
    # no prefill may stall it (slack 0), and it holds back the others' room too.
    behind = DecodeProgress(0.05, 11, 0.0, 100, first_token_due_s=0.5)
    roomy = DecodeProgress(1.0, 11, 0.0, 10, first_token_due_s=0.5)
    assert protected_slack(behind, 1.0, 0.06, best_step_s=0.04) == 0.0
    assert protected_slacks([behind, roomy], 1.0, 0.06, best_step_s=0.04)[0] == (0.0, 100)
    # Behind at the best step too (46 ms: 0.1 s short): lost, it protects nothing.
    assert protected_slack(behind, 1.0, 0.06, best_step_s=0.046) == math.inf
    assert [n for _, n in protected_slacks([behind, roomy], 1.0, 0.06, 0.046)] == [10]


def test_step_time_model_recovers_quadratic():
    prior = PrefillCoefficients(0.001, 1e-5, 0.0)
    model = OnlineStepTimeModel(prior, prior_decode_step_s=0.02)
    assert model.coefficients == prior  # no data yet
    rng = random.Random(0)
    true = PrefillCoefficients(0.01, 4e-5, 3e-8)
    for _ in range(200):
        p = rng.randint(1, 2048)
        model.observe(p, p * p, true.predict(p) * (1 + rng.uniform(-0.01, 0.01)), False)
    got = model.coefficients
    for p in (100, 1000, 2000):
        assert got.predict(p) == pytest.approx(true.predict(p), rel=0.05)


def test_step_time_model_fits_prefill_steps_only():
    """Decode steps of long contexts (many attention pairs per token) and mixed steps
    with a few prompt tokens stay out of the fit; they would wreck it."""
    model = OnlineStepTimeModel(PrefillCoefficients(0, 0, 0), prior_decode_step_s=0.01)
    true = PrefillCoefficients(0.005, 6e-5, 2e-8)
    rng = random.Random(1)
    for i in range(300):
        # Eight 1.5K-token decodes per step: 12K pairs, 30 ms (slower than the fit).
        model.observe(8, 12_000, 0.03, decode_only=True)
        if i % 40 == 0:
            p = rng.randint(200, 2000)
            model.observe(p + 4, p * p + 6000, true.predict(p) + 0.01, False, prefill_tokens=p)
        if i % 7 == 0:
            model.observe(12, 13_000, 0.035, False, prefill_tokens=4)
    assert model.prefill_samples == 8
    assert model.decode_step_s == pytest.approx(0.03, rel=0.01)
    for p in (500, 1500):
        assert model.predict_prefill_s(p) == pytest.approx(true.predict(p) + 0.01, rel=0.1)


def test_step_time_model_decode_ewma_and_no_negative_terms():
    model = OnlineStepTimeModel(PrefillCoefficients(0, 0, 0), prior_decode_step_s=1.0)
    for _ in range(100):
        model.observe(4, 4000, 0.03, decode_only=True)
    assert model.decode_step_s == pytest.approx(0.03, rel=0.01)
    # Samples whose least-squares fit has a negative quadratic term.
    for p, t in [
        (100, 0.1),
        (1000, 0.5),
        (2000, 0.6),
        (1500, 0.58),
        (500, 0.3),
        (1200, 0.52),
        (1800, 0.59),
        (300, 0.2),
    ]:
        model.observe(p, p * p, t, decode_only=False)
    c = model.coefficients
    assert c.b >= 0 and c.c >= 0
    assert c.predict(2000) >= c.predict(100)


def test_host_ranges_allocate_free_coalesce():
    alloc = HostRangeAllocator(10)
    a = alloc.allocate(4)
    b = alloc.allocate(4)
    assert (a, b) == (0, 4)
    assert alloc.allocate(3) is None
    alloc.free(a)
    assert alloc.allocate(5) is None  # 4 + 2 free but not contiguous
    alloc.free(b)
    assert alloc.num_free == 10
    assert alloc.allocate(10) == 0


def test_host_ranges_random_never_overlap():
    rng = random.Random(1)
    alloc = HostRangeAllocator(64)
    live: dict[int, int] = {}
    for _ in range(2000):
        if live and rng.random() < 0.5:
            start = rng.choice(list(live))
            alloc.free(start)
            del live[start]
        else:
            n = rng.randint(1, 12)
            start = alloc.allocate(n)
            if start is not None:
                span = set(range(start, start + n))
                for s, ln in live.items():
                    assert not span & set(range(s, s + ln))
                live[start] = n
        assert alloc.num_free == 64 - sum(live.values())
    for start in list(live):
        alloc.free(start)
    assert alloc.num_free == 64 and alloc.allocate(64) == 0


GEOM = ModelGeometry(num_layers=8, max_model_len=2048, block_size=32, layer_block_bytes=32768)


def test_settings_resolve_defaults():
    layout = resolve(LayerKVSettings(), GEOM)
    assert layout.num_groups == 8
    assert layout.host_blocks == (1 << 30) // (8 * 32768)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (LayerKVSettings(num_groups=9), "exceeds the model's 8 attention layers"),
        (LayerKVSettings(num_groups=1), "num_groups >= 2"),
        (LayerKVSettings(num_groups=4, min_resident_groups=4), "leaves no group"),
        (LayerKVSettings(max_staging_blocks=63), "staging of 63 blocks is too small"),
        (LayerKVSettings(host_memory_bytes=1 << 20), "cannot hold one"),
    ],
)
def test_settings_resolve_rejects(settings, message):
    with pytest.raises(LayerKVConfigError, match=message):
        resolve(settings, GEOM)


def test_settings_field_checks_and_round_trip():
    with pytest.raises(LayerKVConfigError):
        LayerKVSettings(num_groups=0)
    with pytest.raises(LayerKVConfigError, match="unknown"):
        LayerKVSettings.from_dict({"bogus": 1})
    s = LayerKVSettings(num_groups=4, default_tpot_s=0.1)
    assert LayerKVSettings.from_dict(s.to_dict()) == s


def test_residency_leaving_room():
    from layerkv.policy.sizing import residency_leaving_room

    # Head fits fully with room for the next one at min residency: no cap.
    assert residency_leaving_room(200, 8, 10, 10, 1) is None
    assert residency_leaving_room(100, 8, 10, 10, 1) is None  # exactly fits both
    # 90 free: reserve 20 for the next -> 70 -> 6 resident lists + staging.
    assert residency_leaving_room(90, 8, 10, 10, 1) == 6
    assert residency_leaving_room(50, 8, 10, 10, 1) == 2
    # Not even min residency for both: keep the head at min residency.
    assert residency_leaving_room(30, 8, 10, 10, 1) == 1
    # Room for two more arrivals at min residency (2 lists of 10 each).
    assert residency_leaving_room(90, 8, 10, 10, 1, next_requests=2) == 4
    assert residency_leaving_room(200, 8, 10, 10, 1, next_requests=2) is None
    assert residency_leaving_room(90, 8, 10, 10, 1, next_requests=0) is None


def test_step_time_model_clips_a_negative_intercept_and_keeps_the_slopes():
    """The engine-side fit's own rule (its slack gate was tuned with it): a negative
    intercept is clipped to 0, the slopes of the full fit are kept (dropping the
    intercept and refitting, the worker's rule, would lower every prediction)."""
    model = OnlineStepTimeModel(PrefillCoefficients(0.5, 0.0, 0.0), prior_decode_step_s=0.02)
    for p in range(200, 2001, 150):
        model.observe(p, p * p, -0.005 + 1e-4 * p + 1e-8 * p * p, decode_only=False)
    c = model.coefficients
    assert c.a == 0.0
    assert c.b == pytest.approx(1e-4, rel=1e-6)
    assert c.c == pytest.approx(1e-8, rel=1e-6)
