"""The LayerKV vLLM plug-in (layer-wise KV allocation, CPU offload, SLO-aware scheduler).

``register`` is the ``vllm.general_plugins`` entry point; it runs in every vLLM process
of every engine, stock ones included, and only installs a KV-group split that stays
inert unless the engine's config carries the LayerKV connector (see
``engine_overrides``). Worker API: ``engine_overrides``, ``layerkv_stats``,
``LayerKVSettings``, ``LayerKVStats``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from layerkv.plugin.vllm_version import SUPPORTED_VLLM_VERSION, is_supported
from layerkv.policy.settings import LayerKVConfigError, LayerKVSettings

if TYPE_CHECKING:
    from layerkv.plugin.stats import LayerKVStats

__all__ = [
    "SUPPORTED_VLLM_VERSION",
    "LayerKVConfigError",
    "LayerKVSettings",
    "LayerKVStats",
    "engine_overrides",
    "layerkv_stats",
    "register",
]


def register() -> None:
    import vllm

    # On another vLLM version stay out of the way: other vLLM engines in this
    # environment must still run there (LayerKV's own worker refuses to start, with the
    # version message, when it imports the adapter).
    if not is_supported(vllm.__version__):
        return
    from layerkv.plugin import vllm_adapter
    from layerkv.plugin.kv_groups import split_groups

    vllm_adapter.install_group_split(split_groups)


def engine_overrides(settings: LayerKVSettings | None = None) -> dict[str, Any]:
    from layerkv.plugin.api import engine_overrides as _engine_overrides

    return _engine_overrides(settings)


def layerkv_stats(scheduler_stats: Any) -> LayerKVStats | None:
    from layerkv.plugin.stats import layerkv_stats as _layerkv_stats

    return _layerkv_stats(scheduler_stats)


def __getattr__(name: str) -> Any:
    if name == "LayerKVStats":
        from layerkv.plugin.stats import LayerKVStats

        return LayerKVStats
    raise AttributeError(name)
