"""The residency rule is one rule: the plan the LayerKV engine scheduler applies equals
the plan admission's TTFT replay predicts with, over a grid of engine states.

Both call ``layerkv.policy.residency.plan_residency``; what could drift is how each
side turns its own state into the rule's inputs (tokens, final size, free blocks,
growth of running requests, host room, the next waiting request). The scheduler side
runs LayerKVScheduler's own ``_plan`` on real vLLM ``Request`` objects, a real vLLM
``BlockPool`` and the plug-in's real ``PlanBook``; only the engine around it is absent
(no model, no KV cache manager: the plan reads nothing else of it).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.request import Request

from layerkv.plugin.plans import PlanBook
from layerkv.plugin.scheduler import LayerKVScheduler
from layerkv.policy.host_ranges import HostRangeAllocator
from layerkv.policy.latency import LatencyCoefficients
from layerkv.policy.residency import KvLayout
from layerkv.policy.settings import LayerKVSettings
from layerkv.policy.ttft import KvState, RequestLoad, WorkerSnapshot, _plan, predict_ttft

MAX_MODEL_LEN = 4096
_ids = itertools.count()


def engine_request(prompt: int, max_tokens: int, output: int = 0) -> Request:
    r = Request(
        f"r{next(_ids)}",
        list(range(prompt)),
        SamplingParams(max_tokens=max_tokens),
        None,
    )
    if output:
        r.append_output_token_ids(list(range(output)))
    return r


def scheduler_plan(
    *, groups, block_size, min_resident, reserve, free, host, prompt, max_tokens,
    following=None, running=None,
):  # fmt: skip
    """Resident groups the engine scheduler plans for a waiting request, or None."""
    sched = object.__new__(LayerKVScheduler)
    sched.kv_cache_manager = SimpleNamespace(
        block_pool=BlockPool(free + 1, enable_caching=False, hash_block_size=block_size)
    )
    sched.settings = LayerKVSettings(
        num_groups=groups, min_resident_groups=min_resident, reserve_requests=reserve
    )
    sched.num_groups = groups
    sched.kv_block_size = block_size
    sched.max_model_len = MAX_MODEL_LEN
    sched.layout = KvLayout(groups, block_size, min_resident_groups=min_resident,
                            reserve_requests=reserve, max_model_len=MAX_MODEL_LEN)  # fmt: skip
    sched.book = PlanBook(groups, HostRangeAllocator(host))
    request = engine_request(prompt, max_tokens)
    sched.running = [engine_request(*running)] if running else []
    sched.waiting = [request] + ([engine_request(*following)] if following else [])
    plan = sched._plan(request, {}, restoring=False)
    return None if plan is None else plan.resident_groups


KV_KEYS = ("groups", "block_size", "min_resident", "reserve", "free", "host")


def admission_kv(*, groups, block_size, min_resident, reserve, free, host) -> KvState:
    return KvState(
        block_size=block_size,
        blocks_total=10_000,
        blocks_free=free,
        groups=groups,
        layerkv=True,
        min_resident_groups=min_resident,
        host_blocks_free=host,
        reserve_requests=reserve,
        max_model_len=MAX_MODEL_LEN,
    )


GRID = [
    dict(
        groups=g,
        block_size=bs,
        min_resident=m,
        reserve=res,
        free=free,
        host=host,
        prompt=p,
        max_tokens=mt,
    )
    for g in (2, 4, 8)
    for bs in (16, 32)
    for m in (0, 1)
    if m < g
    for res in (0, 2)
    for free in (10, 60, 200, 700)
    for host in (3, 1000)
    for p in (1, 100, 319, 1500)
    for mt in (1, 200)
]


@pytest.mark.parametrize("following", [None, (800, 100)])
def test_engine_and_admission_plan_the_same_residency(following):
    disagree = []
    for case in GRID:
        engine = scheduler_plan(**case, following=following)
        kv = admission_kv(**{k: case[k] for k in KV_KEYS})
        nxt = RequestLoad(*following) if following else None
        predicted = _plan(RequestLoad(case["prompt"], case["max_tokens"]), case["free"], 0,
                          case["host"], kv, nxt)  # fmt: skip
        if engine != predicted:
            disagree.append((case, engine, predicted))
    assert not disagree, disagree[:5]
    # The grid exercises every outcome: wait, partial, all resident.
    outcomes = {scheduler_plan(**c, following=following) for c in GRID}
    assert None in outcomes and len(outcomes) >= 4


def test_running_requests_growth_is_counted_alike():
    """With a running request (all groups resident) still to decode, both sides keep
    back the blocks it will grow into, and the replay starts the request at once with
    the engine's residency exactly when the engine would."""
    lat = LatencyCoefficients(0.01, 1e-5, 0.0, 0.02)
    checked = 0
    for case in GRID:
        if case["host"] < 1000:
            continue
        running = (600, 400, 10)  # prompt, max_tokens, output so far
        engine = scheduler_plan(**case, running=running)
        kv = admission_kv(**{k: case[k] for k in KV_KEYS})
        snap = WorkerSnapshot("w", kv, lat, running=(RequestLoad(600, 400, 10, started=True),))
        p = predict_ttft(snap, case["prompt"], case["max_tokens"])
        if engine is None:
            assert p.kv_wait_s > 0, case
        else:
            assert p.kv_wait_s == 0 and p.resident_groups == engine, (case, engine, p)
        checked += 1
    assert checked > 100
