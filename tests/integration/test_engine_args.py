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


def _cpu_binding(model_dir, layerkv):
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    args = build_engine_args(EngineSettings(str(model_dir), num_kv_blocks=70, layerkv=layerkv))
    manager = OMPProcessManager(args.create_engine_config())
    return manager.reserve_cpu_num, manager.cpu_lists


def test_layerkv_engine_binds_its_compute_threads_like_a_stock_one(model_dir, monkeypatch):
    # vLLM reserves one more core whenever a KV connector is set (NIXL's thread); on a
    # 2-core machine that left none to reserve, and the LayerKV engine's OpenMP threads
    # took both cores, starving the worker's frontend.
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    stock = _cpu_binding(model_dir, None)
    assert _cpu_binding(model_dir, LayerKVSettings()) == stock


def test_an_operator_choice_of_reserved_cores_is_kept(model_dir, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    build_engine_args(EngineSettings(str(model_dir), layerkv=LayerKVSettings()))
    import os

    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
