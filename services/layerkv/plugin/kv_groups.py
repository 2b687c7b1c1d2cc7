"""Split a model's attention layers into LayerKV groups, each with its own block table.

vLLM gives each KV cache group its own block table, all groups drawing from one block
pool. LayerKV makes one group per slice of layers (strided, see ``policy.placement``)
and a manager class per group that lets a request's *offloaded* groups share a single
list of staging blocks instead of holding blocks of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from layerkv.plugin import vllm_adapter as va
from layerkv.policy.placement import layer_groups, resident_groups
from layerkv.policy.settings import (
    LayerKVConfigError,
    LayerKVSettings,
    ModelGeometry,
    ResolvedLayout,
    resolve,
)

if TYPE_CHECKING:
    from layerkv.plugin.plans import PlanBook


@dataclass(frozen=True, kw_only=True)
class LayerKVAttentionSpec(va.FullAttentionSpec):
    """Full attention, one LayerKV group. ``startup_share`` says whether the group counts
    in vLLM's start-up check that one max_model_len request fits: a LayerKV request
    needs only its always-resident groups plus one staging list, not every group."""

    layerkv_group: int = 0
    startup_share: bool = True

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return super().max_memory_usage_bytes(vllm_config) if self.startup_share else 0


class LayerKVGroupManager(va.FullAttentionManager):
    """Block manager of one LayerKV group.

    For a request whose plan offloads this group, the lowest offloaded group (the
    staging owner) allocates blocks as usual; every other offloaded group lists the same
    blocks, taking a reference on each, so ordinary per-group frees balance out.
    """

    plans: PlanBook | None = None

    def _staging_owner(self, request_id: str) -> LayerKVGroupManager | None:
        """The manager whose blocks this group mirrors for the request, if any."""
        if self.plans is None:
            return None
        owner = self.plans.mirror_source(request_id, self.kv_cache_group_id)
        return None if owner is None else self.plans.managers[owner]

    def _mirror(self, request_id: str, owner: LayerKVGroupManager) -> list:
        mine = self.req_to_blocks[request_id]
        new = owner.req_to_blocks[request_id][len(mine) :]
        va.share_blocks(self, new)
        mine.extend(new)
        return list(new)

    def get_num_blocks_to_allocate(self, request_id, *args, **kwargs) -> int:
        if self._staging_owner(request_id) is not None:
            return 0
        return super().get_num_blocks_to_allocate(request_id, *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        owner = self._staging_owner(request_id)
        if owner is not None:
            return self._mirror(request_id, owner)
        return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)

    def allocate_external_computed_blocks(self, request_id, *args, **kwargs) -> None:
        owner = self._staging_owner(request_id)
        if owner is not None:
            self._mirror(request_id, owner)
            return
        super().allocate_external_computed_blocks(request_id, *args, **kwargs)


def settings_of(vllm_config) -> LayerKVSettings | None:
    extra = va.layerkv_extra_config(vllm_config)
    return None if extra is None else LayerKVSettings.from_dict(extra)


def _geometry(vllm_config, spec: va.FullAttentionSpec, num_layers: int) -> ModelGeometry:
    return ModelGeometry(
        num_layers=num_layers,
        max_model_len=vllm_config.model_config.max_model_len,
        block_size=spec.block_size,
        layer_block_bytes=spec.page_size_bytes,
    )


def resolve_for_engine(
    settings: LayerKVSettings, vllm_config, kv_cache_spec: dict[str, va.KVCacheSpec]
) -> ResolvedLayout:
    """Check the settings against the model's attention layers (start-up check)."""
    specs = set(kv_cache_spec.values())
    if not kv_cache_spec or len(specs) != 1:
        raise LayerKVConfigError(
            "LayerKV needs a model whose attention layers all have the same KV cache spec"
        )
    (spec,) = specs
    if type(spec) is not va.FullAttentionSpec or spec.sliding_window is not None:
        raise LayerKVConfigError(
            f"LayerKV supports full-attention layers only; this model has {type(spec).__name__}"
        )
    if vllm_config.cache_config.enable_prefix_caching:
        raise LayerKVConfigError(
            "LayerKV needs prefix caching off (staging blocks must not enter the prefix "
            "cache); use layerkv.plugin.engine_overrides(), which sets it"
        )
    return resolve(settings, _geometry(vllm_config, spec, len(kv_cache_spec)))


def split_groups(vllm_config, kv_cache_spec: dict[str, va.KVCacheSpec]):
    """The ``get_kv_cache_groups`` replacement for LayerKV engines (None elsewhere)."""
    settings = settings_of(vllm_config)
    if settings is None:
        return None
    layout = resolve_for_engine(settings, vllm_config, kv_cache_spec)
    va.register_spec(LayerKVAttentionSpec, LayerKVGroupManager)
    names = sorted(kv_cache_spec, key=va.layer_index)
    (base,) = set(kv_cache_spec.values())
    base_fields = {f.name: getattr(base, f.name) for f in fields(base) if f.init}
    always_resident = set(resident_groups(layout.num_groups, settings.min_resident_groups))
    # The staging list is counted on the first group that is not always resident.
    staging_group = min(g for g in range(layout.num_groups) if g not in always_resident)
    groups = []
    for g, layers in enumerate(layer_groups(len(names), layout.num_groups)):
        spec = LayerKVAttentionSpec(
            **base_fields,
            layerkv_group=g,
            startup_share=g in always_resident or g == staging_group,
        )
        groups.append(va.KVCacheGroupSpec([names[i] for i in layers], spec))
    return groups


def group_layer_indices(kv_cache_config) -> list[tuple[int, ...]]:
    """Model layer indices of each KV cache group of an engine's KV cache config."""
    return [
        tuple(va.layer_index(name) for name in group.layer_names)
        for group in kv_cache_config.kv_cache_groups
    ]
