"""LayerKV counters and gauges, carried to the frontend in vLLM's connector-stats channel.

The scheduler-side connector (plans, decisions, the step-time model) and the
worker-side connector (bytes copied) each return a ``LayerKVConnectorStats``; vLLM
merges them (``aggregate``) into ``SchedulerStats.kv_connector_stats`` (a plain dict),
which the frontend's stat loggers receive. ``layerkv_stats`` reads it back. Counters
are cumulative since engine start; gauges are the value at the end of the step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from layerkv.plugin import vllm_adapter as va

MARKER = "layerkv_stats_version"
WORKER_COUNTERS = (
    "bytes_offloaded",
    "bytes_fetched",
    "bytes_promotion_saved",
    "bytes_restored",
    "copy_seconds",
)


@dataclass(frozen=True)
class LayerKVStats:
    # Gauges (running requests).
    requests_with_offloaded_layers: int = 0
    resident_layers: int = 0
    offloaded_layers: int = 0
    staging_blocks: int = 0
    host_blocks_used: int = 0
    host_blocks_total: int = 0
    device_blocks_free: int = 0
    device_blocks_total: int = 0
    # Running requests with offloaded groups -> how many groups are offloaded.
    offloaded_groups_by_request: dict[str, int] = field(default_factory=dict)
    # Counters.
    admitted_early: int = 0  # admitted with offloaded layers: all groups did not fit
    admitted_offloaded_for_room: int = 0  # would fit, offloaded to keep reserve_requests room
    deferred_tpot_slack: int = 0
    deferred_no_memory: int = 0
    promotions: int = 0
    preemptions_recompute: int = 0
    bytes_offloaded: int = 0
    bytes_fetched: int = 0
    bytes_promotion_saved: int = 0
    bytes_restored: int = 0
    copy_seconds: float = 0.0
    # Fitted step-time model: prefill(P) = a + b*P + c*P^2 seconds; decode step seconds.
    prefill_a_s: float = 0.0
    prefill_b_s: float = 0.0
    prefill_c_s: float = 0.0
    decode_step_s: float = 0.0
    step_samples: int = 0
    prefill_samples: int = 0  # prefill-dominated steps in the fit window

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = {f.name for f in fields(LayerKVStats)}


class LayerKVConnectorStats(va.KVConnectorStats):
    def reset(self) -> None:
        # Cumulative counters: nothing to reset between logging intervals.
        return None

    def aggregate(self, other: va.KVConnectorStats) -> LayerKVConnectorStats:
        data = dict(self.data)
        for key, value in other.data.items():
            if key in WORKER_COUNTERS and key in data:
                # Cumulative per rank; keep the largest (the latest) snapshot.
                data[key] = max(data[key], value)
            else:
                data[key] = value
        return LayerKVConnectorStats(data=data)

    def reduce(self) -> dict[str, int | float]:
        return {k: v for k, v in self.data.items() if k != MARKER}

    def is_empty(self) -> bool:
        return not self.data


def make_stats(values: dict[str, Any]) -> LayerKVConnectorStats:
    return LayerKVConnectorStats(data={MARKER: 1, **values})


def layerkv_stats(scheduler_stats: Any) -> LayerKVStats | None:
    """LayerKV counters from a vLLM ``SchedulerStats`` (None on a stock engine, or for
    a step that carried no connector stats)."""
    data = getattr(scheduler_stats, "kv_connector_stats", None)
    if not data or MARKER not in data:
        return None
    return LayerKVStats(**{k: v for k, v in data.items() if k in _FIELDS})
