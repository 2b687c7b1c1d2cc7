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


# LayerKV plug-in counters/gauges: the engine reports cumulative values, so they are
# exported as they come, by a collector, rather than re-counted here.
_LAYERKV_GAUGES = {
    "requests_with_offloaded_layers": "Running requests with some layers' KV in host memory",
    "resident_layers": "Layer groups with device KV, summed over running requests",
    "offloaded_layers": "Layer groups with host KV, summed over running requests",
    "staging_blocks": "Device blocks used as staging for offloaded layers",
    "host_blocks_used": "Host KV blocks in use (device-block units)",
    "host_blocks_total": "Host KV blocks available (device-block units)",
}
_LAYERKV_COUNTERS = {
    "admitted_early": "Requests admitted with offloaded layers because all did not fit",
    "deferred_tpot_slack": "Early admissions deferred because a running request's TPOT "
    "slack did not cover the predicted prefill",
    "deferred_no_memory": "Early admissions deferred for lack of staging or host memory",
    "promotions": "Offloaded layers of running requests given device blocks again",
    "preemptions_recompute": "Requests preempted and recomputed",
    "bytes_offloaded": "Bytes copied device -> host",
    "bytes_fetched": "Bytes copied host -> device",
}


class LayerKVCollector:
    """Exports the newest ``LayerKVStats`` held by ``recorder`` (an EngineStatsRecorder)."""

    def __init__(self, recorder) -> None:
        self.recorder = recorder

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.recorder.layerkv
        if stats is None:
            return
        for name, doc in _LAYERKV_GAUGES.items():
            yield GaugeMetricFamily(f"layerkv_worker_{name}", doc, value=getattr(stats, name))
        for name, doc in _LAYERKV_COUNTERS.items():
            yield CounterMetricFamily(f"layerkv_worker_{name}", doc, value=getattr(stats, name))


def register_layerkv_collector(recorder) -> None:
    from prometheus_client import REGISTRY

    REGISTRY.register(LayerKVCollector(recorder))
