"""The worker's engine arguments: a KV cap means the same memory with LayerKV on."""

from __future__ import annotations

import pytest

from layerkv.plugin import LayerKVSettings
from layerkv.worker.engine import EngineSettings, build_engine_args


@pytest.mark.parametrize(
    ("layerkv", "pool_blocks"),
    [
        (None, 70),  # stock: a pool block holds all 8 layers
        (LayerKVSettings(), 70 * 8),  # one group per layer: a pool block is one layer
        (LayerKVSettings(num_groups=2), 70 * 2),  # 4 layers per pool block
    ],
)
def test_kv_block_cap_is_the_same_memory_with_and_without_layerkv(model_dir, layerkv, pool_blocks):
    args = build_engine_args(EngineSettings(str(model_dir), num_kv_blocks=70, layerkv=layerkv))
    assert args.num_gpu_blocks_override == pool_blocks
