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
    """Predicted TTFT of a new request on ``snap``'s worker (see the module doc): the
    engine replayed forward until the new request, last in its queue, starts."""
    replay = _Replay(snap)
    queue = [*snap.waiting, RequestLoad(prompt_tokens, max_tokens, request_id="\0new")]
    last = len(queue) - 1
    for qi, req in enumerate(queue):
        resident = replay.wait_until_it_can_start(req, queue[qi + 1] if qi < last else None)
        if resident is None:
            # Nothing will free blocks: the prompt can never fit. Start it anyway (the
            # engine decides; vLLM refuses it at validation).
            if qi == last:
                return replay.never_fits(req)
            resident = snap.kv.groups
        cost = replay.join_prefill_step(req, head=qi == 0)
        if qi == last:
            return replay.prediction(resident, cost)
        replay.start(req, resident, cost)
    raise AssertionError("unreachable: the new request is the last in the queue")


class _Replay:
    """One worker's engine replayed forward in time: running requests decode and finish
    (freeing their blocks), waiting ones start in FIFO order once
    :func:`~layerkv.policy.residency.plan_residency` lets them, consecutive prefills
    sharing a step up to the token budget. Plain attributes and inlined arithmetic:
    every decision runs this once per worker."""

    __slots__ = (
        "address", "batch_tokens", "bs", "ctx_total", "free", "groups", "held_total",
        "host_free", "kv", "kv_wait_s", "lat", "layout", "load", "max_batched",
        "max_num_seqs", "overhead_s", "queue_s", "running", "seq", "step_open",
        "step_start", "steps_done", "t", "track_growth",
    )  # fmt: skip

    def __init__(self, snap: WorkerSnapshot) -> None:
        kv = self.kv = snap.kv
        self.lat = snap.latency
        self.layout = kv.layout
        self.groups = kv.groups
        self.bs = kv.block_size
        self.address, self.overhead_s = snap.address, snap.overhead_s
        self.max_num_seqs, self.max_batched = snap.max_num_seqs, snap.max_batched_tokens
        self.load = len(snap.running) + len(snap.waiting)
        self.free = kv.blocks_free
        self.host_free = kv.host_blocks_free
        # Blocks per group at their end matter only to LayerKV's sizing (growth).
        self.track_growth = self.layout.layerkv
        # Running requests, a heap of (step it finishes at, seq, context at step 0,
        # resident groups, blocks per group at its end, block lists it holds). Blocks
        # held follow from the context, so decode growth is accounted for.
        self.running: list[tuple[int, int, int, int, int, int]] = []
        for i, r in enumerate(snap.running):
            resident = kv.groups - min(r.offloaded_groups, kv.groups)
            final = (
                final_blocks_per_group(self.layout, _total_tokens(r)) if self.track_growth else 0
            )
            lists = blocks_needed(kv.groups, resident, 1)
            ctx = r.prompt_tokens + r.output_tokens
            self.running.append((max(r.remaining_tokens, 1), i, ctx, resident, final, lists))
        heapq.heapify(self.running)
        self.seq = len(self.running)
        self.steps_done = 0  # decode steps replayed so far (shared by all running)
        self.t = self.queue_s = self.kv_wait_s = 0.0
        self.step_open = False  # a prefill step later starts may still join
        self.step_start = 0.0
        self.batch_tokens = 0  # prompt tokens in that step
        self.held_total = self.held_by_running()
        # Context the running requests hold (decode steps read it): their contexts at
        # step 0 plus one token each per step replayed.
        self.ctx_total = sum(entry[2] for entry in self.running)

    def held_by_running(self) -> int:
        # held_blocks(layout, resident, ctx + steps_done) of each, inlined: this sum
        # runs after every request the replay finishes, the hot part of a decision.
        s, bs = self.steps_done, self.bs
        return sum(lists * (-(-(ctx + s) // bs) or 1) for _, _, ctx, _, _, lists in self.running)

    def growth(self) -> int:
        """Blocks the running requests will still take until their ``max_tokens``."""
        s, layout = self.steps_done, self.layout
        return sum(growth_blocks(layout, r, f, ctx + s) for _, _, ctx, r, f, _ in self.running)

    def wait_until_it_can_start(
        self, req: RequestLoad, following: RequestLoad | None
    ) -> int | None:
        """Replay decode steps until ``req`` can start; its resident groups, or None
        when no running request is left to free blocks and it still cannot."""
        needs_all = held_blocks(self.layout, self.groups, req.prompt_tokens)
        while True:
            if self.track_growth:
                resident = _plan(req, self.free, self.growth(), self.host_free, self.kv, following)
            else:  # plan_residency's stock rule (all groups once they fit), in the hot loop
                resident = self.groups if needs_all <= self.free else None
            if resident is not None and len(self.running) < self.max_num_seqs:
                return resident
            if not self.running:
                return None
            self.wait_for_next_finish()

    def wait_for_next_finish(self) -> None:
        running, lat = self.running, self.lat
        self.step_open = False
        k = running[0][0] - self.steps_done
        n = len(running)
        # k steps, the context growing by one token per request each: their mean.
        dt = k * lat.decode_step(n, self.ctx_total + n * (self.steps_done + (k - 1) / 2))
        self.steps_done += k
        self.t += dt
        self.kv_wait_s += dt
        while running and running[0][0] <= self.steps_done:
            _, _, ctx, res, final, _ = heapq.heappop(running)
            self.ctx_total -= ctx
            if res < self.groups:
                self.host_free += final  # its host range (sized for its end) is free
        after = self.held_by_running()
        # Finished requests' blocks come back, minus what the others grew by.
        self.free = max(self.free + self.held_total - after, 0)
        self.held_total = after

    def join_prefill_step(self, req: RequestLoad, head: bool) -> float:
        """What starting ``req`` now adds to the replay's clock: prefills of consecutive
        starts share a step up to the token budget, and the step also advances every
        running request by one token."""
        lat, p = self.lat, req.prompt_tokens
        if not self.step_open or self.batch_tokens + p > self.max_batched:
            self.step_open = True
            self.batch_tokens = 0
            self.step_start = self.t
            cost = lat.prefill_s(p)
        else:
            cost = lat.prefill_added_s(p)
        self.batch_tokens += p
        n = len(self.running)
        cost += lat.decode_step_s_per_seq * n
        cost += lat.decode_step_s_per_token * (self.ctx_total + self.steps_done * n)
        if head and self.t == 0.0 and req.sent_s_ago > self.overhead_s:
            # The head of the queue could start at once: it has been in its step since
            # it reached the engine, and that step takes no one else now.
            cost = max(cost - (req.sent_s_ago - self.overhead_s), 0.0)
            self.step_open = False
        return cost

    def start(self, req: RequestLoad, resident: int, cost: float) -> None:
        """``req`` (ahead of the new request) runs from now on."""
        self.t += cost
        self.queue_s += cost
        held = held_blocks(self.layout, resident, req.prompt_tokens)
        self.free -= held
        self.held_total += held
        final = final_blocks_per_group(self.layout, _total_tokens(req)) if self.track_growth else 0
        if resident < self.groups:
            self.host_free -= final  # a host range of its final size
        self.seq += 1
        # Its context now: the prompt, growing from the next step. held_by_running adds
        # steps_done, so store the context relative to it.
        self.ctx_total += req.prompt_tokens - self.steps_done
        entry = (self.steps_done + max(req.remaining_tokens, 1), self.seq,
                 req.prompt_tokens - self.steps_done, resident, final,
                 blocks_needed(self.groups, resident, 1))  # fmt: skip
        heapq.heappush(self.running, entry)

    def prediction(self, resident: int, cost: float) -> TtftPrediction:
        """The new request starts with the step it joins: what comes before that step is
        waiting, the whole step (shared with the prefills batched with it) its prefill."""
        end = self.t + cost
        return TtftPrediction(
            self.address, end + self.overhead_s, max(self.step_start - self.kv_wait_s, 0.0),
            self.kv_wait_s, end - self.step_start, resident, load=self.load,
        )  # fmt: skip

    def never_fits(self, req: RequestLoad) -> TtftPrediction:
        pf = self.lat.prefill_s(req.prompt_tokens)
        return TtftPrediction(
            self.address, self.t + pf + self.overhead_s, self.queue_s, self.kv_wait_s, pf,
            self.groups, fits=False, load=self.load,
        )  # fmt: skip
