"""``python -m layerkv.admission``: run the admission service (flags or LAYERKV_* env)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from layerkv.common.serving import configure_logging, env_flag


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="layerkv-admission", description=__doc__)
    env_flag(p, "--workers", "LAYERKV_WORKERS", "localhost:50061", "comma-separated host:port")
    env_flag(p, "--redis-url", "LAYERKV_REDIS_URL", "", "Redis URL ('' = do not record)")
    env_flag(p, "--host", "LAYERKV_HOST", "[::]", "address to listen on")
    env_flag(p, "--port", "LAYERKV_ADMISSION_PORT", 50051, "gRPC port", type=int)
    env_flag(
        p, "--metrics-port", "LAYERKV_METRICS_PORT", 9090, "Prometheus port (0: off)", type=int
    )
    env_flag(p, "--default-ttft-ms", "LAYERKV_DEFAULT_TTFT_MS", 2000.0, "TTFT target", type=float)
    env_flag(p, "--default-tpot-ms", "LAYERKV_DEFAULT_TPOT_MS", 100.0, "TPOT target", type=float)
    env_flag(p, "--slo-refresh-s", "LAYERKV_SLO_REFRESH_S", 5.0, "target refresh", type=float)
    env_flag(
        p,
        "--outcome-buffer",
        "LAYERKV_OUTCOME_BUFFER",
        10000,
        "outcomes kept while Redis is down",
        type=int,
    )
    env_flag(p, "--drain-timeout", "LAYERKV_DRAIN_TIMEOUT_S", 30.0, "seconds to drain", type=float)
    env_flag(p, "--log-level", "LAYERKV_LOG_LEVEL", "INFO", "log level")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    from layerkv.admission.server import AdmissionSettings, serve

    workers = tuple(w.strip() for w in args.workers.split(",") if w.strip())
    if not workers:
        print("error: --workers is empty", file=sys.stderr)
        return 2
    if args.default_ttft_ms <= 0 or args.default_tpot_ms <= 0:
        print("error: --default-ttft-ms and --default-tpot-ms must be > 0", file=sys.stderr)
        return 2
    settings = AdmissionSettings(
        workers=workers,
        redis_url=args.redis_url,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        default_ttft_s=args.default_ttft_ms / 1000,
        default_tpot_s=args.default_tpot_ms / 1000,
        slo_refresh_s=args.slo_refresh_s,
        outcome_buffer=args.outcome_buffer,
        drain_timeout_s=args.drain_timeout,
    )
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
