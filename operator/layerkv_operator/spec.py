"""The ServingSLO custom resource: its identity and its spec, parsed. Pure.

The CRD (``charts/layerkv/crds/servingslos.layerkv.io.yaml``) is what rejects nonsense
at ``kubectl apply`` time and fills in defaults. The parser applies the same defaults
(a test keeps the two in step) and re-checks the cross-field rules, because an API
server without the CRD's validation (an old one, or a test emulator) could hand the
operator anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from layerkv.common.slo import SloTarget, valid_class_name
from layerkv.policy.scaling import ScalingPolicy

GROUP = "layerkv.io"
VERSION = "v1alpha1"
PLURAL = "servingslos"
KIND = "ServingSLO"

# Defaults of the optional spec fields, as the CRD declares them (nested by path).
DEFAULTS: dict[str, Any] = {
    "percentile": 95,
    "maxViolationRate": 0.05,
    "windowSeconds": 60,
    "minReplicas": 1,
    "minRequests": 20,
    "staleAfterSeconds": 30,
    "scaleUp": {"cooldownSeconds": 60, "maxStep": 4},
    "scaleDown": {"cooldownSeconds": 300, "violationRateFraction": 0.5, "maxUtilization": 0.6},
}


class InvalidSpec(ValueError):
    """The spec cannot be served; the message says what to fix."""


@dataclass(frozen=True)
class ServingSloSpec:
    slo_class: str  # the SLO class name admission and Redis know it by
    worker_deployment: str  # the Deployment (same namespace) whose replicas we own
    target: SloTarget
    policy: ScalingPolicy

    @property
    def window_s(self) -> float:
        return self.target.window_s


def parse_spec(spec: Mapping[str, Any], name: str) -> ServingSloSpec:
    """Validate and convert a ServingSLO ``spec``; ``name`` is the object's name."""

    def get(key: str, section: str | None = None) -> Any:
        src: Mapping[str, Any] = spec
        default: Any = DEFAULTS.get(key)
        if section is not None:
            sub = spec.get(section)
            src = sub if isinstance(sub, Mapping) else {}
            default = DEFAULTS[section][key]
        value = src.get(key, default)
        if value is None:
            where = f"{section}.{key}" if section else key
            raise InvalidSpec(f"spec.{where} is required")
        return value

    try:
        slo_class = str(spec.get("sloClass") or name)
        if not valid_class_name(slo_class):
            raise InvalidSpec(f"SLO class name {slo_class!r} is not a DNS label")
        worker_deployment = get("workerDeployment")
        if not isinstance(worker_deployment, str) or not worker_deployment:
            raise InvalidSpec("spec.workerDeployment must be a non-empty string")
        min_replicas = int(get("minReplicas"))
        max_replicas = int(get("maxReplicas"))
        if min_replicas > max_replicas:
            raise InvalidSpec(
                f"spec.minReplicas {min_replicas} is above spec.maxReplicas {max_replicas}"
            )
        target = SloTarget(
            name=slo_class,
            ttft_s=float(get("ttftMs")) / 1000.0,
            tpot_s=float(get("tpotMs")) / 1000.0,
            percentile=float(get("percentile")),
            max_violation_rate=float(get("maxViolationRate")),
            window_s=float(get("windowSeconds")),
        )
        policy = ScalingPolicy(
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            ttft_target_s=target.ttft_s,
            max_violation_rate=target.max_violation_rate,
            percentile=target.percentile,
            min_requests=int(get("minRequests")),
            stale_after_s=float(get("staleAfterSeconds")),
            scale_up_cooldown_s=float(get("cooldownSeconds", "scaleUp")),
            max_scale_up_step=int(get("maxStep", "scaleUp")),
            scale_down_cooldown_s=float(get("cooldownSeconds", "scaleDown")),
            scale_down_rate_fraction=float(get("violationRateFraction", "scaleDown")),
            scale_down_max_utilization=float(get("maxUtilization", "scaleDown")),
        )
    except InvalidSpec:
        raise
    except (TypeError, ValueError) as e:
        raise InvalidSpec(str(e)) from e
    return ServingSloSpec(
        slo_class=slo_class, worker_deployment=worker_deployment, target=target, policy=policy
    )
