"""What the worker calls: engine arguments for a LayerKV engine, and its stats."""

from __future__ import annotations

import os
from typing import Any

from layerkv.plugin import vllm_adapter as va
from layerkv.policy.settings import LayerKVSettings


def engine_overrides(settings: LayerKVSettings | None = None) -> dict[str, Any]:
    """Extra ``AsyncEngineArgs`` keyword arguments that switch LayerKV on.

    Everything else (model, KV cap, ...) stays the worker's, so a LayerKV engine and a
    stock one differ only by these arguments -- and by no CPU binding: this also sets
    the CPU reservation in this process's environment, which the engine processes
    inherit (``vllm_adapter.keep_stock_cpu_reservation``)."""
    from vllm.config import KVTransferConfig

    settings = settings or LayerKVSettings()
    va.keep_stock_cpu_reservation(os.environ)
    return {
        "kv_transfer_config": KVTransferConfig(
            kv_connector=va.CONNECTOR_CLASS,
            kv_connector_module_path=va.CONNECTOR_MODULE,
            kv_role="kv_both",
            kv_connector_extra_config={va.SETTINGS_KEY: settings.to_dict()},
        ),
        "scheduler_cls": "layerkv.plugin.scheduler.LayerKVScheduler",
        # Staging blocks are shared by several groups: keep them out of the prefix cache.
        "enable_prefix_caching": False,
        # Several KV cache groups need vLLM's hybrid KV cache manager.
        "disable_hybrid_kv_cache_manager": False,
    }
