"""Operator configuration, from the environment (the chart sets it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorConfig:
    redis_url: str
    redis_prefix: str = "layerkv"
    # How often each ServingSLO is evaluated. Read when the handlers module is imported
    # (Kopf fixes a timer's interval at registration).
    interval_s: float = 10.0
    # Worker load reports older than this are ignored.
    load_stale_after_s: float = 30.0
    # Namespaces to watch; empty means all namespaces (cluster-wide RBAC needed).
    namespaces: tuple[str, ...] = ()
    # Name of the KopfPeering object replicas coordinate through; None: standalone.
    peering_name: str | None = "layerkv-operator"
    liveness_endpoint: str | None = "http://0.0.0.0:8080/healthz"
    # Prometheus exposition port; 0 turns it off.
    metrics_port: int = 9092

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        namespaces = tuple(n.strip() for n in env.get("LAYERKV_OPERATOR_NAMESPACES", "").split(","))
        config = cls(
            redis_url=env.get("LAYERKV_REDIS_URL", "redis://localhost:6379/0"),
            redis_prefix=env.get("LAYERKV_REDIS_PREFIX", "layerkv"),
            interval_s=float(env.get("LAYERKV_OPERATOR_INTERVAL_S", "10")),
            load_stale_after_s=float(env.get("LAYERKV_OPERATOR_LOAD_STALE_S", "30")),
            namespaces=tuple(n for n in namespaces if n),
            peering_name=env.get("LAYERKV_OPERATOR_PEERING", "layerkv-operator") or None,
            liveness_endpoint=env.get("LAYERKV_OPERATOR_LIVENESS", "http://0.0.0.0:8080/healthz")
            or None,
            metrics_port=int(env.get("LAYERKV_METRICS_PORT", "9092")),
        )
        if config.interval_s <= 0 or config.load_stale_after_s <= 0:
            raise ValueError("LAYERKV_OPERATOR_INTERVAL_S and _LOAD_STALE_S must be > 0")
        return config
