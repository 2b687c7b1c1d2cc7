"""The scaling rules one by one: each fires in its own situation with the right reason
and replica count, and steps aside (None) where it does not apply; ``decide`` records
which rule fired."""

from __future__ import annotations

import pytest

from layerkv.common.load import PoolLoad
from layerkv.common.slo import LATENCY_BUCKETS_S, WindowStats, histogram_index
from layerkv.policy.scaling import (
    RULES,
    Action,
    Observation,
    Reason,
    Rule,
    RuleContext,
    ScalingPolicy,
    ScalingState,
    decide,
    rule_at_min,
    rule_bounds,
    rule_calm_cooldown,
    rule_metrics_missing,
    rule_offload_absorbing,
    rule_offload_exhausted,
    rule_over_budget,
    rule_scale_down,
    rule_within_budget,
    rule_workers_busy,
)

NOW = 1_000_000.0
# Budget 5 %: "well under" is <= 2.5 %, "near" is > 4 %.
POLICY = ScalingPolicy(
    min_replicas=2,
    max_replicas=6,
    ttft_target_s=1.0,
    max_violation_rate=0.05,
    min_requests=20,
    stale_after_s=30,
    scale_up_cooldown_s=60,
    max_scale_up_step=4,
    scale_down_cooldown_s=300,
)
CALM = ScalingState(calm_since=NOW - 1000)


def window(
    requests: int = 100, violations: int = 0, ttft_s: float = 0.1, newest_age_s: float = 1.0
) -> WindowStats:
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
        newest_at=NOW - newest_age_s if requests else None,
    )


def pool(
    *, kv_used: float = 0.2, waiting: int = 0, offloaded: int = 0, host_used: float | None = None
) -> PoolLoad:
    host_total = 0 if host_used is None else 4000
    return PoolLoad(
        workers=4,
        running=8,
        waiting=waiting,
        kv_blocks_total=1000,
        kv_blocks_free=round(1000 * (1 - kv_used)),
        offloaded_requests=offloaded,
        host_kv_blocks_used=0 if host_used is None else round(host_total * host_used),
        host_kv_blocks_total=host_total,
        newest_at=NOW,
    )


def ctx(
    replicas: int = 4,
    win: WindowStats | None = None,
    *,
    state: ScalingState = CALM,
    ready: int | None = None,
    load: PoolLoad | None = None,
    policy: ScalingPolicy = POLICY,
) -> RuleContext:
    obs = Observation(
        now=NOW,
        replicas=replicas,
        ready_replicas=replicas if ready is None else ready,
        window=window() if win is None else win,
        load=load,
    )
    return RuleContext.of(policy, state, obs)


EXHAUSTED = pool(kv_used=1.0, waiting=4, offloaded=6, host_used=0.95)
NEAR_BUDGET = window(violations=5)  # 5 %: within the budget, above 80 % of it


# -- 1. bounds -------------------------------------------------------------------------


def test_rule_bounds_brings_the_deployment_inside_min_and_max() -> None:
    below = rule_bounds(ctx(1, window(violations=90, ttft_s=9)))
    above = rule_bounds(ctx(9))
    assert below is not None and above is not None
    assert (below.replicas, below.reason, below.action) == (2, Reason.BELOW_MIN, Action.UP)
    assert (above.replicas, above.reason, above.action) == (6, Reason.ABOVE_MAX, Action.DOWN)
    assert rule_bounds(ctx(2)) is None
    assert rule_bounds(ctx(6)) is None


def test_rule_bounds_reports_whether_metrics_were_usable() -> None:
    without = rule_bounds(ctx(1, window(requests=0)))
    with_metrics = rule_bounds(ctx(1))
    assert without is not None and not without.metrics_available
    assert with_metrics is not None and with_metrics.metrics_available


# -- 2. missing metrics ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("win", "reason"),
    [
        (window(requests=0), Reason.NO_METRICS),
        (window(requests=5, violations=5), Reason.TOO_FEW_REQUESTS),
        (window(violations=90, newest_age_s=60), Reason.STALE_METRICS),
    ],
)
def test_rule_metrics_missing_holds_and_restarts_the_calm(win: WindowStats, reason: Reason) -> None:
    decision = rule_metrics_missing(ctx(4, win))
    assert decision is not None
    assert (decision.replicas, decision.action, decision.reason) == (4, Action.HOLD, reason)
    assert not decision.metrics_available
    assert decision.state.calm_since is None


def test_rule_metrics_missing_on_an_unreachable_store() -> None:
    obs = Observation(now=NOW, replicas=3, ready_replicas=3, window=None)
    decision = rule_metrics_missing(RuleContext.of(POLICY, CALM, obs))
    assert decision is not None and decision.reason is Reason.STORE_UNAVAILABLE
    assert rule_metrics_missing(ctx(4)) is None


# -- 3. over budget --------------------------------------------------------------------


def test_rule_over_budget_scales_up_by_the_ttft_ratio() -> None:
    decision = rule_over_budget(ctx(2, window(violations=60, ttft_s=1.8)))
    assert decision is not None
    assert decision.reason is Reason.OVER_BUDGET
    assert decision.replicas > 2
    assert decision.state.last_scale_up_at == NOW
    assert decision.state.calm_since is None


def test_rule_over_budget_holds_at_max_in_cooldown_and_for_starting_pods() -> None:
    over = window(violations=60, ttft_s=1.8)
    at_max = rule_over_budget(ctx(6, over))
    cooling = rule_over_budget(ctx(3, over, state=ScalingState(last_scale_up_at=NOW - 10)))
    # 2 of 5 still starting; TTFT slightly over target calls for 3 + 1: already asked for.
    starting = rule_over_budget(ctx(5, window(violations=60, ttft_s=1.15), ready=3))
    assert at_max is not None and (at_max.reason, at_max.replicas) == (Reason.AT_MAX, 6)
    assert cooling is not None and (cooling.reason, cooling.replicas) == (Reason.UP_COOLDOWN, 3)
    assert starting is not None
    assert (starting.reason, starting.replicas) == (Reason.WAITING_FOR_WORKERS, 5)


def test_rule_over_budget_does_not_apply_within_budget() -> None:
    assert rule_over_budget(ctx(3, window(violations=5))) is None  # exactly the budget
    assert rule_over_budget(ctx(3, window(violations=0))) is None


# -- 4. within budget: scale on the cause ----------------------------------------------


def test_rule_offload_exhausted_adds_one_worker_near_the_budget() -> None:
    decision = rule_offload_exhausted(ctx(3, NEAR_BUDGET, load=EXHAUSTED))
    assert decision is not None
    assert (decision.reason, decision.replicas) == (Reason.OFFLOAD_EXHAUSTED, 4)
    at_max = rule_offload_exhausted(ctx(6, NEAR_BUDGET, load=EXHAUSTED))
    assert at_max is not None and at_max.reason is Reason.AT_MAX


def test_rule_offload_exhausted_does_not_apply_far_from_the_budget_or_with_host_room() -> None:
    assert rule_offload_exhausted(ctx(3, window(violations=3), load=EXHAUSTED)) is None
    assert rule_offload_exhausted(ctx(3, window(violations=9), load=EXHAUSTED)) is None
    roomy = pool(kv_used=1.0, waiting=4, offloaded=6, host_used=0.3)
    assert rule_offload_exhausted(ctx(3, NEAR_BUDGET, load=roomy)) is None
    assert rule_offload_exhausted(ctx(3, NEAR_BUDGET, load=None)) is None


def test_rule_offload_absorbing_holds_while_requests_are_offloaded() -> None:
    absorbing = pool(kv_used=1.0, waiting=4, offloaded=6, host_used=0.3)
    decision = rule_offload_absorbing(ctx(3, NEAR_BUDGET, load=absorbing))
    assert decision is not None
    assert (decision.reason, decision.action) == (Reason.OFFLOAD_ABSORBING, Action.HOLD)
    assert rule_offload_absorbing(ctx(3, NEAR_BUDGET, load=pool())) is None  # none offloaded
    assert rule_offload_absorbing(ctx(3, window(violations=9), load=absorbing)) is None


def test_rule_within_budget_holds_when_not_well_under_it() -> None:
    decision = rule_within_budget(ctx(4, window(violations=4)))
    assert decision is not None
    assert (decision.reason, decision.replicas) == (Reason.WITHIN_BUDGET, 4)
    assert decision.state.calm_since is None  # the excursion restarts the calm
    assert rule_within_budget(ctx(4, window(violations=1))) is None  # well under
    assert rule_within_budget(ctx(4, window(violations=9))) is None  # over


# -- 5. well under budget: scale down --------------------------------------------------


def test_rule_at_min_holds_at_min_replicas() -> None:
    decision = rule_at_min(ctx(2))
    assert decision is not None and (decision.reason, decision.replicas) == (Reason.AT_MIN, 2)
    assert rule_at_min(ctx(3)) is None
    assert rule_at_min(ctx(2, window(violations=4))) is None  # not well under budget


def test_rule_calm_cooldown_counts_the_calm_from_now() -> None:
    decision = rule_calm_cooldown(ctx(4, state=ScalingState()))
    assert decision is not None and decision.reason is Reason.CALM
    assert decision.state.calm_since == NOW
    recent_scale = ScalingState(calm_since=NOW - 1000, last_scale_down_at=NOW - 10)
    assert rule_calm_cooldown(ctx(4, state=recent_scale)) is not None
    assert rule_calm_cooldown(ctx(4, state=CALM)) is None  # calm long enough


def test_rule_workers_busy_holds_when_one_fewer_would_be_too_busy() -> None:
    decision = rule_workers_busy(ctx(4, load=pool(kv_used=0.5)))  # 0.5 * 4/3 > 0.6
    assert decision is not None and decision.reason is Reason.BUSY
    assert rule_workers_busy(ctx(4, load=pool(waiting=2))) is not None
    assert rule_workers_busy(ctx(4, load=pool(kv_used=0.2))) is None
    assert rule_workers_busy(ctx(4, load=pool(kv_used=0.5), state=ScalingState())) is None


def test_rule_scale_down_removes_one_underused_worker() -> None:
    decision = rule_scale_down(ctx(4, load=pool(kv_used=0.2)))
    assert decision is not None
    assert (decision.reason, decision.action, decision.replicas) == (
        Reason.UNDERUSED,
        Action.DOWN,
        3,
    )
    assert decision.state.last_scale_down_at == NOW
    assert decision.state.calm_since is None


@pytest.mark.parametrize(
    "situation",
    [
        pytest.param(ctx(2, load=pool(kv_used=0.2)), id="at-min"),
        pytest.param(ctx(4, load=pool(kv_used=0.2), state=ScalingState()), id="calm-just-began"),
        pytest.param(ctx(4, load=pool(kv_used=0.5)), id="busy-with-one-fewer"),
        pytest.param(ctx(4, window(violations=4), load=pool(kv_used=0.2)), id="not-well-under"),
    ],
)
def test_rule_scale_down_does_not_apply_without_all_its_conditions(
    situation: RuleContext,
) -> None:
    assert rule_scale_down(situation) is None


# -- decide: the first rule that decides wins ------------------------------------------


@pytest.mark.parametrize(
    ("situation", "fired"),
    [
        (ctx(1, window(requests=0)), rule_bounds),
        (ctx(4, window(requests=0)), rule_metrics_missing),
        (ctx(3, window(violations=60, ttft_s=1.8)), rule_over_budget),
        (ctx(3, NEAR_BUDGET, load=EXHAUSTED), rule_offload_exhausted),
        (ctx(3, NEAR_BUDGET, load=pool(offloaded=2, host_used=0.3)), rule_offload_absorbing),
        (ctx(4, window(violations=4)), rule_within_budget),
        (ctx(2), rule_at_min),
        (ctx(4, state=ScalingState()), rule_calm_cooldown),
        (ctx(4, load=pool(kv_used=0.5)), rule_workers_busy),
        (ctx(4, load=pool(kv_used=0.2)), rule_scale_down),
    ],
)
def test_decide_records_the_rule_that_fired(situation: RuleContext, fired: Rule) -> None:
    decision = decide(situation.policy, situation.state, situation.obs)
    assert decision.rule == fired.__name__
    # The decision is the one that rule gives on its own.
    assert decision == fired(situation)


def test_an_earlier_rule_wins_over_a_later_one_that_also_applies() -> None:
    # Below min with a window over budget: both rules apply, the bounds come first.
    situation = ctx(1, window(violations=60, ttft_s=1.8))
    assert rule_over_budget(situation) is not None
    decision = decide(situation.policy, situation.state, situation.obs)
    assert (decision.rule, decision.replicas) == ("rule_bounds", 2)


def test_the_rules_are_applied_in_the_documented_order() -> None:
    assert [r.__name__ for r in RULES] == [
        "rule_bounds",
        "rule_metrics_missing",
        "rule_over_budget",
        "rule_offload_exhausted",
        "rule_offload_absorbing",
        "rule_within_budget",
        "rule_at_min",
        "rule_calm_cooldown",
        "rule_workers_busy",
        "rule_scale_down",
    ]
