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
