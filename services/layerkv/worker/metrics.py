"""Prometheus metrics of the worker service (vLLM's own ``vllm:*`` metrics are exported
from the same registry)."""

from prometheus_client import Counter, Gauge, Histogram

from layerkv.common.slo import LATENCY_BUCKETS_S

REQUESTS = Counter(
    "layerkv_worker_requests_total", "Requests finished by the worker, by outcome", ["status"]
)
IN_FLIGHT = Gauge("layerkv_worker_in_flight_requests", "Requests accepted and not finished")
TTFT = Histogram(
    "layerkv_worker_ttft_seconds",
    "Time from receiving a request to its first token",
    buckets=LATENCY_BUCKETS_S,
)
TPOT = Histogram(
    "layerkv_worker_tpot_seconds",
    "Mean time per output token after the first, per request",
    buckets=LATENCY_BUCKETS_S,
)
DRAINING = Gauge("layerkv_worker_draining", "1 while the worker drains before exit")
