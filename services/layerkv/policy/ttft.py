"""Memory-aware TTFT prediction. Pure: no I/O, no vLLM.

For a request of ``P`` prompt tokens on a worker, the time to its first token is

    time behind the prefills queued ahead of it in the worker
  + time until enough KV blocks are free for it
  + its own prefill time
  + a fixed per-request overhead (RPC hops, detokenisation), learned by admission.

The middle term is what queue-depth predictors miss (peers.md): a long prompt waits
until *running* requests finish and free their blocks. We get it by replaying the
engine's scheduler forward in time on the worker's reported state: waiting requests
start in FIFO order as soon as their blocks fit (vLLM's head-of-line rule), running
requests each free their blocks after their remaining tokens at the fitted decode
speed. Which requests start, and with how many KV groups resident on a LayerKV
worker, is the engine scheduler's own rule, called here
(:func:`~layerkv.policy.residency.plan_residency`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cached_property

from layerkv.policy.latency import LatencyCoefficients
from layerkv.policy.residency import (
    KvLayout,
    KvRoom,
    final_blocks_per_group,
    growth_blocks,
    held_blocks,
    plan_residency,
)
from layerkv.policy.sizing import blocks_needed


@dataclass(frozen=True)
class RequestLoad:
    """One request a worker holds: running (``started``) or waiting in its queue."""

    prompt_tokens: int
    max_tokens: int
    output_tokens: int = 0
    started: bool = False
    request_id: str = ""
    # LayerKV: groups whose KV is in host memory (0: all resident).
    offloaded_groups: int = 0
    # Waiting: seconds since it was sent to the worker (0: unknown). The engine may
    # have started its prefill since the worker's report was taken.
    sent_s_ago: float = 0.0

    @property
    def remaining_tokens(self) -> int:
        return max(self.max_tokens - self.output_tokens, 0)


@dataclass(frozen=True)
class KvState:
    block_size: int
    blocks_total: int
    blocks_free: int
    # LayerKV: KV groups the layers are split into (1 = stock vLLM), the fewest groups a
    # request keeps resident, and host memory for offloaded groups (device-block units).
    groups: int = 1
    layerkv: bool = False
    min_resident_groups: int = 1
    host_blocks_free: int = 0
    # LayerKV keeps room for this many more requests when it offloads (see _plan).
    reserve_requests: int = 0
    # The engine's longest prompt + output (0: unknown); caps LayerKV's output sizing.
    max_model_len: int = 0

    @cached_property
    def layout(self) -> KvLayout:
        return KvLayout(
            self.groups,
            self.block_size,
            offload=self.layerkv,
            min_resident_groups=self.min_resident_groups,
            reserve_requests=self.reserve_requests,
            max_model_len=self.max_model_len,
        )


@dataclass(frozen=True)
class WorkerSnapshot:
    """A worker's state as the predictor needs it (built from ``WorkerLoad``)."""

    address: str
    kv: KvState
    latency: LatencyCoefficients
    running: tuple[RequestLoad, ...] = ()
    waiting: tuple[RequestLoad, ...] = ()  # FIFO order
    max_num_seqs: int = 256
    # Most prompt tokens the engine prefills in one step (vLLM max_num_batched_tokens).
    max_batched_tokens: int = 2048
    overhead_s: float = 0.0


@dataclass(frozen=True)
class TtftPrediction:
    """``ttft_s`` = ``queue_s`` + ``kv_wait_s`` + ``prefill_s`` + the worker's overhead."""

    worker: str
    ttft_s: float
    queue_s: float  # prefills ahead of it
    kv_wait_s: float  # waiting for running requests to free blocks
    prefill_s: float  # its own prefill (its step)
    resident_groups: int
    fits: bool = True  # False: can never fit on this worker (prompt too large)
    load: int = 0  # requests the worker holds (running + waiting): a tie-breaker

    @property
    def wait_s(self) -> float:
        """The part of the TTFT that is waiting, i.e. what better timing could remove."""
        return self.queue_s + self.kv_wait_s


def _plan(
    req: RequestLoad, free: int, growth: int, host_free: int, kv: KvState,
    following: RequestLoad | None = None,
) -> int | None:  # fmt: skip
    """Resident groups ``req`` starts with given ``free`` blocks, or None when it must
    wait: the engine scheduler's own rule (:func:`~layerkv.policy.residency.plan_residency`)."""
    plan = plan_residency(
        kv.layout,
        req.prompt_tokens,
        _total_tokens(req),
        KvRoom(free, growth, host_free),
        following_total_tokens=_total_tokens(following) if following is not None else None,
    )
    return None if plan is None else plan.resident_groups


def _total_tokens(req: RequestLoad) -> int:
    """Its tokens at the end: what LayerKV admission sizes it for."""
    return req.prompt_tokens + max(req.max_tokens, 1)


def predict_ttft(snap: WorkerSnapshot, prompt_tokens: int, max_tokens: int = 1) -> TtftPrediction:
    """Predicted TTFT of a new request on ``snap``'s worker (see the module doc)."""
    kv, lat = snap.kv, snap.latency
    load = len(snap.running) + len(snap.waiting)
    free = kv.blocks_free
    host_free = kv.host_blocks_free
    t = 0.0
    # Running requests: (steps until finished, seq, context tokens, resident groups,
    # blocks per group at their end, block lists held: see sizing.blocks_needed).
    # Blocks held are derived from the context, so decode growth is accounted for.
    # Their final blocks matter only to LayerKV's sizing (``growth``).
    layout = kv.layout
    track_growth = layout.layerkv
    running: list[tuple[int, int, int, int, int, int]] = []
    for i, r in enumerate(snap.running):
        ctx = r.prompt_tokens + r.output_tokens
        final = final_blocks_per_group(layout, _total_tokens(r)) if track_growth else 0
        resident = kv.groups - min(r.offloaded_groups, kv.groups)
        lists = blocks_needed(kv.groups, resident, 1)
        running.append((max(r.remaining_tokens, 1), i, ctx, resident, final, lists))
    heapq.heapify(running)
    steps_done = 0  # decode steps simulated so far (shared by all running)
    queue = [*snap.waiting, RequestLoad(prompt_tokens, max_tokens, request_id="\0new")]
    queue_s = kv_wait_s = 0.0
    seq = len(running)
    batch_tokens = 0  # prompt tokens in the current prefill step
    step_open = False
    step_start = 0.0

    bs = kv.block_size

    def held_by_running() -> int:
        # held_blocks(layout, resident, ctx + steps_done) of each, inlined: this sum
        # runs after every request the replay finishes, the hot part of a decision.
        s = steps_done
        return sum(lists * (-(-(ctx + s) // bs) or 1) for _, _, ctx, _, _, lists in running)

    held_total = held_by_running()
    # Context the running requests hold (decode steps read it): their stored contexts
    # plus one token each per step simulated.
    ctx_total = sum(entry[2] for entry in running)

    def growth() -> int:
        """Blocks the running requests will still take until their ``max_tokens``."""
        if not track_growth:
            return 0
        s = steps_done
        return sum(growth_blocks(layout, r, final, ctx + s) for _, _, ctx, r, final, _ in running)

    for qi, req in enumerate(queue):
        is_new = qi == len(queue) - 1
        following = queue[qi + 1] if qi + 1 < len(queue) else None
        needs_all = held_blocks(layout, kv.groups, req.prompt_tokens)
        while True:
            if track_growth:
                resident = _plan(req, free, growth(), host_free, kv, following)
            else:  # plan_residency's stock rule (all groups once they fit), in the hot loop
                resident = kv.groups if needs_all <= free else None
            if resident is not None and len(running) < snap.max_num_seqs:
                break
            if not running:
                # Nothing will free blocks: the prompt can never fit. Start it anyway
                # (the engine decides; vLLM refuses it at validation).
                resident = kv.groups
                if is_new:
                    pf = lat.prefill_s(req.prompt_tokens)
                    return TtftPrediction(
                        snap.address, t + pf + snap.overhead_s, queue_s, kv_wait_s, pf,
                        resident, fits=False, load=load,
                    )  # fmt: skip
                break
            # Wait for the next running request to finish.
            step_open = False
            k = running[0][0] - steps_done
            # k steps, the context growing by one token per request each: their mean.
            n = len(running)
            dt = k * lat.decode_step(n, ctx_total + n * (steps_done + (k - 1) / 2))
            steps_done += k
            t += dt
            kv_wait_s += dt
            while running and running[0][0] <= steps_done:
                _, _, ctx, res, final, _ = heapq.heappop(running)
                ctx_total -= ctx
                if res < kv.groups:
                    host_free += final  # its host range (sized for its end) is free
            after = held_by_running()
            # Finished requests' blocks come back, minus what the others grew by.
            free = max(free + held_total - after, 0)
            held_total = after

        # Start ``req``: prefills of consecutive starts share a step up to the budget.
        if not step_open or batch_tokens + req.prompt_tokens > snap.max_batched_tokens:
            step_open = True
            batch_tokens = 0
            step_start = t
            step_cost = lat.prefill_s(req.prompt_tokens)
        else:
            step_cost = lat.prefill_added_s(req.prompt_tokens)
        batch_tokens += req.prompt_tokens
        # The step also advances every running request by one token.
        step_cost += lat.decode_step_s_per_seq * len(running)
        step_cost += lat.decode_step_s_per_token * (ctx_total + steps_done * len(running))
        if qi == 0 and t == 0.0 and req.sent_s_ago > snap.overhead_s:
            # The head of the queue could start at once: it has been in its step since
            # it reached the engine, and that step takes no one else now.
            step_cost = max(step_cost - (req.sent_s_ago - snap.overhead_s), 0.0)
            step_open = False
        if is_new:
            # It starts with the step it joins: what comes before that step is waiting,
            # the whole step (shared with the prefills batched with it) is its prefill.
            end = t + step_cost
            return TtftPrediction(
                snap.address, end + snap.overhead_s, max(step_start - kv_wait_s, 0.0),
                kv_wait_s, end - step_start, resident, load=load,
            )  # fmt: skip
        t += step_cost
        queue_s += step_cost
        held = held_blocks(layout, resident, req.prompt_tokens)
        free -= held
        held_total += held
        final = final_blocks_per_group(layout, _total_tokens(req)) if track_growth else 0
        if resident < kv.groups:
            host_free -= final  # a host range of its final size
        seq += 1
        # Its context now: the prompt, growing from the next step. ``held_by_running``
        # adds ``steps_done``, so store the context relative to it.
        ctx_total += req.prompt_tokens - steps_done
        heapq.heappush(
            running,
            (steps_done + max(req.remaining_tokens, 1), seq, req.prompt_tokens - steps_done,
             resident,
             final, blocks_needed(kv.groups, resident, 1)),
        )  # fmt: skip
    raise AssertionError("unreachable: the new request is the last in the queue")
