"""LayerKV benchmark: stock vLLM (capped KV), LayerKV (same cap), stock (uncapped).

The same long-context workload -- Poisson arrivals, long-tailed prompt lengths up to
max_model_len, 64-512 output tokens -- runs against each configuration, swept over the
request rate and over the mean prompt length (the LayerKV paper's two axes), plus the
issue's fixed scenario (``--issue-point``). At 2 rps the default rate sweep is heavy:
capped stock queues (its mean TTFT is many times the uncapped reference), and
``targets_heaviest_point`` in the JSON checks the issue's targets there. Writes
``bench/results/layerkv.json`` (a list of points plus ``outputs_identical``: LayerKV's
greedy tokens vs capped stock's) and an SVG plot of TTFT against each axis.

    .venv/bin/python bench/layerkv_bench.py --model models/tiny-llama --kv-cap-blocks 70

The KV cap is in *stock* blocks (all layers of ``--block-size`` tokens); LayerKV gets
the same bytes. On a GPU pass a real model and a cap that creates KV pressure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CONFIGS = ("stock_capped", "layerkv_capped", "stock_uncapped")


@dataclass(frozen=True)
class Job:
    arrival_s: float
    prompt: tuple[int, ...]
    max_tokens: int


@dataclass
class Outcome:
    ttft_s: float
    tpot_s: float | None
    tokens: list[int]
    submit_s: float
    finish_s: float


def make_workload(
    n: int,
    rate: float,
    prompt_mean: int,
    max_model_len: int,
    min_out: int,
    max_out: int,
    vocab: int,
    seed: int,
) -> list[Job]:
    """Poisson arrivals; prompt lengths log-normal (long tail) with the given mean,
    clipped so prompt + output fits max_model_len."""
    rng = random.Random(seed)
    sigma = 0.6
    mu = math.log(prompt_mean) - sigma * sigma / 2
    t = 0.0
    jobs = []
    for _ in range(n):
        out = rng.randint(min_out, max_out)
        length = int(rng.lognormvariate(mu, sigma))
        length = max(32, min(length, max_model_len - out))
        jobs.append(Job(t, tuple(rng.randrange(1, vocab) for _ in range(length)), out))
        t += rng.expovariate(rate)
    return jobs


def issue_workload(n: int, prompt: int, out: int, interval: float, vocab: int, seed: int):
    """The issue's scenario: ``n`` prompts of ``prompt`` tokens, ``interval`` s apart,
    ``out`` output tokens each."""
    rng = random.Random(seed)
    return [
        Job(i * interval, tuple(rng.randrange(1, vocab) for _ in range(prompt)), out)
        for i in range(n)
    ]


def evaluate_targets(rows: list[dict]) -> dict | None:
    """The issue's targets at the heaviest point where capped stock's mean TTFT is at
    least 5x the uncapped reference (None when no point is that heavy)."""
    by = {(r["config"], r["rate_rps"], r["prompt_tokens_mean"]): r for r in rows}
    best = None
    for (config, rate, mean), sc in by.items():
        if config != "stock_capped":
            continue
        su = by.get(("stock_uncapped", rate, mean))
        lk = by.get(("layerkv_capped", rate, mean))
        if su is None or lk is None:
            continue
        ratio = sc["ttft_mean_s"] / su["ttft_mean_s"]
        if ratio >= 5 and (best is None or ratio > best[0]):
            best = (ratio, sc, lk, su)
    if best is None:
        return None
    ratio, sc, lk, su = best
    checks = {
        "ttft_mean_vs_uncapped": (lk["ttft_mean_s"] / su["ttft_mean_s"], 1.3),
        "ttft_mean_vs_stock_capped": (lk["ttft_mean_s"] / sc["ttft_mean_s"], 0.2),
        "ttft_p99_vs_stock_capped": (lk["ttft_p99_s"] / sc["ttft_p99_s"], 1 / 3),
        "tpot_p50_vs_stock_capped": (lk["tpot_p50_s"] / sc["tpot_p50_s"], 1.15),
    }
    result = {
        "point": {"rate_rps": sc["rate_rps"], "prompt_tokens_mean": sc["prompt_tokens_mean"]},
        "stock_capped_over_uncapped_ttft": ratio,
    }
    for name, (value, limit) in checks.items():
        result[name] = {"value": value, "limit": limit, "met": value <= limit}
    tput = lk["output_tok_s"] / sc["output_tok_s"]
    result["throughput_vs_stock_capped"] = {"value": tput, "limit": 0.95, "met": tput >= 0.95}
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def run_point(engine, jobs: list[Job], ttft_slo: float, tpot_slo: float, tag: str):
    from vllm import SamplingParams

    start = time.monotonic()

    async def one(i: int, job: Job) -> Outcome:
        await asyncio.sleep(max(0.0, start + job.arrival_s - time.monotonic()))
        sp = SamplingParams(
            max_tokens=job.max_tokens,
            temperature=0.0,
            ignore_eos=True,
            extra_args={"layerkv": {"ttft_s": ttft_slo, "tpot_s": tpot_slo}},
        )
        submit = time.monotonic()
        first = last = None
        tokens: list[int] = []
        async for out in engine.generate(
            {"prompt_token_ids": list(job.prompt)}, sp, request_id=f"{tag}-{i}"
        ):
            now = time.monotonic()
            if first is None and out.outputs[0].token_ids:
                first = now
            last = now
            tokens = list(out.outputs[0].token_ids)
        tpot = (last - first) / (len(tokens) - 1) if len(tokens) > 1 else None
        return Outcome(first - submit, tpot, tokens, submit, last)

    return await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs)))


def summarize(config, rate, jobs, outcomes, ttft_slo, tpot_slo) -> dict:
    ttfts = [o.ttft_s for o in outcomes]
    tpots = [o.tpot_s for o in outcomes if o.tpot_s is not None]
    span = max(o.finish_s for o in outcomes) - min(o.submit_s for o in outcomes)
    violations = sum(
        o.ttft_s > ttft_slo or (o.tpot_s is not None and o.tpot_s > tpot_slo) for o in outcomes
    )
    return {
        "config": config,
        "rate_rps": rate,
        "prompt_tokens_mean": statistics.fmean(len(j.prompt) for j in jobs),
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p99_s": percentile(tpots, 99),
        "output_tok_s": sum(len(o.tokens) for o in outcomes) / span,
        "slo_violation_rate": violations / len(outcomes),
        "requests": len(outcomes),
        # The machine may be shared: a 1-minute load average well above the core
        # count means the point's timings are inflated by other processes.
        "loadavg_1m_at_end": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
    }


def engine_args(config: str, args):
    from vllm.engine.arg_utils import AsyncEngineArgs

    import layerkv.plugin as lkv

    stock_block_bytes = args.block_bytes
    kwargs = dict(
        model=args.model,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        enforce_eager=args.enforce_eager,
        dtype=args.dtype,
        enable_prefix_caching=False,
        skip_tokenizer_init=True,
        seed=0,
    )
    if config == "stock_uncapped":
        kwargs["kv_cache_memory_bytes"] = args.uncapped_blocks * stock_block_bytes
    else:
        kwargs["kv_cache_memory_bytes"] = args.kv_cap_blocks * stock_block_bytes
    if config == "layerkv_capped":
        kwargs.update(
            lkv.engine_overrides(
                lkv.LayerKVSettings(
                    **{
                        "num_groups": args.num_groups,
                        "default_tpot_s": args.tpot_slo,
                        **json.loads(args.layerkv_settings),
                    }
                )
            )
        )
    return AsyncEngineArgs(**kwargs)


def stock_block_bytes(model: str, block_size: int, dtype: str) -> tuple[int, int]:
    """Bytes of one all-layer KV block, and the vocabulary size, from config.json."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    elem = 4 if dtype == "float32" else 2
    return layers * block_size * kv_heads * head_dim * 2 * elem, cfg["vocab_size"]


async def run_config(config: str, args, points) -> tuple[list[dict], dict]:
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(engine_args(config, args))
    results, tokens = [], {}
    try:
        for i, (rate, mean, jobs, sweeps) in enumerate(points):
            tag = f"{config}-{i}-{rate}-{mean}"
            outcomes = await run_point(engine, jobs, args.ttft_slo, args.tpot_slo, tag)
            row = summarize(config, rate, jobs, outcomes, args.ttft_slo, args.tpot_slo)
            row["sweep"] = sweeps
            print(json.dumps(row), flush=True)
            results.append(row)
            tokens[i] = [o.tokens for o in outcomes]
    finally:
        engine.shutdown()
    return results, tokens


def svg_plot(rows: list[dict], axis: str, fixed: str, fixed_value, path: Path) -> None:
    """TTFT (mean) against ``axis`` for each config, as a small SVG line chart."""
    colours = {"stock_capped": "#d62728", "layerkv_capped": "#2ca02c", "stock_uncapped": "#1f77b4"}
    sel = [r for r in rows if r[fixed] == fixed_value] if fixed else rows
    if not sel:
        return
    xs = sorted({r[axis] for r in sel})
    ymax = max(r["ttft_mean_s"] for r in sel) * 1.1 or 1.0
    w, h, m = 520, 320, 50

    def px(x):
        return m + (w - 2 * m) * (xs.index(x) / max(len(xs) - 1, 1))

    def py(y):
        return h - m - (h - 2 * m) * y / ymax

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">',
        f'<text x="{w / 2}" y="20" text-anchor="middle">mean TTFT (s) vs {axis}</text>',
        f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
        f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
        f'<text x="{m - 5}" y="{m}" text-anchor="end">{ymax:.1f}</text>',
    ]
    parts += [f'<text x="{px(x)}" y="{h - m + 15}" text-anchor="middle">{x:g}</text>' for x in xs]
    for i, (config, colour) in enumerate(colours.items()):
        pts = sorted((r[axis], r["ttft_mean_s"]) for r in sel if r["config"] == config)
        if pts:
            line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}"/>')
            parts.append(
                f'<text x="{w - m}" y="{m + 15 * i}" fill="{colour}" '
                f'text-anchor="end">{config}</text>'
            )
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="models/tiny-llama")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--kv-cap-blocks", type=int, default=70, help="KV cap, in stock blocks")
    p.add_argument("--uncapped-blocks", type=int, default=2048)
    p.add_argument("--num-groups", type=int, default=None)
    p.add_argument(
        "--layerkv-settings",
        default="{}",
        help="extra LayerKVSettings as JSON, e.g. '{\"min_resident_groups\": 2}'",
    )
    p.add_argument("--requests", type=int, default=12, help="requests per sweep point")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument(
        "--issue-point",
        type=int,
        nargs=3,
        default=[8, 1500, 256],
        metavar=("N", "PROMPT", "OUT"),
        help="also run the issue's scenario: N prompts of PROMPT tokens at --base-rate "
        "(evenly spaced), OUT output tokens each (N=0: skip)",
    )
    p.add_argument("--prompt-means", type=int, nargs="+", default=[500, 1000, 1500])
    p.add_argument("--base-rate", type=float, default=1.0, help="rate of the prompt sweep")
    p.add_argument("--base-prompt-mean", type=int, default=1500, help="mean of the rate sweep")
    p.add_argument("--min-out", type=int, default=64)
    p.add_argument("--max-out", type=int, default=512)
    p.add_argument("--ttft-slo", type=float, default=2.0)
    p.add_argument("--tpot-slo", type=float, default=0.1)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false")
    p.add_argument("--out", default="bench/results/layerkv.json")
    args = p.parse_args(argv)
    args.block_bytes, vocab = stock_block_bytes(args.model, args.block_size, args.dtype)

    sweeps: dict[tuple[float, int], list[str]] = {}
    for r in args.rates:
        sweeps.setdefault((r, args.base_prompt_mean), []).append("rate")
    for m in args.prompt_means:
        sweeps.setdefault((args.base_rate, m), []).append("prompt")
    points = [
        (
            rate,
            mean,
            make_workload(
                args.requests,
                rate,
                mean,
                args.max_model_len,
                args.min_out,
                args.max_out,
                vocab,
                args.seed + i,
            ),
            names,
        )
        for i, ((rate, mean), names) in enumerate(sweeps.items())
    ]
    n_issue, issue_prompt, issue_out = args.issue_point
    if n_issue:
        jobs = issue_workload(
            n_issue, issue_prompt, issue_out, 1 / args.base_rate, vocab, args.seed + 100
        )
        points.append((args.base_rate, issue_prompt, jobs, ["issue"]))
    rows: list[dict] = []
    tokens: dict[str, dict] = {}
    started = time.time()
    for config in args.configs:
        got, toks = asyncio.run(run_config(config, args, points))
        rows += got
        tokens[config] = toks
    identical = None
    if "stock_capped" in tokens and "layerkv_capped" in tokens:
        identical = tokens["stock_capped"] == tokens["layerkv_capped"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    targets = evaluate_targets([r for r in rows if "issue" not in r["sweep"]])
    issue_targets = evaluate_targets([r for r in rows if "issue" in r["sweep"]])
    report = {
        "points": rows,
        "targets_heaviest_point": targets,
        "targets_issue_point": issue_targets,
        "outputs_identical": identical,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "wall_s": time.time() - started,
    }
    out.write_text(json.dumps(report, indent=2))
    for axis, name in (("rate_rps", "rate"), ("prompt_tokens_mean", "prompt")):
        sel = [r for r in rows if name in r["sweep"]]
        svg_plot(sel, axis, "", None, out.with_name(f"layerkv_ttft_vs_{name}.svg"))
    for name, t in (("heaviest sweep point", targets), ("issue point", issue_targets)):
        print(f"{name}: {json.dumps(t)}")
    print(f"wrote {out} (outputs_identical={identical})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
