"""Copy-path microbenchmark: per-layer host<->device copies of a long request's KV,
overlapped with a matmul the size of a decode step.

For each layer: fetch the layer's KV (host -> device, the LayerKV fetch) and save one
block back (device -> host), on a side stream on CUDA, while the compute stream runs a
decode-step-sized matmul. Reports achieved GB/s for copies alone, compute alone, and
both together, and the fraction of copy time the compute hides:
``hidden = (copy + compute - overlapped) / copy``. On CUDA this measures the real PCIe
path (pinned host memory); on CPU it runs as a smoke test (copies and compute share
the cores, so little is hidden).

    .venv/bin/python bench/copy_bench.py [--tokens 2048 --layers 8 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="context of the request")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256, help="matmul size of a decode step")
    p.add_argument("--batch", type=int, default=8, help="decode batch (matmul rows)")
    p.add_argument(
        "--matmuls-per-layer",
        type=int,
        default=1,
        help="hidden x 4*hidden matmuls per layer (3 ~ a Llama layer's weight bytes)",
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/results/copy_bench.json")
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = dev.type == "cuda"
    blocks = -(-args.tokens // args.block_size)
    shape = (blocks, args.kv_heads, args.block_size, 2 * args.head_dim)
    device_kv = [torch.zeros(shape, dtype=dtype, device=dev) for _ in range(args.layers)]
    host_kv = [
        torch.randn(shape, dtype=dtype).pin_memory() if cuda else torch.randn(shape, dtype=dtype)
        for _ in range(args.layers)
    ]
    weights = torch.randn(args.hidden, 4 * args.hidden, dtype=dtype, device=dev)
    x = torch.randn(args.batch, args.hidden, dtype=dtype, device=dev)
    side = torch.cuda.Stream() if cuda else None
    layer_bytes = device_kv[0].numel() * device_kv[0].element_size()
    block_bytes = layer_bytes // blocks

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def copies():
        for layer in range(args.layers):
            device_kv[layer].copy_(host_kv[layer], non_blocking=cuda)
            host_kv[layer][-1:].copy_(device_kv[layer][-1:], non_blocking=cuda)

    def compute():
        y = x
        for _ in range(args.layers * args.matmuls_per_layer):
            y = torch.relu(y @ weights)[:, : args.hidden]
        return y

    def timed(fn) -> float:
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        sync()
        return (time.perf_counter() - start) / args.repeats

    def overlapped():
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                copies()
            compute()
            torch.cuda.current_stream().wait_stream(side)
        else:
            copies()
            compute()

    # The plug-in's own fetch path (layerkv.plugin.kv_copy): one layer's blocks from a
    # contiguous host range into staging blocks that are consecutive (one slice copy)
    # or scattered (one index_copy_), against a Python loop over blocks.
    from layerkv.plugin.kv_copy import BlockIndex, load_blocks

    pool = torch.zeros((4 * blocks, *shape[1:]), dtype=dtype, device=dev)
    gen = torch.Generator().manual_seed(0)
    scattered = torch.randperm(4 * blocks, generator=gen)[:blocks].tolist()
    consecutive = list(range(blocks, 2 * blocks))
    fetch_paths = {}
    for name, ids in (("slice", consecutive), ("index_copy", scattered)):
        index = BlockIndex(ids, dev)

        def fetch(index=index):
            for layer in range(args.layers):
                load_blocks(host_kv[layer], pool, index, non_blocking=cuda)

        fetch_paths[name] = timed(fetch)

    def per_block_loop():
        for layer in range(args.layers):
            for i, b in enumerate(scattered):
                pool[b].copy_(host_kv[layer][i], non_blocking=cuda)

    fetch_paths["per_block_loop"] = timed(per_block_loop)

    copy_s = timed(copies)
    compute_s = timed(compute)
    both_s = timed(overlapped)
    moved = args.layers * (layer_bytes + block_bytes)
    saved_s = copy_s + compute_s - both_s
    hidden = max(0.0, min(1.0, saved_s / copy_s)) if copy_s else 0.0
    # The most overlap can save is the shorter of the two: when the copies take longer
    # than the compute, copy_hidden_fraction is capped at compute/copy.
    shorter = min(copy_s, compute_s)
    overlap = max(0.0, min(1.0, saved_s / shorter)) if shorter else 0.0
    result = {
        "device": str(dev),
        "torch": torch.__version__,
        "bytes_per_step": moved,
        "copy_s": copy_s,
        "compute_s": compute_s,
        "overlapped_s": both_s,
        "copy_gb_s": moved / copy_s / 1e9,
        "copy_hidden_fraction": hidden,
        "overlap_of_possible": overlap,
        # Fetch of every layer (bytes_per_step minus the saves) by the plug-in's path.
        "fetch_s": fetch_paths,
        "fetch_gb_s": {k: args.layers * layer_bytes / v / 1e9 for k, v in fetch_paths.items()},
        "smoke_test_only": not cuda,
        "args": vars(args),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
