"""The scaling decision: how many workers a ServingSLO's Deployment should run. Pure.

No I/O, no clock, no Kubernetes or Redis imports: everything the decision depends on
comes in as arguments (:class:`ScalingPolicy`, :class:`ScalingState`,
:class:`Observation`) and everything it decides goes out in :class:`Decision`, so the
policy is unit-tested and simulated over hours in milliseconds.

:func:`decide` applies the rules of :data:`RULES` in order; each rule is a named
function of a :class:`RuleContext` that returns a :class:`Decision` or None (it does
not apply), and the first decision wins. ``Decision.rule`` names the rule that fired.

The rules, in the order they are applied:

1. **Bounds** are hard (:func:`rule_bounds`): a Deployment outside ``[min, max]`` is
   brought inside, whatever the metrics say.
2. **No action on missing or stale metrics** (:func:`rule_metrics_missing`). No
   outcomes in the window, too few to be a rate, outcomes older than ``stale_after_s``,
   or Redis unreachable: hold, and say why (``metrics_available`` is False). Holding is
   the safe choice because acting on no evidence is how autoscalers flap when a metric
   goes missing.
3. **Scale up** when the violation rate exceeds the budget (:func:`rule_over_budget`).
   The step grows with how far the TTFT percentile is above target
   (``ceil(ready * (p/target - 1))``, like the HPA's ratio rule), between 1 and
   ``max_scale_up_step``. It counts from the *ready* replicas, so pods already on their
   way are not ordered twice. A scale-up cooldown lets the new pods show in the window
   before the next step.
4. **Scale on the cause.** Within budget, queueing or a full device KV cache alone is
   no reason to add pods: if LayerKV offload is holding requests' KV in host memory and
   the budget holds, offload is absorbing the pressure (hold, and say so:
   :func:`rule_offload_absorbing`). Only when the rate nears the budget *and* the
   offload space is exhausted (or requests queue with no offload to fall back on) is one
   pod added before the budget breaks (:func:`rule_offload_exhausted`, applied first).
   Otherwise, unless the rate is well under budget, hold (:func:`rule_within_budget`).
5. **Scale down** one step only after the rate has stayed well under budget
   (``<= scale_down_rate_fraction * budget``) for ``scale_down_cooldown_s``, no scaling
   happened in that time, and the workers are underused *after* removing one: the
   projected KV utilisation (or, without load reports, the projected TTFT percentile)
   stays far from the level that scaled up. The gap between the up threshold (the
   budget) and the down condition (half the budget, sustained, with projected headroom)
   is the hysteresis that keeps a steady load from oscillating. The holds on the way
   say which condition is missing: :func:`rule_at_min`, :func:`rule_calm_cooldown`,
   :func:`rule_workers_busy`; then :func:`rule_scale_down` takes the step.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from layerkv.common.load import PoolLoad
from layerkv.common.slo import WindowStats


class Action(enum.StrEnum):
    HOLD = "Hold"
    UP = "ScaleUp"
    DOWN = "ScaleDown"


class Reason(enum.StrEnum):
    """Why a decision was taken; also the ``reason`` of the status conditions."""

    BELOW_MIN = "BelowMinReplicas"
    ABOVE_MAX = "AboveMaxReplicas"
    NO_METRICS = "NoMetrics"
    STORE_UNAVAILABLE = "StoreUnavailable"
    TOO_FEW_REQUESTS = "TooFewRequests"
    STALE_METRICS = "StaleMetrics"
    OVER_BUDGET = "ViolationRateOverBudget"
    AT_MAX = "AtMaxReplicas"
    UP_COOLDOWN = "ScaleUpCooldown"
    WAITING_FOR_WORKERS = "WaitingForWorkers"
    OFFLOAD_EXHAUSTED = "OffloadExhausted"
    OFFLOAD_ABSORBING = "OffloadAbsorbing"
    WITHIN_BUDGET = "WithinBudget"
    CALM = "CalmCooldown"
    BUSY = "WorkersBusy"
    AT_MIN = "AtMinReplicas"
    UNDERUSED = "Underused"


@dataclass(frozen=True)
class ScalingPolicy:
    """The knobs of one ServingSLO (its spec, with defaults applied)."""

    min_replicas: int
    max_replicas: int
    ttft_target_s: float
    max_violation_rate: float  # the budget: fraction of requests allowed to miss a target
    percentile: float = 95.0
    min_requests: int = 20  # fewer outcomes in the window are not a rate
    stale_after_s: float = 30.0  # newest outcome older than this: the metrics are stale
    scale_up_cooldown_s: float = 60.0
    max_scale_up_step: int = 4
    scale_down_cooldown_s: float = 300.0
    scale_down_rate_fraction: float = 0.5  # "well under budget" = rate <= this * budget
    # After removing one worker, the pool's projected KV utilisation must stay <= this.
    scale_down_max_utilization: float = 0.6
    # Without load reports: the projected TTFT percentile must stay <= this * target.
    scale_down_max_ttft_fraction: float = 0.5
    # Within budget, a rate above this * budget is "near the budget" (pre-emptive step).
    pressure_rate_fraction: float = 0.8
    # Host (offload) KV utilisation at or above this means offload can absorb no more.
    offload_exhausted_utilization: float = 0.9

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        if self.ttft_target_s <= 0:
            raise ValueError("ttft_target_s must be > 0")
        if not 0 <= self.max_violation_rate <= 1:
            raise ValueError("max_violation_rate must be in [0, 1]")
        if not 0 < self.percentile < 100:
            raise ValueError("percentile must be in (0, 100)")
        if self.min_requests < 1 or self.max_scale_up_step < 1:
            raise ValueError("min_requests and max_scale_up_step must be >= 1")
        if min(self.stale_after_s, self.scale_up_cooldown_s, self.scale_down_cooldown_s) < 0:
            raise ValueError("durations must be >= 0")
        for name in (
            "scale_down_rate_fraction",
            "scale_down_max_utilization",
            "scale_down_max_ttft_fraction",
            "pressure_rate_fraction",
            "offload_exhausted_utilization",
        ):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        if self.scale_down_rate_fraction >= self.pressure_rate_fraction:
            # Otherwise one rate could both count as calm and as pressure: no hysteresis.
            raise ValueError(
                "scale_down_rate_fraction must be < pressure_rate_fraction (hysteresis)"
            )


@dataclass(frozen=True)
class ScalingState:
    """What the policy remembers between evaluations (kept in the CR's status, so an
    operator restart or a failover to the other replica does not reset cooldowns)."""

    last_scale_up_at: float | None = None
    last_scale_down_at: float | None = None
    calm_since: float | None = None  # start of the current stretch well under budget

    @property
    def last_scale_at(self) -> float | None:
        times = [t for t in (self.last_scale_up_at, self.last_scale_down_at) if t is not None]
        return max(times) if times else None


@dataclass(frozen=True)
class Observation:
    """What the operator saw this time."""

    now: float  # unix time, seconds
    replicas: int  # the Deployment's spec.replicas
    ready_replicas: int | None  # the Deployment's status.readyReplicas; None if unknown
    window: WindowStats | None  # None when the metrics store could not be read
    load: PoolLoad | None = None  # None or workers == 0 when no fresh load reports


@dataclass(frozen=True)
class Decision:
    replicas: int  # the desired spec.replicas
    action: Action
    reason: Reason
    message: str
    metrics_available: bool
    state: ScalingState  # the state to remember for the next evaluation
    at_max_replicas: bool
    violation_rate: float | None = None
    ttft_percentile_s: float | None = None
    tpot_percentile_s: float | None = None
    rule: str = ""  # the name of the rule that fired; set by the @rule decorator


@dataclass(frozen=True)
class RuleContext:
    """One evaluation's inputs and the values derived from them, shared by the rules."""

    policy: ScalingPolicy
    state: ScalingState
    obs: Observation
    rate: float | None  # the window's violation rate; None without a window
    ttft_p: float | None
    tpot_p: float | None
    # Why the window is no evidence to act on; None when it is.
    missing: tuple[Reason, str] | None
    load: PoolLoad | None  # None unless fresh load reports came from some worker

    @classmethod
    def of(cls, policy: ScalingPolicy, state: ScalingState, obs: Observation) -> RuleContext:
        window = obs.window
        return cls(
            policy=policy,
            state=state,
            obs=obs,
            rate=window.violation_rate if window is not None else None,
            ttft_p=window.ttft_percentile(policy.percentile) if window is not None else None,
            tpot_p=window.tpot_percentile(policy.percentile) if window is not None else None,
            missing=_metrics_usable(policy, obs),
            load=obs.load if obs.load is not None and obs.load.workers > 0 else None,
        )

    @property
    def current(self) -> int:
        return self.obs.replicas

    @property
    def budget(self) -> float:
        return self.policy.max_violation_rate

    @property
    def rate_text(self) -> str:
        window = self.obs.window
        assert window is not None  # only rules past rule_metrics_missing use it
        return f"violation rate {self.rate:.3f} ({window.violations}/{window.requests})"

    @property
    def not_calm(self) -> ScalingState:
        return replace(self.state, calm_since=None)

    @property
    def calm_since(self) -> float | None:
        """Start of the stretch well under budget, counting this evaluation; None when
        the rate is not well under budget (calm must be continuous: an excursion
        restarts it)."""
        if self.rate is None or self.rate > self.policy.scale_down_rate_fraction * self.budget:
            return None
        return self.state.calm_since if self.state.calm_since is not None else self.obs.now

    @property
    def calm_state(self) -> ScalingState:
        return replace(self.state, calm_since=self.calm_since)

    def decision(
        self,
        replicas: int,
        reason: Reason,
        message: str,
        *,
        metrics_available: bool = True,
        new_state: ScalingState | None = None,
    ) -> Decision:
        """The decision for ``replicas``, with the scale times it implies remembered."""
        current = self.current
        state = self.state if new_state is None else new_state
        action = (
            Action.UP if replicas > current else Action.DOWN if replicas < current else Action.HOLD
        )
        if action is Action.UP:
            state = replace(state, last_scale_up_at=self.obs.now, calm_since=None)
        elif action is Action.DOWN:
            # Calm must be proven again at the new size before the next step down.
            state = replace(state, last_scale_down_at=self.obs.now, calm_since=None)
        return Decision(
            replicas=replicas,
            action=action,
            reason=reason,
            message=message,
            metrics_available=metrics_available,
            state=state,
            at_max_replicas=replicas >= self.policy.max_replicas,
            violation_rate=self.rate,
            ttft_percentile_s=self.ttft_p,
            tpot_percentile_s=self.tpot_p,
        )


Rule = Callable[[RuleContext], Decision | None]


def rule(fn: Rule) -> Rule:
    """Marks a rule: its decisions carry its name, so a decision says which rule fired."""

    @functools.wraps(fn)
    def named(ctx: RuleContext) -> Decision | None:
        decision = fn(ctx)
        return None if decision is None else replace(decision, rule=fn.__name__)

    return named


# -- 1. bounds -------------------------------------------------------------------------


@rule
def rule_bounds(ctx: RuleContext) -> Decision | None:
    """Outside ``[min, max]``: back inside. First, because bounds do not depend on any
    metric."""
    policy, current = ctx.policy, ctx.current
    if current < policy.min_replicas:
        replicas, reason = policy.min_replicas, Reason.BELOW_MIN
        message = f"{current} replicas is below minReplicas {policy.min_replicas}"
    elif current > policy.max_replicas:
        replicas, reason = policy.max_replicas, Reason.ABOVE_MAX
        message = f"{current} replicas is above maxReplicas {policy.max_replicas}"
    else:
        return None
    return ctx.decision(replicas, reason, message, metrics_available=ctx.missing is None)


# -- 2. no evidence, no action ---------------------------------------------------------


@rule
def rule_metrics_missing(ctx: RuleContext) -> Decision | None:
    """No usable window: hold. Calm must be continuous, so a gap restarts it."""
    if ctx.missing is None:
        return None
    reason, message = ctx.missing
    return ctx.decision(
        ctx.current,
        reason,
        f"holding at {ctx.current}: {message}",
        metrics_available=False,
        new_state=ctx.not_calm,
    )


# -- 3. over budget --------------------------------------------------------------------


@rule
def rule_over_budget(ctx: RuleContext) -> Decision | None:
    """Over budget: add capacity, sized by how far TTFT is off target, unless at max,
    cooling down, or the pods asked for are still starting."""
    policy, obs, current = ctx.policy, ctx.obs, ctx.current
    if ctx.rate is None or ctx.rate <= ctx.budget:
        return None
    over = f"{ctx.rate_text} exceeds budget {ctx.budget}"
    if current >= policy.max_replicas:
        return ctx.decision(
            current,
            Reason.AT_MAX,
            f"{over} but already at maxReplicas {current}",
            new_state=ctx.not_calm,
        )
    if _within(ctx.state.last_scale_up_at, policy.scale_up_cooldown_s, obs.now):
        return ctx.decision(
            current,
            Reason.UP_COOLDOWN,
            f"{over}; waiting for the last scale-up to take effect "
            f"(cooldown {policy.scale_up_cooldown_s:g}s)",
            new_state=ctx.not_calm,
        )
    ready = current if obs.ready_replicas is None else min(obs.ready_replicas, current)
    desired = min(policy.max_replicas, ready + _up_step(policy, ctx.ttft_p, max(ready, 1)))
    if desired <= current:
        return ctx.decision(
            current,
            Reason.WAITING_FOR_WORKERS,
            f"{over}; {current - ready} of {current} workers are not ready yet, they are "
            f"the extra capacity asked for",
            new_state=ctx.not_calm,
        )
    pct = _pct_label(policy.percentile)
    ttft_text = f"{pct} TTFT {ctx.ttft_p * 1000:.0f} ms" if ctx.ttft_p is not None else "TTFT n/a"
    return ctx.decision(
        desired,
        Reason.OVER_BUDGET,
        f"{over}, {ttft_text} vs target {policy.ttft_target_s * 1000:.0f} ms: "
        f"{current} -> {desired}",
        new_state=ctx.not_calm,
    )


# -- 4. within budget: scale on the cause ----------------------------------------------


@rule
def rule_offload_exhausted(ctx: RuleContext) -> Decision | None:
    """Near the budget (but within it) and offload can absorb no more: one pod now,
    before the budget breaks."""
    policy, current, load = ctx.policy, ctx.current, ctx.load
    near_budget = (
        ctx.rate is not None and policy.pressure_rate_fraction * ctx.budget < ctx.rate <= ctx.budget
    )
    if not near_budget or load is None or not _offload_exhausted(policy, load):
        return None
    pressure = f"{ctx.rate_text} near budget {ctx.budget} and LayerKV offload can absorb no more"
    if current >= policy.max_replicas:
        return ctx.decision(
            current,
            Reason.AT_MAX,
            f"{pressure} ({_offload_text(load)}), but already at maxReplicas {current}",
            new_state=ctx.not_calm,
        )
    if _within(ctx.state.last_scale_up_at, policy.scale_up_cooldown_s, ctx.obs.now):
        return ctx.decision(
            current,
            Reason.UP_COOLDOWN,
            f"{pressure}; waiting for the last scale-up to take effect",
            new_state=ctx.not_calm,
        )
    return ctx.decision(
        current + 1,
        Reason.OFFLOAD_EXHAUSTED,
        f"{pressure} ({_offload_text(load)}): {current} -> {current + 1}",
        new_state=ctx.not_calm,
    )


@rule
def rule_offload_absorbing(ctx: RuleContext) -> Decision | None:
    """Within budget with requests offloaded: device KV is short but offload keeps the
    SLO, so neither more pods (the budget holds) nor fewer (the workers are using memory
    beyond their device)."""
    load = ctx.load
    if ctx.rate is None or ctx.rate > ctx.budget or load is None or load.offloaded_requests <= 0:
        return None
    return ctx.decision(
        ctx.current,
        Reason.OFFLOAD_ABSORBING,
        f"{ctx.rate_text} within budget {ctx.budget}: LayerKV offload is absorbing the "
        f"pressure ({_offload_text(load)}), no scaling needed",
        new_state=ctx.calm_state,
    )


@rule
def rule_within_budget(ctx: RuleContext) -> Decision | None:
    """Within budget but not well under it: hold, and the calm stretch restarts."""
    if ctx.rate is None or ctx.rate > ctx.budget or ctx.calm_since is not None:
        return None
    return ctx.decision(
        ctx.current,
        Reason.WITHIN_BUDGET,
        f"{ctx.rate_text} within budget {ctx.budget}",
        new_state=ctx.calm_state,
    )


# -- 5. well under budget: scale down --------------------------------------------------


@rule
def rule_at_min(ctx: RuleContext) -> Decision | None:
    """Well under budget at minReplicas: nothing to remove."""
    if ctx.calm_since is None or ctx.current > ctx.policy.min_replicas:
        return None
    return ctx.decision(
        ctx.current,
        Reason.AT_MIN,
        f"{ctx.rate_text} well under budget {ctx.budget}; at minReplicas {ctx.current}",
        new_state=ctx.calm_state,
    )


@rule
def rule_calm_cooldown(ctx: RuleContext) -> Decision | None:
    """Well under budget, but not yet for the scale-down cooldown since the calm began
    and since the last scaling: keep counting."""
    calm_since = ctx.calm_since
    if calm_since is None or ctx.current <= ctx.policy.min_replicas or _calm_long_enough(ctx):
        return None
    return ctx.decision(
        ctx.current,
        Reason.CALM,
        f"{ctx.rate_text} well under budget {ctx.budget} for {ctx.obs.now - calm_since:.0f}s; "
        f"scale-down needs {ctx.policy.scale_down_cooldown_s:g}s of calm since the last "
        f"scaling",
        new_state=ctx.calm_state,
    )


@rule
def rule_workers_busy(ctx: RuleContext) -> Decision | None:
    """Calm long enough, but one worker fewer would push the rest back towards the
    budget: hold."""
    if ctx.calm_since is None or ctx.current <= ctx.policy.min_replicas:
        return None
    if not _calm_long_enough(ctx):
        return None
    busy = _busy_after_removing_one(ctx.policy, ctx.current, ctx.ttft_p, ctx.load)
    if busy is None:
        return None
    return ctx.decision(
        ctx.current, Reason.BUSY, f"{ctx.rate_text}; {busy}", new_state=ctx.calm_state
    )


@rule
def rule_scale_down(ctx: RuleContext) -> Decision | None:
    """Calm long enough and the workers underused with one fewer: remove one."""
    calm_since, current = ctx.calm_since, ctx.current
    if calm_since is None or current <= ctx.policy.min_replicas or not _calm_long_enough(ctx):
        return None
    if _busy_after_removing_one(ctx.policy, current, ctx.ttft_p, ctx.load) is not None:
        return None
    return ctx.decision(
        current - 1,
        Reason.UNDERUSED,
        f"{ctx.rate_text} well under budget {ctx.budget} for {ctx.obs.now - calm_since:.0f}s "
        f"and workers underused: {current} -> {current - 1}",
        new_state=ctx.calm_state,
    )


# The order is the policy: the first rule that decides wins (see the module doc).
RULES: tuple[Rule, ...] = (
    rule_bounds,
    rule_metrics_missing,
    rule_over_budget,
    rule_offload_exhausted,
    rule_offload_absorbing,
    rule_within_budget,
    rule_at_min,
    rule_calm_cooldown,
    rule_workers_busy,
    rule_scale_down,
)


def decide(policy: ScalingPolicy, state: ScalingState, obs: Observation) -> Decision:
    """The replica count for the Deployment now, with the reason and the rule that
    fired. See the module doc."""
    ctx = RuleContext.of(policy, state, obs)
    for candidate in RULES:
        decision = candidate(ctx)
        if decision is not None:
            return decision
    # The rules cover every case: past the bounds and the metrics check the rate is
    # over budget, within it but not calm, or calm (at min, counting, busy, or down).
    raise AssertionError("no scaling rule applied")


# -- helpers ---------------------------------------------------------------------------


def _metrics_usable(policy: ScalingPolicy, obs: Observation) -> tuple[Reason, str] | None:
    """None when the window is evidence enough to act on, else why not."""
    window = obs.window
    if window is None:
        return Reason.STORE_UNAVAILABLE, "the metrics store could not be read"
    if window.requests == 0 or window.newest_at is None:
        return Reason.NO_METRICS, f"no request outcomes in the last {window.window_s:g}s"
    if window.requests < policy.min_requests:
        return (
            Reason.TOO_FEW_REQUESTS,
            f"{window.requests} outcomes in the window, fewer than minRequests "
            f"{policy.min_requests}",
        )
    age = obs.now - window.newest_at
    if age > policy.stale_after_s:
        return (
            Reason.STALE_METRICS,
            f"newest outcome is {age:.0f}s old (staleAfterSeconds {policy.stale_after_s:g})",
        )
    return None


def _calm_long_enough(ctx: RuleContext) -> bool:
    """True when both the calm stretch and the time since the last scaling have lasted
    the scale-down cooldown."""
    calm_since = ctx.calm_since
    if calm_since is None:
        return False
    last_scale = ctx.state.last_scale_at
    since_scale = math.inf if last_scale is None else ctx.obs.now - last_scale
    return min(ctx.obs.now - calm_since, since_scale) >= ctx.policy.scale_down_cooldown_s


def _up_step(policy: ScalingPolicy, ttft_p: float | None, ready: int) -> int:
    """How many workers to add: proportional to how far TTFT is above target."""
    if ttft_p is None or ttft_p <= policy.ttft_target_s:
        # Over budget on TPOT or errors while TTFT holds: one careful step.
        return 1
    ratio = ttft_p / policy.ttft_target_s
    return max(1, min(policy.max_scale_up_step, math.ceil(ready * (ratio - 1.0))))


def _offload_exhausted(policy: ScalingPolicy, load: PoolLoad) -> bool:
    """True when LayerKV offload cannot take more pressure."""
    host = load.host_kv_utilization
    if host is not None:
        return host >= policy.offload_exhausted_utilization
    # No offload space at all (plug-in off): requests queueing is the pressure.
    return load.waiting > 0


def _busy_after_removing_one(
    policy: ScalingPolicy, current: int, ttft_p: float | None, load: PoolLoad | None
) -> str | None:
    """None when one worker can go without pushing the rest back towards the budget."""
    scale = current / (current - 1)
    if load is not None:
        if load.waiting > 0:
            return f"{load.waiting} requests waiting in the engines"
        util = load.kv_utilization
        if util is not None:
            projected = util * scale
            if projected > policy.scale_down_max_utilization:
                return (
                    f"KV utilisation would be {projected:.2f} on {current - 1} workers "
                    f"(limit {policy.scale_down_max_utilization:g})"
                )
            return None
    # No load reports: the TTFT percentile is the proxy for how busy workers are.
    if ttft_p is None:
        return "no TTFT measurements to judge worker use"
    projected_ttft = ttft_p * scale
    limit = policy.scale_down_max_ttft_fraction * policy.ttft_target_s
    if projected_ttft > limit:
        return (
            f"TTFT would be ~{projected_ttft * 1000:.0f} ms on {current - 1} workers "
            f"(limit {limit * 1000:.0f} ms)"
        )
    return None


def _within(since: float | None, duration_s: float, now: float) -> bool:
    return since is not None and now - since < duration_s


def _offload_text(load: PoolLoad) -> str:
    host = load.host_kv_utilization
    host_text = f"host KV {host:.0%} used" if host is not None else "no host KV space"
    return f"{load.offloaded_requests} requests offloaded, {host_text}, {load.waiting} waiting"


def _pct_label(percentile: float) -> str:
    return f"p{percentile:g}"
