"""Whole-block copies between one layer's device KV tensor and its host buffer.

Blocks are copied whole: inside a block the CPU backend stores K transposed per head,
so token ranges are not contiguous. A host range is contiguous, so each copy is one
large transfer on the host side; on the device side a run of consecutive block ids is
one slice copy, anything else one ``index_copy_`` / ``index_select`` (never a Python
loop over blocks). ``BlockIndex`` is built once per engine step and reused for every
layer, so a layer's copy costs one tensor op per request.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

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


class BlockIndex:
    """Device block ids of one copy: a slice when consecutive, else an index tensor."""

    __slots__ = ("ids", "span", "tensor")

    def __init__(self, block_ids: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.ids = tuple(block_ids)
        n = len(self.ids)
        self.span: tuple[int, int] | None = None
        self.tensor: torch.Tensor | None = None
        if n and self.ids[-1] - self.ids[0] == n - 1 and _consecutive(self.ids):
            self.span = (self.ids[0], self.ids[-1] + 1)
        elif n:
            self.tensor = torch.tensor(self.ids, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.ids)


def _consecutive(ids: tuple[int, ...]) -> bool:
    return all(b - a == 1 for a, b in itertools.pairwise(ids))


def save_blocks(
    kv: torch.Tensor, index: BlockIndex, host: torch.Tensor, non_blocking: bool = False
) -> int:
    """Copy ``kv[index]`` into ``host`` (``host.shape[0] == len(index)``). Bytes copied."""
    if not len(index):
        return 0
    if index.span is not None:
        host.copy_(kv[index.span[0] : index.span[1]], non_blocking=non_blocking)
    elif kv.device == host.device and host.is_contiguous():
        torch.index_select(kv, 0, index.tensor, out=host)
    else:
        host.copy_(kv.index_select(0, index.tensor), non_blocking=non_blocking)
    return host.numel() * host.element_size()


def load_blocks(
    host: torch.Tensor, kv: torch.Tensor, index: BlockIndex, non_blocking: bool = False
) -> int:
    """Copy ``host`` into ``kv[index]``. Bytes copied."""
    if not len(index):
        return 0
    if index.span is not None:
        kv[index.span[0] : index.span[1]].copy_(host, non_blocking=non_blocking)
    else:
        src = host if host.device == kv.device else host.to(kv.device, non_blocking=non_blocking)
        kv.index_copy_(0, index.tensor, src)
    return host.numel() * host.element_size()


def device_to_host(
    kv: torch.Tensor, block_ids: Sequence[int], host: torch.Tensor, non_blocking: bool = False
) -> int:
    """Copy ``kv[block_ids]`` into ``host``. Bytes copied."""
    return save_blocks(kv, BlockIndex(block_ids, kv.device), host, non_blocking)


def host_to_device(
    host: torch.Tensor, kv: torch.Tensor, block_ids: Sequence[int], non_blocking: bool = False
) -> int:
    """Copy ``host`` into ``kv[block_ids]``. Bytes copied."""
    return load_blocks(host, kv, BlockIndex(block_ids, kv.device), non_blocking)
