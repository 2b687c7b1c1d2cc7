"""The plug-in's block copies (layerkv.plugin.kv_copy), on every device this machine has.

On CPU (CI) the copies are plain; where CUDA is present the same tests also run with
pinned host memory, ``non_blocking`` copies on a side stream and an event the compute
stream waits on, as the connector does (run on a GPU machine with
``python -m pytest tests/unit/test_kv_copy.py``). Pure PyTorch: no vLLM import.
"""

from __future__ import annotations

import random

import pytest
import torch

from layerkv.plugin.kv_copy import BlockIndex, block_view, host_to_device, load_blocks, save_blocks

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NUM_BLOCKS = 48
BLOCK_SHAPE = (4, 16, 64)  # kv heads, block size, 2 * head dim


def _cache(device: str, layout: str) -> torch.Tensor:
    """A layer's KV cache in the two layouts vLLM uses: block-major (CPU backend) and
    ``(2, num_blocks, ...)`` (CUDA flash-attention)."""
    g = torch.Generator().manual_seed(1)
    if layout == "block_major":
        t = torch.randn((NUM_BLOCKS, *BLOCK_SHAPE), generator=g)
    else:
        t = torch.randn((2, NUM_BLOCKS, *BLOCK_SHAPE), generator=g)
    return t.to(device)


def _host(n: int, like: torch.Tensor, device: str) -> torch.Tensor:
    shape = (n, *like.shape[1:])
    if device == "cuda":
        return torch.empty(shape, dtype=like.dtype).pin_memory()
    return torch.empty(shape, dtype=like.dtype)


def _id_sets() -> list[list[int]]:
    rng = random.Random(7)
    return [
        [5],
        list(range(10, 22)),  # consecutive: one slice copy
        rng.sample(range(NUM_BLOCKS), 17),  # scattered: one index op
        sorted(rng.sample(range(NUM_BLOCKS), 9)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["block_major", "kv_first"])
@pytest.mark.parametrize("ids", _id_sets(), ids=["one", "consecutive", "scattered", "sorted_gaps"])
def test_save_then_load_round_trips_exactly_those_blocks(device, layout, ids):
    kv = block_view(_cache(device, layout), NUM_BLOCKS)
    original = kv.clone()
    index = BlockIndex(ids, kv.device)
    assert (index.span is not None) == (ids == list(range(ids[0], ids[0] + len(ids))))
    host = _host(len(ids), kv, device)

    nbytes = save_blocks(kv, index, host)
    assert nbytes == host.numel() * host.element_size()
    assert torch.equal(host, original[ids].cpu())

    kv[ids] = 0.0  # the blocks are reused by another request meanwhile
    load_blocks(host, kv, index)
    assert torch.equal(kv, original)  # restored, and no other block touched


@pytest.mark.parametrize("device", DEVICES)
def test_load_into_other_blocks_leaves_the_rest_alone(device):
    kv = block_view(_cache(device, "block_major"), NUM_BLOCKS)
    before = kv.clone()
    host = torch.randn((6, *BLOCK_SHAPE))
    if device == "cuda":
        host = host.pin_memory()
    targets = [40, 3, 17, 8, 29, 1]
    host_to_device(host, kv, targets)
    assert torch.equal(kv[targets].cpu(), host)
    untouched = [b for b in range(NUM_BLOCKS) if b not in targets]
    assert torch.equal(kv[untouched], before[untouched])


def test_block_view_names_the_block_dimension():
    t = torch.zeros((2, NUM_BLOCKS, *BLOCK_SHAPE))
    assert block_view(t, NUM_BLOCKS).shape[0] == NUM_BLOCKS
    assert block_view(t, NUM_BLOCKS).data_ptr() == t.data_ptr()  # a view, not a copy
    with pytest.raises(ValueError, match="no dimension of size 7"):
        block_view(t, 7)


@pytest.mark.parametrize("device", DEVICES)
def test_copies_ordered_by_events(device):
    """The connector's CUDA path: the save is queued on a side stream after the compute
    stream wrote the KV; the fetch on the side stream records an event the compute
    stream waits on before it reads. Large enough that an unordered read would see the
    old contents. On CPU the same sequence runs synchronously (no streams there)."""
    n = 512
    cuda = device == "cuda"
    kv = torch.zeros((n, 8, 16, 256), device=device)
    host = torch.empty((n, 8, 16, 256))
    host = host.pin_memory() if cuda else host
    index = BlockIndex(range(n), kv.device)
    side = torch.cuda.Stream() if cuda else None
    compute = torch.cuda.current_stream() if cuda else None

    def on_side(fn):
        if not cuda:
            fn()
            return None
        with torch.cuda.stream(side):
            fn()
            done = torch.cuda.Event()
            done.record(side)
        return done

    kv.fill_(3.0)  # the forward pass writes this step's KV
    if cuda:
        side.wait_stream(compute)
    saved = on_side(lambda: save_blocks(kv, index, host, non_blocking=cuda))
    if saved is not None:
        saved.synchronize()
    assert bool((host == 3.0).all())

    host.fill_(5.0)
    fetched = on_side(lambda: load_blocks(host, kv, index, non_blocking=cuda))
    if fetched is not None:
        compute.wait_event(fetched)
    total = kv.sum()  # queued on the compute stream after the fetch
    assert total.item() == 5.0 * kv.numel()
