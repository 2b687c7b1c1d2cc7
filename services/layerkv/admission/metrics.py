"""Prometheus metrics of the admission service."""

from prometheus_client import Counter, Gauge, Histogram

from layerkv.common.slo import LATENCY_BUCKETS_S

REQUESTS = Counter(
    "layerkv_admission_requests_total",
    "Requests finished by the admission service, by SLO class and outcome",
    ["slo_class", "status"],
)
IN_FLIGHT = Gauge("layerkv_admission_in_flight_requests", "Requests being served")
TTFT = Histogram(
    "layerkv_admission_ttft_seconds",
    "Time from admission to first token, as the client sees it",
    ["slo_class"],
    buckets=LATENCY_BUCKETS_S,
)
TPOT = Histogram(
    "layerkv_admission_tpot_seconds",
    "Mean time per output token after the first, per request",
    ["slo_class"],
    buckets=LATENCY_BUCKETS_S,
)
WORKER_FAILURES = Counter(
    "layerkv_admission_worker_failures_total",
    "Calls to a worker that failed, by worker and whether tokens had been streamed",
    ["worker", "stage"],
)
OUTCOMES_WRITTEN = Counter(
    "layerkv_admission_outcomes_written_total", "Request outcomes stored in Redis"
)
OUTCOME_WRITE_ERRORS = Counter(
    "layerkv_admission_outcome_write_errors_total", "Failed attempts to write outcomes to Redis"
)
OUTCOMES_DROPPED = Counter(
    "layerkv_admission_outcomes_dropped_total",
    "Outcomes dropped because the buffer for Redis outages was full",
)
OUTCOMES_BUFFERED = Gauge(
    "layerkv_admission_outcomes_buffered", "Outcomes waiting to be written to Redis"
)
QUEUE_DEPTH = Gauge(
    "layerkv_admission_queue_depth", "Requests held in the admission queue", ["slo_class"]
)
DECISIONS = Counter(
    "layerkv_admission_decisions_total",
    "Admission decisions by SLO class and kind (admitted, queued, rejected, expired, "
    "fallback: routed without worker state)",
    ["slo_class", "kind"],
)
PREDICTED_TTFT = Histogram(
    "layerkv_admission_predicted_ttft_seconds",
    "TTFT predicted when the request was sent to a worker (from arrival)",
    ["slo_class"],
    buckets=LATENCY_BUCKETS_S,
)
PREDICTION_ERROR = Histogram(
    "layerkv_admission_ttft_prediction_abs_error_seconds",
    "|predicted - measured| TTFT per request",
    ["slo_class"],
    buckets=LATENCY_BUCKETS_S,
)
PREDICTION_RELATIVE_ERROR = Histogram(
    "layerkv_admission_ttft_prediction_relative_error",
    "|predicted - measured| / measured TTFT per request",
    ["slo_class"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, float("inf")),
)
QUEUE_WAIT = Histogram(
    "layerkv_admission_queue_wait_seconds",
    "Time a request spent in the admission queue before it was sent to a worker",
    ["slo_class"],
    buckets=LATENCY_BUCKETS_S,
)
WORKER_STATE_AGE = Gauge(
    "layerkv_admission_worker_state_age_seconds",
    "Seconds since the worker last answered a load poll (-1: never)",
    ["worker"],
)
WORKER_ROUTABLE = Gauge(
    "layerkv_admission_worker_routable",
    "1 if the worker is in routing (fresh state, reachable, not draining)",
    ["worker"],
)
