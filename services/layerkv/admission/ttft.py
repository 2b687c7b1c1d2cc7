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
speed. With LayerKV on the worker, a request that does not fit with all its layers
may start with only some KV groups resident (the rest in host memory), so it waits
only for the blocks of its resident groups (``policy/sizing.py``'s rule:
``(resident + 1)`` block lists).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from layerkv.common.latency_model import LatencyCoefficients
from layerkv.policy.sizing import max_resident_groups, residency_leaving_room


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class RequestLoad:
    """One request a worker holds: running (``started``) or waiting in its queue."""

    prompt_tokens: int
    max_tokens: int
    output_tokens: int = 0
    started: bool = False
    request_id: str = ""

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


def _blocks(tokens: int, kv: KvState, resident: int) -> int:
    per_group = cdiv(max(tokens, 1), kv.block_size)
    lists = kv.groups if resident >= kv.groups else resident + 1
    return lists * per_group


def _plan(tokens: int, free: int, host_free: int, kv: KvState, next_tokens: int = 0) -> int | None:
    """Resident groups a request of ``tokens`` starts with given ``free`` blocks, or
    None when it must wait. Stock vLLM: all groups if they fit. LayerKV: the engine
    scheduler's rule (``policy/sizing.py``, shared): all groups unless that leaves no
    room for the next waiting request (``next_tokens``) and ``reserve_requests`` more;
    else the most that fit within that room (at least ``min_resident_groups``), if host
    memory takes the rest."""
    layerkv = kv.layerkv and kv.groups > 1
    per_group = cdiv(max(tokens, 1), kv.block_size)
    cap = None
    if layerkv:
        cap = residency_leaving_room(
            free, kv.groups, per_group, cdiv(max(next_tokens or tokens, 1), kv.block_size),
            kv.min_resident_groups, max(kv.reserve_requests, 1 if next_tokens else 0),
        )  # fmt: skip
    if cap is None and _blocks(tokens, kv, kv.groups) <= free:
        return kv.groups
    if not layerkv:
        return None
    best = max_resident_groups(free, kv.groups, per_group, kv.min_resident_groups)
    if best is None:
        return None
    if cap is not None:
        best = min(best, cap)
    if (kv.groups - best) * per_group > host_free:
        return None
    return best


def predict_ttft(snap: WorkerSnapshot, prompt_tokens: int, max_tokens: int = 1) -> TtftPrediction:
    """Predicted TTFT of a new request on ``snap``'s worker (see the module doc)."""
    kv, lat = snap.kv, snap.latency
    load = len(snap.running) + len(snap.waiting)
    free = kv.blocks_free
    host_free = kv.host_blocks_free
    t = 0.0
    # Running requests: (steps until finished, seq, context tokens, resident groups).
    # Blocks held are derived from the context, so decode growth is accounted for.
    running: list[tuple[int, int, int, int]] = []
    for i, r in enumerate(snap.running):
        running.append(
            (max(r.remaining_tokens, 1), i, r.prompt_tokens + r.output_tokens, kv.groups)
        )
    heapq.heapify(running)
    steps_done = 0  # decode steps simulated so far (shared by all running)
    queue = [*snap.waiting, RequestLoad(prompt_tokens, max_tokens, request_id="\0new")]
    queue_s = kv_wait_s = 0.0
    seq = len(running)
    batch_tokens = 0  # prompt tokens in the current prefill step
    step_open = False
    step_start = 0.0

    def held(ctx0: int, resident: int) -> int:
        return _blocks(ctx0 + steps_done, kv, resident)

    held_total = sum(held(ctx, res) for _, _, ctx, res in running)

    for qi, req in enumerate(queue):
        is_new = qi == len(queue) - 1
        following = queue[qi + 1].prompt_tokens if qi + 1 < len(queue) else 0
        while True:
            resident = _plan(req.prompt_tokens, free, host_free, kv, following)
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
            dt = k * lat.decode_step(len(running))
            steps_done += k
            t += dt
            kv_wait_s += dt
            while running and running[0][0] <= steps_done:
                _, _, ctx, res = heapq.heappop(running)
                if res < kv.groups:
                    host_free += (kv.groups - res) * cdiv(ctx + steps_done, kv.block_size)
            after = sum(held(ctx, res) for _, _, ctx, res in running)
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
        free -= _blocks(req.prompt_tokens, kv, resident)
        held_total += _blocks(req.prompt_tokens, kv, resident)
        if resident < kv.groups:
            host_free -= (kv.groups - resident) * cdiv(req.prompt_tokens, kv.block_size)
        seq += 1
        # Its context now: the prompt, growing from the next step. ``held`` adds
        # ``steps_done``, so store the context relative to it.
        heapq.heappush(
            running,
            (steps_done + max(req.remaining_tokens, 1), seq, req.prompt_tokens - steps_done,
             resident),
        )  # fmt: skip
    raise AssertionError("unreachable: the new request is the last in the queue")
