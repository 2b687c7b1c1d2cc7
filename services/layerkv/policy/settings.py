"""LayerKV knobs, and the start-up checks that turn bad values into clear errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from layerkv.policy.sizing import cdiv


class LayerKVConfigError(ValueError):
    """A LayerKV setting cannot work with this model or engine configuration."""


@dataclass(frozen=True)
class LayerKVSettings:
    # Number of KV groups the attention layers are split into (None: one per layer).
    num_groups: int | None = None
    # Groups a request always keeps resident (device blocks for every token). 0 lets
    # a request under pressure hold just its staging list (one layer's worth of
    # blocks), the most concurrency a KV cap allows; every layer is then fetched at
    # every step (docs/decisions/0005-layerkv-defaults.md).
    min_resident_groups: int = 0
    # Cap on device blocks used as staging by all offloaded requests together
    # (None: bounded only by the KV pool). Must hold one max_model_len request.
    max_staging_blocks: int | None = None
    # Host memory for offloaded KV, in bytes.
    host_memory_bytes: int = 1 << 30
    # Admit early (with offloaded layers) only while running requests' TPOT slack
    # covers the predicted prefill time.
    slo_aware: bool = True
    # TPOT target for requests that carry none (None: such requests impose no limit).
    default_tpot_s: float | None = None
    # Blocks kept free, when admitting with offloaded layers and when promoting, for
    # this many more requests (sized like the one admitted) with min_resident_groups:
    # without it, the first request of a burst takes every group and the next ones
    # queue behind it (stock vLLM's head-of-line wait) until it finishes.
    reserve_requests: int = 4
    # Append one JSON line per early-admission decision to this file (None: off).
    decision_log: str | None = None
    # Give offloaded layers of running requests device blocks again when free.
    promotion: bool = True
    max_promotions_per_step: int = 1
    # Blocks left free when promoting, beyond one block per group per running request.
    promotion_headroom_blocks: int = 0
    # Priors of the step-time model, used until it has its own measurements.
    prefill_a_s: float = 0.005
    prefill_b_s: float = 2e-5
    prefill_c_s: float = 0.0
    decode_step_s: float = 0.02

    def __post_init__(self) -> None:
        if self.num_groups is not None and self.num_groups < 1:
            raise LayerKVConfigError(f"num_groups must be >= 1, got {self.num_groups}")
        if self.min_resident_groups < 0:
            raise LayerKVConfigError("min_resident_groups must be >= 0")
        if self.max_staging_blocks is not None and self.max_staging_blocks < 1:
            raise LayerKVConfigError("max_staging_blocks must be >= 1")
        if self.host_memory_bytes <= 0:
            raise LayerKVConfigError("host_memory_bytes must be > 0")
        if self.default_tpot_s is not None and self.default_tpot_s <= 0:
            raise LayerKVConfigError("default_tpot_s must be > 0")
        if self.reserve_requests < 0:
            raise LayerKVConfigError("reserve_requests must be >= 0")
        if self.max_promotions_per_step < 0 or self.promotion_headroom_blocks < 0:
            raise LayerKVConfigError("promotion limits must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerKVSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise LayerKVConfigError(f"unknown LayerKV settings: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class ModelGeometry:
    """What the checks need to know about the model and the KV cache."""

    num_layers: int
    max_model_len: int
    block_size: int
    layer_block_bytes: int  # one block of one layer


@dataclass(frozen=True)
class ResolvedLayout:
    num_groups: int
    host_blocks: int  # host blocks; one host block holds a block of every layer
    max_staging_blocks: int | None


def resolve(settings: LayerKVSettings, model: ModelGeometry) -> ResolvedLayout:
    """Check ``settings`` against the model; raise LayerKVConfigError with the fix."""
    groups = model.num_layers if settings.num_groups is None else settings.num_groups
    if groups > model.num_layers:
        raise LayerKVConfigError(
            f"LayerKV num_groups={groups} exceeds the model's {model.num_layers} attention "
            f"layers; use at most {model.num_layers} (one group per layer)"
        )
    if groups < 2:
        raise LayerKVConfigError(
            "LayerKV needs num_groups >= 2: with one group nothing can be offloaded"
        )
    if settings.min_resident_groups >= groups:
        raise LayerKVConfigError(
            f"min_resident_groups={settings.min_resident_groups} leaves no group to "
            f"offload with num_groups={groups}; use at most {groups - 1}"
        )
    blocks_per_request = cdiv(model.max_model_len, model.block_size)
    if settings.max_staging_blocks is not None and settings.max_staging_blocks < blocks_per_request:
        raise LayerKVConfigError(
            f"LayerKV staging of {settings.max_staging_blocks} blocks is too small for "
            f"max_model_len={model.max_model_len}: one request needs {blocks_per_request} "
            f"blocks of {model.block_size} tokens; raise max_staging_blocks"
        )
    host_block_bytes = model.num_layers * model.layer_block_bytes
    host_blocks = settings.host_memory_bytes // host_block_bytes
    if host_blocks < blocks_per_request:
        need = blocks_per_request * host_block_bytes
        raise LayerKVConfigError(
            f"LayerKV host_memory_bytes={settings.host_memory_bytes} cannot hold one "
            f"max_model_len={model.max_model_len} request ({need} bytes); raise it"
        )
    return ResolvedLayout(
        num_groups=groups, host_blocks=host_blocks, max_staging_blocks=settings.max_staging_blocks
    )
