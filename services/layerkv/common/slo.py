"""SLO types and the arithmetic on them. Pure: no I/O, no vLLM.

Shared by the admission service (which records outcomes), the Redis store and the
operator (which reads windowed violation rates and percentiles).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_CLASS = "default"
_CLASS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")

# Upper bounds (seconds) of the latency histogram buckets kept per time bucket in Redis.
# Roughly x2 steps from 5 ms to ~2 min: percentiles are interpolated inside a bucket.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, math.inf,
)  # fmt: skip


def valid_class_name(name: str) -> bool:
    """SLO class names are DNS-label-like, so they can also name Kubernetes objects."""
    return bool(_CLASS_NAME.match(name))


@dataclass(frozen=True)
class SloTarget:
    """Latency targets of one SLO class and its violation budget."""

    name: str
    ttft_s: float
    tpot_s: float
    percentile: float = 95.0
    max_violation_rate: float = 0.05
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if not valid_class_name(self.name):
            raise ValueError(f"invalid SLO class name {self.name!r}")
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ValueError("ttft_s and tpot_s must be > 0")
        if not 0 < self.percentile < 100:
            raise ValueError("percentile must be in (0, 100)")
        if not 0 <= self.max_violation_rate <= 1:
            raise ValueError("max_violation_rate must be in [0, 1]")
        if self.window_s <= 0:
            raise ValueError("window_s must be > 0")


OUTCOME_STATUSES = ("ok", "error", "cancelled", "rejected")


@dataclass(frozen=True)
class RequestOutcome:
    """What happened to one request, as the admission service saw it."""

    request_id: str
    slo_class: str
    status: str  # one of OUTCOME_STATUSES
    finished_at: float  # unix time, seconds
    ttft_s: float | None = None  # None when no token was produced
    tpot_s: float | None = None  # None when fewer than two tokens were produced
    prompt_tokens: int = 0
    output_tokens: int = 0
    worker: str = ""
    predicted_ttft_s: float | None = None
    error: str = ""

    def __post_init__(self) -> None:
        if self.status not in OUTCOME_STATUSES:
            raise ValueError(f"status must be one of {OUTCOME_STATUSES}, not {self.status!r}")


@dataclass(frozen=True)
class Violations:
    ttft: bool
    tpot: bool

    @property
    def any(self) -> bool:
        return self.ttft or self.tpot


def violations(outcome: RequestOutcome, target: SloTarget | None) -> Violations:
    """Which targets a finished request missed.

    A failed or rejected request violates its TTFT target: the user got no answer in
    time. A cancelled one counts only for what it measured before the cancel.
    """
    if target is None:
        return Violations(False, False)
    if outcome.status in ("error", "rejected"):
        return Violations(True, False)
    ttft = outcome.ttft_s is not None and outcome.ttft_s > target.ttft_s
    tpot = outcome.tpot_s is not None and outcome.tpot_s > target.tpot_s
    return Violations(ttft, tpot)


def histogram_index(value_s: float, bounds: Sequence[float] = LATENCY_BUCKETS_S) -> int:
    """Index of the first bucket whose upper bound is >= value."""
    return bisect.bisect_left(bounds, value_s)


def percentile_from_histogram(
    counts: Sequence[int], q: float, bounds: Sequence[float] = LATENCY_BUCKETS_S
) -> float | None:
    """The q-th percentile (0-100) of a bucketed distribution, interpolated linearly
    inside the bucket that holds it (as Prometheus' histogram_quantile does).
    None for an empty histogram."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q / 100.0 * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lower = bounds[i - 1] if i > 0 else 0.0
            upper = bounds[i]
            if math.isinf(upper):
                return lower  # open-ended top bucket: its lower bound is all we know
            return lower + (upper - lower) * ((rank - seen) / c)
        seen += c
    return bounds[-2]


@dataclass(frozen=True)
class WindowStats:
    """Aggregated outcomes of one SLO class over a recent time window."""

    slo_class: str
    window_s: float
    requests: int = 0
    errors: int = 0
    ttft_violations: int = 0
    tpot_violations: int = 0
    violations: int = 0  # requests that missed either target
    ttft_hist: tuple[int, ...] = field(default=(), repr=False)
    tpot_hist: tuple[int, ...] = field(default=(), repr=False)
    newest_at: float | None = None  # finish time of the newest outcome in the window
    # TTFT prediction quality over the outcomes that had a prediction and a first token.
    predicted: int = 0
    ttft_pred_err_sum_s: float = 0.0  # sum of predicted - measured
    ttft_pred_abs_err_sum_s: float = 0.0
    ttft_pred_ape_sum: float = 0.0  # sum of |predicted - measured| / measured

    @property
    def violation_rate(self) -> float | None:
        return self.violations / self.requests if self.requests else None

    @property
    def ttft_mape(self) -> float | None:
        """Mean absolute percentage error of predicted TTFT (0.1 = 10%)."""
        return self.ttft_pred_ape_sum / self.predicted if self.predicted else None

    @property
    def ttft_pred_bias_s(self) -> float | None:
        """Mean signed error (predicted - measured): > 0 means predictions run high."""
        return self.ttft_pred_err_sum_s / self.predicted if self.predicted else None

    @property
    def ttft_pred_mae_s(self) -> float | None:
        return self.ttft_pred_abs_err_sum_s / self.predicted if self.predicted else None

    def ttft_percentile(self, q: float) -> float | None:
        return percentile_from_histogram(self.ttft_hist, q) if self.ttft_hist else None

    def tpot_percentile(self, q: float) -> float | None:
        return percentile_from_histogram(self.tpot_hist, q) if self.tpot_hist else None
