"""Every touch of vLLM internals LayerKV makes, plug-in and worker, in one place.

vLLM has no stable API for layer-wise KV: the plug-in subclasses internal classes and
calls a few private methods, and the worker reads the engine's internal statistics.
They are all named here (``PRIVATE_NAMES`` lists them, ``missing_private_names``
checks them), so a vLLM upgrade is a review of this one module. Importing it fails with
a clear message on any other vLLM version.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import vllm

from layerkv.plugin.vllm_version import SUPPORTED_VLLM_VERSION, check_vllm_version
from layerkv.policy.settings import LayerKVConfigError

check_vllm_version(vllm.__version__)

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
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError
    from vllm.v1.metrics.loggers import StatLoggerBase
    from vllm.v1.metrics.stats import SchedulerStats

__all__ = [
    "SUPPORTED_VLLM_VERSION",
    "AsyncLLM",
    "EngineDeadError",
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
    "SchedulerStats",
    "StatLoggerBase",
    "SupportsHMA",
    "check_vllm_version",
]

CONNECTOR_MODULE = "layerkv.plugin.connector"
CONNECTOR_CLASS = "LayerKVConnector"
SETTINGS_KEY = "layerkv"

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# vLLM's CPU backend reserves, with "auto" thread binding, one core per engine rank for
# the scheduler process plus one more whenever a KV connector is configured (NIXL runs
# its transfer thread there). LayerKV's copies run on the model thread itself, so that
# second core is not needed; reserving it took the last free core on a 2-core machine,
# and vLLM then bound its compute threads to *every* core, one of them spinning on the
# frontend's core (docs/decisions/0003-cpu-placement.md).
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


# -- KV connector ---------------------------------------------------------------------


def connector_role(connector: KVConnectorBase_V1) -> KVConnectorRole:
    return connector.role


def connector_kv_cache_manager(connector: KVConnectorBase_V1) -> KVCacheManager:
    """The KV cache manager vLLM bound to a scheduler-side connector
    (``bind_kv_cache_manager`` keeps it in a private attribute)."""
    manager = connector._kv_cache_manager
    if manager is None:
        raise RuntimeError("the KV connector has no KV cache manager bound yet")
    return manager


# -- Scheduler ------------------------------------------------------------------------


def intercept_allocate_slots(
    kv_cache_manager: KVCacheManager, handler: Callable[..., Any]
) -> Callable[..., Any]:
    """Make the scheduler's ``kv_cache_manager.allocate_slots(...)`` calls go to
    ``handler`` (same arguments) and return the original bound method, for ``handler``
    to call. ``schedule()`` decides admission by that call's result, so this changes
    admission without copying ``schedule()``."""
    original = kv_cache_manager.allocate_slots
    kv_cache_manager.allocate_slots = handler
    return original


class HookedScheduler(Scheduler):
    """vLLM's scheduler with public hooks where LayerKV would override private methods.

    vLLM calls ``_preempt_request`` for every preemption (its own, on KV pressure, and
    ``preempt_running``) and ``_free_request`` for every finished request."""

    def before_preempt(self, request: Request) -> Any:
        """Runs before vLLM preempts ``request`` (frees its blocks, puts it back to
        waiting); what it returns is handed to ``after_preempt``."""
        return None

    def after_preempt(self, request: Request, before: Any) -> None:
        """Runs once ``request`` is preempted; ``before`` is ``before_preempt``'s value."""

    def on_free(self, request: Request) -> None:
        """Runs when a finished request is freed, before vLLM frees it."""

    def _preempt_request(self, request, timestamp, drop_stale_output: bool = False) -> None:
        before = self.before_preempt(request)
        super()._preempt_request(request, timestamp, drop_stale_output)
        self.after_preempt(request, before)

    def _free_request(self, request, *args, **kwargs):
        self.on_free(request)
        return super()._free_request(request, *args, **kwargs)


def is_fresh_admission(request: Request) -> bool:
    """A waiting (new or preempted) request that holds no KV blocks yet."""
    return (
        request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        and request.num_computed_tokens == 0
    )


def external_request_id(request_id: str) -> str:
    """The id the frontend knows an engine request by. vLLM 0.32's input processor
    appends ``-`` and 8 random characters to it (``InputProcessor.assign_request_id``)
    unless VLLM_DISABLE_REQUEST_ID_RANDOMIZATION is set; the engine's Request keeps no
    copy."""
    from vllm import envs

    if envs.VLLM_DISABLE_REQUEST_ID_RANDOMIZATION:
        return request_id
    head, sep, tail = request_id.rpartition("-")
    return head if sep and len(tail) == 8 else request_id


def preempt_running(scheduler: HookedScheduler, request: Request, timestamp: float) -> None:
    """Take ``request`` out of the running queue, free its blocks and put it at the head
    of the waiting queue (vLLM's own preemption, hooks included; the model runner then
    replaces its block table when it is resumed)."""
    scheduler.running.remove(request)
    scheduler._preempt_request(request, timestamp)


def waiting_is_empty(scheduler: Scheduler) -> bool:
    return not scheduler.waiting and not scheduler.kv_holding_waiting


def set_sync_kv_loads(scheduler_output: Any) -> None:
    """Make the model runner call ``start_load_kv`` before the forward pass."""
    scheduler_output.has_sync_kv_loads = True


# -- Worker side ----------------------------------------------------------------------

# Imported on first use: every vLLM process imports this module (the plug-in's entry
# point), and only the worker's frontend needs these.
_WORKER_NAMES = {
    "AsyncLLM": "vllm.v1.engine.async_llm",
    "EngineDeadError": "vllm.v1.engine.exceptions",
    "StatLoggerBase": "vllm.v1.metrics.loggers",
    "SchedulerStats": "vllm.v1.metrics.stats",
}


def __getattr__(name: str) -> Any:
    module = _WORKER_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


# -- What this module relies on -------------------------------------------------------

_SCHEDULER = "vllm.v1.core.sched.scheduler.Scheduler"
_CONNECTOR = "vllm.distributed.kv_transfer.kv_connector.v1.base.KVConnectorBase_V1"
_KV_CACHE_MANAGER = "vllm.v1.core.kv_cache_manager.KVCacheManager"
_BLOCK_POOL = "vllm.v1.core.block_pool.BlockPool"
_GROUP_MANAGER = "vllm.v1.core.single_type_kv_cache_manager.SingleTypeKVCacheManager"
_STATS = "vllm.v1.metrics.stats"

# (object path, attribute) for every vLLM internal used above, by the plug-in and by the
# worker: private names, attributes of classes in vLLM's internal modules, and the
# methods the plug-in's subclasses override (a renamed one would be silently skipped).
# When the path names a function, the attribute is one that function assigns on
# ``self`` (an instance attribute: there is no class attribute to look up).
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    # Scheduler: overridden private methods, queues read.
    (_SCHEDULER, "_preempt_request"),
    (_SCHEDULER, "_free_request"),
    (f"{_SCHEDULER}.__init__", "kv_cache_manager"),
    (f"{_SCHEDULER}.__init__", "running"),
    (f"{_SCHEDULER}.__init__", "waiting"),
    (f"{_SCHEDULER}.__init__", "kv_holding_waiting"),
    ("vllm.v1.core.sched.output.SchedulerOutput", "has_sync_kv_loads"),
    ("vllm.v1.request.Request.__init__", "status"),
    ("vllm.v1.request.Request.__init__", "num_computed_tokens"),
    ("vllm.v1.request.RequestStatus", "WAITING"),
    ("vllm.v1.request.RequestStatus", "PREEMPTED"),
    # KV cache manager, its coordinator and block pool.
    (_KV_CACHE_MANAGER, "allocate_slots"),
    (f"{_KV_CACHE_MANAGER}.__init__", "coordinator"),
    (f"{_KV_CACHE_MANAGER}.__init__", "block_pool"),
    (f"{_KV_CACHE_MANAGER}.__init__", "watermark_blocks"),
    ("vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator.__init__", "single_type_managers"),
    (_BLOCK_POOL, "get_num_free_blocks"),
    (_BLOCK_POOL, "touch"),
    (f"{_BLOCK_POOL}.__init__", "num_gpu_blocks"),
    (_KV_CACHE_MANAGER, "get_block_ids"),
    # Per-group block managers (LayerKVGroupManager overrides and reads these).
    (_GROUP_MANAGER, "get_num_blocks_to_allocate"),
    (_GROUP_MANAGER, "allocate_new_blocks"),
    (_GROUP_MANAGER, "allocate_external_computed_blocks"),
    (f"{_GROUP_MANAGER}.__init__", "req_to_blocks"),
    (f"{_GROUP_MANAGER}.__init__", "kv_cache_group_id"),
    (f"{_GROUP_MANAGER}.__init__", "block_pool"),
    # KV cache grouping and spec registry.
    ("vllm.v1.core.kv_cache_utils", "get_kv_cache_groups"),
    ("vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry", "_ensure_registered"),
    ("vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry", "register"),
    ("vllm.v1.kv_cache_interface.FullAttentionSpec", "max_memory_usage_bytes"),
    # KV connector base class state.
    (_CONNECTOR, "role"),
    (f"{_CONNECTOR}.bind_kv_cache_manager", "_kv_cache_manager"),
    # Request ids.
    ("vllm.envs", "VLLM_DISABLE_REQUEST_ID_RANDOMIZATION"),
    ("vllm.v1.engine.input_processor.InputProcessor", "assign_request_id"),
    # Worker side: the engine client and the statistics its stat logger reads.
    ("vllm.v1.engine.async_llm.AsyncLLM", "from_engine_args"),
    ("vllm.v1.engine.exceptions", "EngineDeadError"),
    ("vllm.v1.metrics.loggers.StatLoggerBase", "record"),
    ("vllm.v1.metrics.loggers.StatLoggerBase", "log_engine_initialized"),
    (f"{_STATS}.SchedulerStats", "num_running_reqs"),
    (f"{_STATS}.SchedulerStats", "num_waiting_reqs"),
    (f"{_STATS}.SchedulerStats", "num_skipped_waiting_reqs"),
    (f"{_STATS}.SchedulerStats", "kv_cache_usage"),
    (f"{_STATS}.SchedulerStats", "kv_connector_stats"),
    (f"{_STATS}.IterationStats.__init__", "finished_requests"),
    (f"{_STATS}.IterationStats.__init__", "inter_token_latencies_iter"),
    (f"{_STATS}.IterationStats.__init__", "time_to_first_tokens_iter"),
    (f"{_STATS}.FinishedRequestStats", "num_preemptions"),
    (f"{_STATS}.FinishedRequestStats", "num_prompt_tokens"),
    (f"{_STATS}.FinishedRequestStats", "prefill_time"),
)


def _resolve(path: str) -> Any:
    """The object at a dotted path: the longest importable module, then attributes."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def _assigns_on_self(function: Callable[..., Any], attribute: str) -> bool:
    source = inspect.getsource(function)
    return re.search(rf"\bself\.{re.escape(attribute)}\s*(?::[^=\n]*)?=(?!=)", source) is not None


def _present(path: str, attribute: str) -> bool:
    try:
        owner = _resolve(path)
    except (ImportError, AttributeError):
        return False
    if inspect.isfunction(owner):
        return _assigns_on_self(owner, attribute)
    return hasattr(owner, attribute)


def missing_private_names() -> list[str]:
    """The entries of ``PRIVATE_NAMES`` the installed vLLM lacks, as ``path.attribute``."""
    return [
        f"{path}.{attribute}" for path, attribute in PRIVATE_NAMES if not _present(path, attribute)
    ]
