"""The ServingSLO ``status``: conditions, observed metrics, remembered scaling state. Pure.

The scaling state (last scale times, start of the calm stretch) lives in the status so
that it survives operator restarts and fails over to the other replica with the lease.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from layerkv.policy.scaling import Action, Decision, Reason, ScalingState

CONDITION_TYPES = ("Ready", "MetricsAvailable", "Scaling", "AtMaxReplicas")


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def to_rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, tz=datetime.UTC).isoformat(timespec="milliseconds")


def from_rfc3339(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def state_from_status(status: Mapping[str, Any]) -> ScalingState:
    """The scaling state remembered in a status (empty for a new object)."""
    return ScalingState(
        last_scale_up_at=from_rfc3339(status.get("lastScaleUpTime")),
        last_scale_down_at=from_rfc3339(status.get("lastScaleDownTime")),
        calm_since=from_rfc3339(status.get("calmSince")),
    )


def merge_conditions(
    old: Sequence[Mapping[str, Any]] | None, new: Sequence[Condition], now: float
) -> list[dict[str, Any]]:
    """Kubernetes-style conditions: ``lastTransitionTime`` moves only when the status
    flips, so ``kubectl describe`` shows how long a condition has held."""
    by_type = {c.get("type"): c for c in old or () if isinstance(c, Mapping)}
    merged: list[dict[str, Any]] = []
    for cond in new:
        status = "True" if cond.status else "False"
        previous = by_type.get(cond.type)
        if previous is not None and previous.get("status") == status:
            since = previous.get("lastTransitionTime") or to_rfc3339(now)
        else:
            since = to_rfc3339(now)
        merged.append(
            {
                "type": cond.type,
                "status": status,
                "reason": cond.reason,
                "message": cond.message,
                "lastTransitionTime": since,
            }
        )
    return merged


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def evaluated_status(
    *,
    old_status: Mapping[str, Any],
    generation: int | None,
    slo_class: str,
    decision: Decision,
    replicas: int,
    ready_replicas: int | None,
    requests: int,
    now: float,
    scaled: bool,
) -> dict[str, Any]:
    """The status after one evaluation. ``replicas`` is the Deployment's replica count
    after it; ``scaled`` says whether it was changed to ``decision.replicas``."""
    state = decision.state
    if not scaled and decision.action is not Action.HOLD:
        # The patch did not go through: do not remember a scaling that did not happen.
        state = state_from_status(old_status)
    conditions = [
        Condition("Ready", True, "Reconciled", f"scaling for SLO class {slo_class!r}"),
        Condition(
            "MetricsAvailable",
            decision.metrics_available,
            "MetricsFresh" if decision.metrics_available else decision.reason.value,
            decision.message
            if not decision.metrics_available
            else f"{requests} outcomes in the window",
        ),
        Condition(
            "Scaling",
            scaled and decision.action is not Action.HOLD,
            decision.reason.value,
            decision.message,
        ),
        Condition(
            "AtMaxReplicas",
            decision.at_max_replicas,
            Reason.AT_MAX.value if decision.at_max_replicas else "BelowMaxReplicas",
            f"{decision.replicas} replicas",
        ),
    ]
    last_scale = state.last_scale_at
    return {
        "observedGeneration": generation,
        "sloClass": slo_class,
        "replicas": replicas,
        "readyReplicas": ready_replicas,
        "requests": requests,
        "violationRate": None
        if decision.violation_rate is None
        else round(decision.violation_rate, 4),
        "ttftPercentileMs": _ms(decision.ttft_percentile_s),
        "tpotPercentileMs": _ms(decision.tpot_percentile_s),
        "lastDecision": {
            "action": decision.action.value,
            "reason": decision.reason.value,
            "message": decision.message,
            "rule": decision.rule,
        },
        "lastEvaluationTime": to_rfc3339(now),
        "lastScaleTime": to_rfc3339(last_scale),
        "lastScaleUpTime": to_rfc3339(state.last_scale_up_at),
        "lastScaleDownTime": to_rfc3339(state.last_scale_down_at),
        "calmSince": to_rfc3339(state.calm_since),
        "conditions": merge_conditions(old_status.get("conditions"), conditions, now),
    }


def not_ready_status(
    *, old_status: Mapping[str, Any], generation: int | None, reason: str, message: str, now: float
) -> dict[str, Any]:
    """The status when the object cannot be served (bad spec, missing Deployment)."""
    conditions = [
        Condition("Ready", False, reason, message),
        Condition("Scaling", False, reason, "not scaling: " + message),
    ]
    kept = [
        c
        for c in old_status.get("conditions") or ()
        if isinstance(c, Mapping) and c.get("type") not in ("Ready", "Scaling")
    ]
    return {
        "observedGeneration": generation,
        "lastEvaluationTime": to_rfc3339(now),
        "conditions": kept + merge_conditions(old_status.get("conditions"), conditions, now),
    }
