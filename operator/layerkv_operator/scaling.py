"""The scaling decision: how many workers a ServingSLO's Deployment should run. Pure.

No I/O, no clock, no Kubernetes or Redis imports: everything the decision depends on
comes in as arguments (:class:`ScalingPolicy`, :class:`ScalingState`,
:class:`Observation`) and everything it decides goes out in :class:`Decision`, so the
policy is unit-tested and simulated over hours in milliseconds.

The rules, in the order they are applied:

1. **Bounds** are hard: a Deployment outside ``[min, max]`` is brought inside, whatever
   the metrics say.
2. **No action on missing or stale metrics.** No outcomes in the window, too few to be a
   rate, outcomes older than ``stale_after_s``, or Redis unreachable: hold, and say why
   (``metrics_available`` is False). Holding is the safe choice because acting on no
   evidence is how autoscalers flap when a metric goes missing.
3. **Scale up** when the violation rate exceeds the budget. The step grows with how far
   the TTFT percentile is above target (``ceil(ready * (p/target - 1))``, like the HPA's
   ratio rule), between 1 and ``max_scale_up_step``. It counts from the *ready*
   replicas, so pods already on their way are not ordered twice. A scale-up cooldown
   lets the new pods show in the window before the next step.
4. **Scale on the cause.** Within budget, queueing or a full device KV cache alone is
   no reason to add pods: if LayerKV offload is holding requests' KV in host memory and
   the budget holds, offload is absorbing the pressure (hold, and say so). Only when the
   rate nears the budget *and* the offload space is exhausted (or requests queue with no
   offload to fall back on) is one pod added before the budget breaks.
5. **Scale down** one step only after the rate has stayed well under budget
   (``<= scale_down_rate_fraction * budget``) for ``scale_down_cooldown_s``, no scaling
   happened in that time, and the workers are underused *after* removing one: the
   projected KV utilisation (or, without load reports, the projected TTFT percentile)
   stays far from the level that scaled up. The gap between the up threshold (the
   budget) and the down condition (half the budget, sustained, with projected headroom)
   is the hysteresis that keeps a steady load from oscillating.
"""

from __future__ import annotations

import enum
import math
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


def decide(policy: ScalingPolicy, state: ScalingState, obs: Observation) -> Decision:
    """The replica count for the Deployment now, with the reason. See the module doc."""
    current = obs.replicas
    window = obs.window
    rate = window.violation_rate if window is not None else None
    ttft_p = window.ttft_percentile(policy.percentile) if window is not None else None
    tpot_p = window.tpot_percentile(policy.percentile) if window is not None else None

    def result(
        replicas: int,
        reason: Reason,
        message: str,
        *,
        metrics_available: bool = True,
        new_state: ScalingState = state,
    ) -> Decision:
        action = (
            Action.UP if replicas > current else Action.DOWN if replicas < current else Action.HOLD
        )
        if action is Action.UP:
            new_state = replace(new_state, last_scale_up_at=obs.now, calm_since=None)
        elif action is Action.DOWN:
            # Calm must be proven again at the new size before the next step down.
            new_state = replace(new_state, last_scale_down_at=obs.now, calm_since=None)
        return Decision(
            replicas=replicas,
            action=action,
            reason=reason,
            message=message,
            metrics_available=metrics_available,
            state=new_state,
            at_max_replicas=replicas >= policy.max_replicas,
            violation_rate=rate,
            ttft_percentile_s=ttft_p,
            tpot_percentile_s=tpot_p,
        )

    # 1. Bounds first: they do not depend on any metric.
    if current < policy.min_replicas:
        return result(
            policy.min_replicas,
            Reason.BELOW_MIN,
            f"{current} replicas is below minReplicas {policy.min_replicas}",
            metrics_available=_metrics_usable(policy, obs) is None,
        )
    if current > policy.max_replicas:
        return result(
            policy.max_replicas,
            Reason.ABOVE_MAX,
            f"{current} replicas is above maxReplicas {policy.max_replicas}",
            metrics_available=_metrics_usable(policy, obs) is None,
        )

    # 2. No evidence, no action. Calm must be continuous, so a gap restarts it.
    missing = _metrics_usable(policy, obs)
    if missing is not None:
        reason, message = missing
        return result(
            current,
            reason,
            f"holding at {current}: {message}",
            metrics_available=False,
            new_state=replace(state, calm_since=None),
        )
    assert window is not None and rate is not None  # guaranteed by _metrics_usable
    budget = policy.max_violation_rate
    pct = _pct_label(policy.percentile)
    rate_text = f"violation rate {rate:.3f} ({window.violations}/{window.requests})"
    load = obs.load if obs.load is not None and obs.load.workers > 0 else None

    # 3. Over budget: add capacity, sized by how far TTFT is off target.
    if rate > budget:
        not_calm = replace(state, calm_since=None)
        if current >= policy.max_replicas:
            return result(
                current,
                Reason.AT_MAX,
                f"{rate_text} exceeds budget {budget} but already at maxReplicas {current}",
                new_state=not_calm,
            )
        if _within(state.last_scale_up_at, policy.scale_up_cooldown_s, obs.now):
            return result(
                current,
                Reason.UP_COOLDOWN,
                f"{rate_text} exceeds budget {budget}; waiting for the last scale-up "
                f"to take effect (cooldown {policy.scale_up_cooldown_s:g}s)",
                new_state=not_calm,
            )
        ready = current if obs.ready_replicas is None else min(obs.ready_replicas, current)
        step = _up_step(policy, ttft_p, max(ready, 1))
        desired = min(policy.max_replicas, ready + step)
        if desired <= current:
            return result(
                current,
                Reason.WAITING_FOR_WORKERS,
                f"{rate_text} exceeds budget {budget}; {current - ready} of {current} "
                f"workers are not ready yet, they are the extra capacity asked for",
                new_state=not_calm,
            )
        ttft_text = f"{pct} TTFT {ttft_p * 1000:.0f} ms" if ttft_p is not None else "TTFT n/a"
        return result(
            desired,
            Reason.OVER_BUDGET,
            f"{rate_text} exceeds budget {budget}, {ttft_text} vs target "
            f"{policy.ttft_target_s * 1000:.0f} ms: {current} -> {desired}",
            new_state=not_calm,
        )

    # 4. Within budget. Is there pressure that offload can no longer absorb?
    if (
        rate > policy.pressure_rate_fraction * budget
        and load is not None
        and _offload_exhausted(policy, load)
    ):
        not_calm = replace(state, calm_since=None)
        pressure = f"{rate_text} near budget {budget} and LayerKV offload can absorb no more"
        if current >= policy.max_replicas:
            return result(
                current,
                Reason.AT_MAX,
                f"{pressure} ({_offload_text(load)}), but already at maxReplicas {current}",
                new_state=not_calm,
            )
        if _within(state.last_scale_up_at, policy.scale_up_cooldown_s, obs.now):
            return result(
                current,
                Reason.UP_COOLDOWN,
                f"{pressure}; waiting for the last scale-up to take effect",
                new_state=not_calm,
            )
        return result(
            current + 1,
            Reason.OFFLOAD_EXHAUSTED,
            f"{pressure} ({_offload_text(load)}): {current} -> {current + 1}",
            new_state=not_calm,
        )

    # Calm (well under budget) must be continuous: any excursion restarts it.
    well_under = rate <= policy.scale_down_rate_fraction * budget
    calm_since = (
        (state.calm_since if state.calm_since is not None else obs.now) if well_under else None
    )
    calm_state = replace(state, calm_since=calm_since)
    if load is not None and load.offloaded_requests > 0:
        # Device KV is short but offload keeps the SLO: neither more pods (the budget
        # holds) nor fewer (the workers are using memory beyond their device).
        return result(
            current,
            Reason.OFFLOAD_ABSORBING,
            f"{rate_text} within budget {budget}: LayerKV offload is absorbing the "
            f"pressure ({_offload_text(load)}), no scaling needed",
            new_state=calm_state,
        )
    if calm_since is None:
        return result(
            current,
            Reason.WITHIN_BUDGET,
            f"{rate_text} within budget {budget}",
            new_state=calm_state,
        )

    # 5. Well under budget: count the calm, then check that one worker can go.
    if current <= policy.min_replicas:
        return result(
            current,
            Reason.AT_MIN,
            f"{rate_text} well under budget {budget}; at minReplicas {current}",
            new_state=calm_state,
        )
    last_scale = state.last_scale_at
    calm_for = obs.now - calm_since
    since_scale = math.inf if last_scale is None else obs.now - last_scale
    if min(calm_for, since_scale) < policy.scale_down_cooldown_s:
        return result(
            current,
            Reason.CALM,
            f"{rate_text} well under budget {budget} for {calm_for:.0f}s; scale-down "
            f"needs {policy.scale_down_cooldown_s:g}s of calm since the last scaling",
            new_state=calm_state,
        )
    busy = _busy_after_removing_one(policy, current, ttft_p, load)
    if busy is not None:
        return result(current, Reason.BUSY, f"{rate_text}; {busy}", new_state=calm_state)
    return result(
        current - 1,
        Reason.UNDERUSED,
        f"{rate_text} well under budget {budget} for {calm_for:.0f}s and workers "
        f"underused: {current} -> {current - 1}",
        new_state=calm_state,
    )


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
