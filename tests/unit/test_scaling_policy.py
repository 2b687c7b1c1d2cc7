"""The scaling decision on its own (pure): rules, bounds, "scale on the cause", and no
flapping over an hour of simulated time."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerkv.common.load import PoolLoad, WorkerLoadReport, summarize_pool
from layerkv.common.slo import LATENCY_BUCKETS_S, WindowStats, histogram_index
from layerkv.policy.scaling import (
    Action,
    Observation,
    Reason,
    ScalingPolicy,
    ScalingState,
    decide,
)

NOW = 1_000_000.0
POLICY = ScalingPolicy(
    min_replicas=1,
    max_replicas=8,
    ttft_target_s=1.0,
    max_violation_rate=0.05,
    min_requests=20,
    stale_after_s=30,
    scale_up_cooldown_s=60,
    max_scale_up_step=4,
    scale_down_cooldown_s=300,
)


def window(
    requests: int = 100,
    violations: int = 0,
    ttft_s: float = 0.2,
    newest_age_s: float = 1.0,
    now: float = NOW,
) -> WindowStats:
    """A window whose TTFTs all fall in the histogram bucket of ``ttft_s``."""
    hist = [0] * len(LATENCY_BUCKETS_S)
    if requests:
        hist[histogram_index(ttft_s)] = requests
    return WindowStats(
        slo_class="chat",
        window_s=60,
        requests=requests,
        violations=violations,
        ttft_violations=violations,
        ttft_hist=tuple(hist),
        tpot_hist=tuple(hist),
        newest_at=now - newest_age_s if requests else None,
    )


def observe(
    replicas: int,
    win: WindowStats | None,
    *,
    ready: int | None = None,
    load: PoolLoad | None = None,
    now: float = NOW,
) -> Observation:
    return Observation(
        now=now,
        replicas=replicas,
        ready_replicas=replicas if ready is None else ready,
        window=win,
        load=load,
    )


def pool(
    *,
    workers: int = 2,
    kv_used: float = 0.3,
    waiting: int = 0,
    offloaded: int = 0,
    host_used: float | None = None,
) -> PoolLoad:
    total = 1000 * workers
    host_total = 0 if host_used is None else 4000 * workers
    return PoolLoad(
        workers=workers,
        running=4 * workers,
        waiting=waiting,
        kv_blocks_total=total,
        kv_blocks_free=round(total * (1 - kv_used)),
        offloaded_requests=offloaded,
        host_kv_blocks_used=0 if host_used is None else round(host_total * host_used),
        host_kv_blocks_total=host_total,
        newest_at=NOW,
    )


# -- no evidence, no action ------------------------------------------------------------


@pytest.mark.parametrize(
    ("win", "reason"),
    [
        (None, Reason.STORE_UNAVAILABLE),
        (window(requests=0), Reason.NO_METRICS),
        (window(requests=5, violations=5, ttft_s=5.0), Reason.TOO_FEW_REQUESTS),
        (window(violations=100, ttft_s=5.0, newest_age_s=45), Reason.STALE_METRICS),
    ],
)
def test_holds_and_says_so_without_usable_metrics(win: WindowStats | None, reason: Reason) -> None:
    state = ScalingState(calm_since=NOW - 100)
    decision = decide(POLICY, state, observe(3, win))
    assert decision.action is Action.HOLD
    assert decision.replicas == 3
    assert decision.reason is reason
    assert not decision.metrics_available
    assert decision.state.calm_since is None  # calm must be proven continuously


# -- bounds ----------------------------------------------------------------------------


def test_bounds_are_enforced_even_without_metrics() -> None:
    policy = replace(POLICY, min_replicas=2, max_replicas=4)
    below = decide(policy, ScalingState(), observe(1, None))
    above = decide(policy, ScalingState(), observe(7, None))
    assert (below.replicas, below.reason) == (2, Reason.BELOW_MIN)
    assert (above.replicas, above.reason) == (4, Reason.ABOVE_MAX)


@given(
    replicas=st.integers(1, 12),
    ready=st.integers(0, 12),
    requests=st.integers(0, 500),
    violated=st.floats(0, 1),
    ttft=st.floats(0.001, 200),
    offloaded=st.integers(0, 10),
    kv_used=st.floats(0, 1),
)
def test_never_leaves_the_bounds_nor_steps_down_more_than_one(
    replicas: int,
    ready: int,
    requests: int,
    violated: float,
    ttft: float,
    offloaded: int,
    kv_used: float,
) -> None:
    policy = replace(POLICY, min_replicas=2, max_replicas=6, scale_down_cooldown_s=0)
    win = window(requests=requests, violations=round(requests * violated), ttft_s=ttft)
    load = pool(kv_used=kv_used, offloaded=offloaded)
    decision = decide(policy, ScalingState(), observe(replicas, win, ready=ready, load=load))
    assert policy.min_replicas <= decision.replicas <= policy.max_replicas
    if policy.min_replicas <= replicas <= policy.max_replicas:
        assert decision.replicas >= replicas - 1
        assert decision.replicas <= replicas + policy.max_scale_up_step


# -- scale up --------------------------------------------------------------------------


def test_scale_up_step_grows_with_how_far_ttft_is_above_target() -> None:
    slightly = decide(POLICY, ScalingState(), observe(1, window(violations=10, ttft_s=1.15)))
    far = decide(POLICY, ScalingState(), observe(2, window(violations=60, ttft_s=2.8)))
    capped = decide(POLICY, ScalingState(), observe(4, window(violations=90, ttft_s=25)))
    assert slightly.ttft_percentile_s < 1.5
    assert (slightly.action, slightly.replicas) == (Action.UP, 2)  # ceil(1 * <0.5) = 1
    assert far.replicas == 2 + math.ceil(2 * (far.ttft_percentile_s - 1.0))
    assert far.replicas >= 5
    assert capped.replicas == 8  # step capped at maxStep 4
    assert all(d.reason is Reason.OVER_BUDGET for d in (slightly, far, capped))
    assert far.state.last_scale_up_at == NOW


def test_tpot_only_violations_scale_up_one_step() -> None:
    win = replace(window(violations=30, ttft_s=0.2), ttft_violations=0, tpot_violations=30)
    decision = decide(POLICY, ScalingState(), observe(3, win))
    assert (decision.action, decision.replicas) == (Action.UP, 4)


def test_scale_up_waits_for_its_cooldown() -> None:
    state = ScalingState(last_scale_up_at=NOW - 30)
    decision = decide(POLICY, state, observe(3, window(violations=50, ttft_s=3)))
    assert (decision.action, decision.reason) == (Action.HOLD, Reason.UP_COOLDOWN)
    later_window = window(violations=50, ttft_s=3, now=NOW + 31)
    later = decide(POLICY, state, observe(3, later_window, now=NOW + 31))
    assert later.action is Action.UP


def test_pods_on_their_way_are_not_ordered_twice() -> None:
    # 4 asked for, 2 ready: the 2 starting pods are already the step this TTFT calls for.
    decision = decide(
        POLICY, ScalingState(), observe(4, window(violations=50, ttft_s=1.8), ready=2)
    )
    assert (decision.action, decision.reason) == (Action.HOLD, Reason.WAITING_FOR_WORKERS)


def test_at_max_replicas_holds_and_reports_it() -> None:
    decision = decide(POLICY, ScalingState(), observe(8, window(violations=90, ttft_s=9)))
    assert (decision.action, decision.reason) == (Action.HOLD, Reason.AT_MAX)
    assert decision.at_max_replicas


# -- scale on the cause ----------------------------------------------------------------


def test_offload_absorbing_pressure_within_budget_is_no_reason_to_scale() -> None:
    # Device KV full, requests queueing, but LayerKV holds layers on the host and the
    # budget holds: a queue/KV-based autoscaler would add pods here; we do not.
    busy = pool(kv_used=1.0, waiting=6, offloaded=5, host_used=0.4)
    near_budget = window(violations=4, ttft_s=0.9)  # 4 % against a 5 % budget
    decision = decide(POLICY, ScalingState(), observe(3, near_budget, load=busy))
    assert (decision.action, decision.reason) == (Action.HOLD, Reason.OFFLOAD_ABSORBING)
    assert decision.metrics_available


def test_exhausted_offload_near_the_budget_adds_one_worker_before_it_breaks() -> None:
    exhausted = pool(kv_used=1.0, waiting=6, offloaded=9, host_used=0.95)
    # 5 % is within the 5 % budget but above 80 % of it: "near".
    decision = decide(POLICY, ScalingState(), observe(3, window(violations=5), load=exhausted))
    assert (decision.action, decision.replicas) == (Action.UP, 4)
    assert decision.reason is Reason.OFFLOAD_EXHAUSTED
    # Far from the budget, an exhausted offload is still no reason.
    calm = decide(POLICY, ScalingState(), observe(3, window(violations=1), load=exhausted))
    assert calm.action is Action.HOLD


def test_queueing_without_offload_near_the_budget_adds_one_worker() -> None:
    no_offload = pool(kv_used=1.0, waiting=3)  # plug-in off: no host KV space
    decision = decide(POLICY, ScalingState(), observe(2, window(violations=5), load=no_offload))
    assert (decision.replicas, decision.reason) == (3, Reason.OFFLOAD_EXHAUSTED)


# -- scale down ------------------------------------------------------------------------


def test_scale_down_needs_calm_for_the_whole_cooldown_then_one_step() -> None:
    quiet = window(violations=0, ttft_s=0.1)
    first = decide(POLICY, ScalingState(), observe(4, quiet))
    assert (first.action, first.reason) == (Action.HOLD, Reason.CALM)
    assert first.state.calm_since == NOW
    early = decide(
        POLICY, first.state, observe(4, replace(quiet, newest_at=NOW + 298), now=NOW + 299)
    )
    assert early.action is Action.HOLD
    due = decide(
        POLICY, first.state, observe(4, replace(quiet, newest_at=NOW + 299), now=NOW + 300)
    )
    assert (due.action, due.replicas, due.reason) == (Action.DOWN, 3, Reason.UNDERUSED)
    # The next step needs a fresh cooldown at the new size.
    after = decide(
        POLICY, due.state, observe(3, replace(quiet, newest_at=NOW + 300), now=NOW + 301)
    )
    assert after.action is Action.HOLD
    assert after.state.calm_since == NOW + 301


def test_an_excursion_over_half_the_budget_restarts_the_calm() -> None:
    state = ScalingState(calm_since=NOW - 1000)
    bump = decide(POLICY, state, observe(4, window(violations=3, ttft_s=0.1)))
    assert bump.reason is Reason.WITHIN_BUDGET
    assert bump.state.calm_since is None


def test_no_scale_down_below_min_nor_soon_after_a_scale_up() -> None:
    quiet = window(violations=0, ttft_s=0.05)
    at_min = decide(POLICY, ScalingState(calm_since=NOW - 10_000), observe(1, quiet))
    assert (at_min.action, at_min.reason) == (Action.HOLD, Reason.AT_MIN)
    recent_up = ScalingState(calm_since=NOW - 10_000, last_scale_up_at=NOW - 100)
    assert decide(POLICY, recent_up, observe(4, quiet)).action is Action.HOLD


@pytest.mark.parametrize(
    ("load", "ttft_s", "expected"),
    [
        (pool(workers=4, kv_used=0.3), 0.1, Action.DOWN),  # 0.3 * 4/3 = 0.4 <= 0.6
        (pool(workers=4, kv_used=0.5), 0.1, Action.HOLD),  # 0.5 * 4/3 = 0.67 > 0.6
        (pool(workers=4, kv_used=0.2, waiting=2), 0.1, Action.HOLD),  # engines queue
        (pool(workers=4, kv_used=0.2, offloaded=1), 0.1, Action.HOLD),  # offload in use
        (None, 0.2, Action.DOWN),  # no load reports: TTFT 0.2 * 4/3 <= 0.5 * target
        (None, 0.45, Action.HOLD),  # 0.45 * 4/3 = 0.6 > 0.5 * target
    ],
)
def test_scale_down_only_when_workers_stay_underused_with_one_fewer(
    load: PoolLoad | None, ttft_s: float, expected: Action
) -> None:
    state = ScalingState(calm_since=NOW - 1000)
    decision = decide(POLICY, state, observe(4, window(ttft_s=ttft_s), load=load))
    assert decision.action is expected


def test_policy_rejects_settings_without_hysteresis() -> None:
    with pytest.raises(ValueError, match="hysteresis"):
        replace(POLICY, scale_down_rate_fraction=0.9)
    with pytest.raises(ValueError):
        replace(POLICY, min_replicas=5, max_replicas=3)


# -- load snapshots --------------------------------------------------------------------


def test_pool_summary_ignores_stale_and_draining_workers() -> None:
    reports = [
        WorkerLoadReport("a:1", NOW - 1, running=2, kv_blocks_total=100, kv_blocks_free=50),
        WorkerLoadReport("b:1", NOW - 100, running=9, kv_blocks_total=100, kv_blocks_free=0),
        WorkerLoadReport("c:1", NOW, running=9, kv_blocks_total=100, draining=True),
    ]
    summary = summarize_pool(reports, now=NOW, stale_after_s=30)
    assert (summary.workers, summary.running, summary.kv_utilization) == (1, 2, 0.5)
    assert summarize_pool([], now=NOW, stale_after_s=30).kv_utilization is None
    with pytest.raises(ValueError):
        WorkerLoadReport("a:1", NOW, kv_blocks_total=1, kv_blocks_free=2)


# -- flapping --------------------------------------------------------------------------


def simulate_hour(
    policy: ScalingPolicy,
    *,
    demand: float,
    replicas: int,
    seed: int,
    with_load: bool,
    step_s: float = 10.0,
) -> list[int]:
    """Replica counts over an hour of a steady demand (in busy-worker equivalents).

    A queueing-flavoured model: utilisation u = demand / replicas; the TTFT percentile
    grows like 1/(1-u) (reaching the target at u = 0.65); the violation rate grows
    with the cube of TTFT/target around the budget, with +-25% noise per window.
    """
    rng = random.Random(seed)
    state = ScalingState()
    history = [replicas]
    for tick in range(int(3600 / step_s)):
        now = NOW + tick * step_s
        u = demand / replicas
        ttft = policy.ttft_target_s * 0.35 / max(1.0 - u, 0.05)
        rate = policy.max_violation_rate * (ttft / policy.ttft_target_s) ** 3
        rate = min(1.0, rate * rng.uniform(0.75, 1.25))
        requests = 400
        win = window(requests=requests, violations=round(rate * requests), ttft_s=ttft, now=now)
        load = pool(workers=replicas, kv_used=min(1.0, u)) if with_load else None
        decision = decide(policy, state, observe(replicas, win, load=load, now=now))
        state = decision.state
        replicas = decision.replicas
        history.append(replicas)
    return history


def reversals(history: list[int]) -> int:
    """How often the scaling direction flipped (up then down, or down then up)."""
    moves = [b - a for a, b in itertools.pairwise(history) if b != a]
    return sum(1 for a, b in itertools.pairwise(moves) if (a > 0) != (b > 0))


@settings(max_examples=40, deadline=None)
@given(
    demand=st.floats(2.3, 2.8),  # around u = 0.65 on 4 workers: right at the budget
    seed=st.integers(0, 2**32 - 1),
    with_load=st.booleans(),
)
def test_steady_load_near_the_budget_does_not_oscillate(
    demand: float, seed: int, with_load: bool
) -> None:
    history = simulate_hour(POLICY, demand=demand, replicas=4, seed=seed, with_load=with_load)
    moves = [b - a for a, b in itertools.pairwise(history) if b != a]
    # Noise may push a window over the budget (a step up), and an overshooting step may
    # be trimmed once; but never back up after a step down (the flap), and few moves.
    ups_after_a_down = [m for i, m in enumerate(moves) if m > 0 and any(x < 0 for x in moves[:i])]
    assert not ups_after_a_down, moves
    assert reversals(history) <= 1, moves
    assert len(moves) <= 3, moves


def test_the_simulation_catches_a_policy_without_hysteresis() -> None:
    # The same load, with scale-down allowed as soon as a worker less looks "fine":
    # it flaps. This keeps the no-oscillation test honest.
    loose = replace(
        POLICY,
        scale_up_cooldown_s=0,
        scale_down_cooldown_s=0,
        scale_down_rate_fraction=0.7,
        pressure_rate_fraction=0.8,
        scale_down_max_utilization=1.0,
        scale_down_max_ttft_fraction=1.0,
    )
    flaps = [
        reversals(simulate_hour(loose, demand=2.6, replicas=4, seed=s, with_load=False))
        for s in range(5)
    ]
    assert max(flaps) > 3, flaps
