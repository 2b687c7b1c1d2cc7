"""Prometheus metrics of the operator: what it observed and what it decided, per
ServingSLO (``namespace/name``)."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge

from layerkv.policy.scaling import Decision

DECISIONS = Counter(
    "layerkv_operator_decisions_total",
    "Scaling decisions, by ServingSLO, action and reason",
    ["servingslo", "action", "reason"],
)
DESIRED_REPLICAS = Gauge(
    "layerkv_operator_desired_replicas", "Worker replicas the operator wants", ["servingslo"]
)
VIOLATION_RATE = Gauge(
    "layerkv_operator_violation_rate",
    "SLO violation rate over the ServingSLO's window (NaN: no metrics)",
    ["servingslo"],
)
TTFT_PERCENTILE = Gauge(
    "layerkv_operator_ttft_percentile_seconds",
    "Observed TTFT at the ServingSLO's percentile (NaN: no metrics)",
    ["servingslo"],
)
METRICS_AVAILABLE = Gauge(
    "layerkv_operator_metrics_available",
    "1 when fresh SLO metrics were available to decide on",
    ["servingslo"],
)


def observe(servingslo: str, decision: Decision) -> None:
    DECISIONS.labels(servingslo, decision.action.value, decision.reason.value).inc()
    DESIRED_REPLICAS.labels(servingslo).set(decision.replicas)
    nan = float("nan")
    rate = decision.violation_rate
    VIOLATION_RATE.labels(servingslo).set(nan if rate is None else rate)
    ttft = decision.ttft_percentile_s
    TTFT_PERCENTILE.labels(servingslo).set(nan if ttft is None else ttft)
    METRICS_AVAILABLE.labels(servingslo).set(int(decision.metrics_available))


def forget(servingslo: str) -> None:
    """Drop a deleted ServingSLO's series (counters keep their history)."""
    for gauge in (DESIRED_REPLICAS, VIOLATION_RATE, TTFT_PERCENTILE, METRICS_AVAILABLE):
        with contextlib.suppress(KeyError):
            gauge.remove(servingslo)
