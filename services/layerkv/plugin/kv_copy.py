"""Whole-block copies between one layer's device KV tensor and its host buffer.

Blocks are copied whole: inside a block the CPU backend stores K transposed per head,
so token ranges are not contiguous. A host range is contiguous, so each copy is one
large transfer on the host side; on the device side a run of consecutive block ids is
one slice copy, anything else one gather/scatter.
"""

from __future__ import annotations

import itertools

import torch


def block_view(kv: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``kv`` with its block dimension first (a view): CPU caches are block-major,
    CUDA flash-attention caches are ``(2, num_blocks, ...)``."""
    if kv.shape[0] == num_blocks:
        return kv
    for dim, size in enumerate(kv.shape):
        if size == num_blocks:
            return kv.movedim(dim, 0)
    raise ValueError(f"no dimension of size {num_blocks} in KV tensor {tuple(kv.shape)}")


def _as_range(block_ids: torch.Tensor | list[int]) -> tuple[int, int] | None:
    ids = block_ids.tolist() if isinstance(block_ids, torch.Tensor) else block_ids
    if (
        ids
        and ids[-1] - ids[0] == len(ids) - 1
        and all(b - a == 1 for a, b in itertools.pairwise(ids))
    ):
        return ids[0], ids[-1] + 1
    return None


def device_to_host(
    kv: torch.Tensor, block_ids: list[int], host: torch.Tensor, non_blocking: bool = False
) -> int:
    """Copy ``kv[block_ids]`` into ``host`` (``host.shape[0] == len(block_ids)``).
    Returns bytes copied."""
    if not block_ids:
        return 0
    span = _as_range(block_ids)
    if span is not None:
        host.copy_(kv[span[0] : span[1]], non_blocking=non_blocking)
    elif kv.device == host.device and host.is_contiguous():
        torch.index_select(kv, 0, torch.tensor(block_ids, device=kv.device), out=host)
    else:
        ids = torch.tensor(block_ids, device=kv.device)
        host.copy_(kv.index_select(0, ids), non_blocking=non_blocking)
    return host.numel() * host.element_size()


def host_to_device(
    host: torch.Tensor, kv: torch.Tensor, block_ids: list[int], non_blocking: bool = False
) -> int:
    """Copy ``host`` into ``kv[block_ids]``. Returns bytes copied."""
    if not block_ids:
        return 0
    span = _as_range(block_ids)
    if span is not None:
        kv[span[0] : span[1]].copy_(host, non_blocking=non_blocking)
    else:
        src = host if host.device == kv.device else host.to(kv.device, non_blocking=non_blocking)
        kv.index_copy_(0, torch.tensor(block_ids, device=kv.device), src)
    return host.numel() * host.element_size()
