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
    env_flag(
        p,
        "--worker-pool",
        "LAYERKV_WORKER_POOL",
        "",
        "name for worker load reports in Redis ('' = do not publish)",
    )
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
    env_flag(
        p,
        "--outcome-flush-interval-s",
        "LAYERKV_OUTCOME_FLUSH_INTERVAL_S",
        0.1,
        "longest an outcome waits to be written to Redis with others",
        type=float,
    )
    env_flag(
        p,
        "--slo-classes",
        "LAYERKV_SLO_CLASSES",
        "",
        "extra SLO classes, NAME=TTFT_MS:TPOT_MS, comma-separated (Redis targets override)",
    )
    env_flag(
        p,
        "--class-policy",
        "LAYERKV_CLASS_POLICY",
        "",
        "per class when no worker meets its target: NAME=queue or NAME=reject[:FACTOR] "
        "(reject when predicted TTFT > FACTOR x target; default 2), comma-separated; "
        "NAME '*' sets the default (queue)",
    )
    env_flag(
        p, "--queue-capacity", "LAYERKV_QUEUE_CAPACITY", 1024, "admission queue bound", type=int
    )
    env_flag(p, "--queue-policy", "LAYERKV_QUEUE_POLICY", "edf", "edf or fifo")
    env_flag(
        p,
        "--max-hold-factor",
        "LAYERKV_MAX_HOLD_FACTOR",
        4.0,
        "after this many TTFT targets a request held for TPOT room goes to any worker "
        "with prefill room (a queue-class one, to the least harmed worker if none has)",
        type=float,
    )
    env_flag(
        p, "--no-tpot-guard", "LAYERKV_NO_TPOT_GUARD", False,
        "send requests without checking running requests' TPOT slack", action="store_true",
    )  # fmt: skip
    env_flag(p, "--poll-interval-s", "LAYERKV_POLL_INTERVAL_S", 0.1, "worker poll", type=float)
    env_flag(p, "--stale-after-s", "LAYERKV_STALE_AFTER_S", 3.0, "worker state max age", type=float)
    env_flag(p, "--drain-timeout", "LAYERKV_DRAIN_TIMEOUT_S", 30.0, "seconds to drain", type=float)
    env_flag(
        p, "--decision-log", "LAYERKV_DECISION_LOG", "",
        "append every dispatch (worker state, prediction) as a JSON line to this file",
    )  # fmt: skip
    env_flag(p, "--log-level", "LAYERKV_LOG_LEVEL", "INFO", "log level")
    return p.parse_args(argv)


def parse_classes(classes_spec: str, policy_spec: str):
    """``--slo-classes`` and ``--class-policy`` -> (targets, {name: policy}, default)."""
    from layerkv.common.slo import SloTarget
    from layerkv.policy.routing import ClassPolicy, MissPolicy

    classes = []
    for part in filter(None, (x.strip() for x in classes_spec.split(","))):
        name, _, spec = part.partition("=")
        ttft_ms, _, tpot_ms = spec.partition(":")
        try:
            classes.append(SloTarget(name, float(ttft_ms) / 1000, float(tpot_ms) / 1000))
        except ValueError as e:
            raise ValueError(f"bad --slo-classes entry {part!r}: {e}") from e
    policies = {}
    default = ClassPolicy()
    for part in filter(None, (x.strip() for x in policy_spec.split(","))):
        name, _, spec = part.partition("=")
        kind, _, factor = spec.partition(":")
        try:
            policy = ClassPolicy(MissPolicy(kind), float(factor) if factor else 2.0)
        except ValueError as e:
            raise ValueError(f"bad --class-policy entry {part!r}: {e}") from e
        if name == "*":
            default = policy
        else:
            policies[name] = policy
    return tuple(classes), tuple(policies.items()), default


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    from layerkv.admission.app import AdmissionSettings, serve

    try:
        classes, policies, default_policy = parse_classes(args.slo_classes, args.class_policy)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    workers = tuple(w.strip() for w in args.workers.split(",") if w.strip())
    if not workers:
        print("error: --workers is empty", file=sys.stderr)
        return 2
    if args.decision_log:
        try:
            open(args.decision_log, "a").close()
        except OSError as e:
            print(f"error: --decision-log {args.decision_log!r}: {e.strerror}", file=sys.stderr)
            return 2
    if args.default_ttft_ms <= 0 or args.default_tpot_ms <= 0:
        print("error: --default-ttft-ms and --default-tpot-ms must be > 0", file=sys.stderr)
        return 2
    if args.outcome_flush_interval_s < 0:
        print("error: --outcome-flush-interval-s must be >= 0", file=sys.stderr)
        return 2
    settings = AdmissionSettings(
        workers=workers,
        redis_url=args.redis_url,
        worker_pool=args.worker_pool,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        default_ttft_s=args.default_ttft_ms / 1000,
        default_tpot_s=args.default_tpot_ms / 1000,
        slo_refresh_s=args.slo_refresh_s,
        outcome_buffer=args.outcome_buffer,
        outcome_flush_interval_s=args.outcome_flush_interval_s,
        drain_timeout_s=args.drain_timeout,
        classes=classes,
        policies=policies,
        default_policy=default_policy,
        queue_capacity=args.queue_capacity,
        queue_policy=args.queue_policy,
        max_hold_factor=args.max_hold_factor,
        tpot_guard=not args.no_tpot_guard,
        poll_interval_s=args.poll_interval_s,
        stale_after_s=args.stale_after_s,
        decision_log=args.decision_log,
    )
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
