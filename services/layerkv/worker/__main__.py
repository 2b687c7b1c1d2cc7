"""``python -m layerkv.worker``: run a worker (flags, or LAYERKV_* environment variables)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from layerkv.common.serving import configure_logging, env_flag


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="layerkv-worker", description=__doc__)
    env_flag(p, "--model", "LAYERKV_MODEL", "models/tiny-llama", "model directory or name")
    env_flag(p, "--max-model-len", "LAYERKV_MAX_MODEL_LEN", 2048, "longest prompt+output", type=int)
    env_flag(p, "--block-size", "LAYERKV_BLOCK_SIZE", 32, "tokens per KV block", type=int)
    env_flag(p, "--kv-cache-gib", "LAYERKV_KV_CACHE_GIB", 0.25, "KV cache size, GiB", type=float)
    env_flag(
        p, "--num-kv-blocks", "LAYERKV_NUM_KV_BLOCKS", 0,
        "cap on the KV cache, in blocks of all layers; LayerKV gets the same bytes (0: none)",
        type=int,
    )  # fmt: skip
    env_flag(p, "--dtype", "LAYERKV_DTYPE", "auto", "model dtype")
    env_flag(p, "--max-num-seqs", "LAYERKV_MAX_NUM_SEQS", 64, "max concurrent requests", type=int)
    env_flag(
        p, "--layerkv", "LAYERKV_LAYERKV", False, "turn the LayerKV plug-in on", action="store_true"
    )
    env_flag(p, "--layerkv-groups", "LAYERKV_GROUPS", 0, "KV groups (0: one per layer)", type=int)
    env_flag(
        p,
        "--layerkv-min-resident",
        "LAYERKV_MIN_RESIDENT_GROUPS",
        0,  # tuned on `make bench`: most room for early admissions
        "groups a request always keeps on the device",
        type=int,
    )
    env_flag(
        p,
        "--layerkv-host-gib",
        "LAYERKV_HOST_KV_GIB",
        1.0,
        "host memory for offloaded KV, GiB",
        type=float,
    )
    env_flag(
        p,
        "--layerkv-decision-log",
        "LAYERKV_DECISION_LOG",
        "",
        "append the engine scheduler's LayerKV decisions here, one JSON line each",
    )
    env_flag(p, "--host", "LAYERKV_HOST", "[::]", "address to listen on")
    env_flag(p, "--port", "LAYERKV_WORKER_PORT", 50061, "gRPC port", type=int)
    env_flag(
        p, "--metrics-port", "LAYERKV_METRICS_PORT", 9091, "Prometheus port (0: off)", type=int
    )
    env_flag(p, "--drain-timeout", "LAYERKV_DRAIN_TIMEOUT_S", 30.0, "seconds to drain", type=float)
    env_flag(p, "--log-level", "LAYERKV_LOG_LEVEL", "INFO", "log level")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    if not os.path.exists(args.model) and os.sep in args.model:
        print(
            f"error: model directory {args.model!r} does not exist (run `make model`)",
            file=sys.stderr,
        )
        return 2
    if args.layerkv_decision_log:
        where = os.path.dirname(os.path.abspath(args.layerkv_decision_log))
        problem = (
            "needs --layerkv"
            if not args.layerkv
            else f"cannot write in {where!r}"
            if not os.access(where, os.W_OK)
            else None
        )
        if problem:
            print(f"error: --layerkv-decision-log {problem}", file=sys.stderr)
            return 2
    # Imported here so `--help` and flag errors answer without loading vLLM.
    from layerkv.plugin import LayerKVConfigError, LayerKVSettings
    from layerkv.worker.engine import EngineSettings
    from layerkv.worker.server import ServerSettings, serve

    try:
        layerkv = None
        if args.layerkv:
            layerkv = LayerKVSettings(
                num_groups=args.layerkv_groups or None,
                min_resident_groups=args.layerkv_min_resident,
                host_memory_bytes=int(args.layerkv_host_gib * (1 << 30)),
                decision_log=args.layerkv_decision_log or None,
            )
        engine_settings = EngineSettings(
            layerkv=layerkv,
            model=args.model,
            max_model_len=args.max_model_len,
            block_size=args.block_size,
            kv_cache_gib=args.kv_cache_gib,
            num_kv_blocks=args.num_kv_blocks,
            dtype=args.dtype,
            max_num_seqs=args.max_num_seqs,
        )
    except (ValueError, LayerKVConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server_settings = ServerSettings(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        drain_timeout_s=args.drain_timeout,
    )
    asyncio.run(serve(engine_settings, server_settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
