"""One worker as the admission service sees it: its last load report, the requests
this service sent it since, and the view the predictor works from.

Freshness between polls: the requests this admission service dispatched are tracked
locally (tokens streamed, finished), and :meth:`WorkerEndpoint.snapshot` merges them
into the last report, so a burst of arrivals between two polls is not all routed to
the same worker.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from layerkv.policy.latency import LatencyCoefficients
from layerkv.policy.sizing import blocks_needed, cdiv
from layerkv.policy.slack import DecodeProgress
from layerkv.policy.ttft import KvState, RequestLoad, WorkerSnapshot
from layerkv.v1 import worker_pb2, worker_pb2_grpc


@dataclass
class LocalRequest:
    """A request this admission service sent to a worker and has not seen finish."""

    prompt_tokens: int
    max_tokens: int
    dispatched_at: float
    output_tokens: int = 0
    started: bool = False
    tpot_target_s: float | None = None
    first_token_due: float | None = None  # monotonic: its TTFT deadline
    first_token_at: float | None = None  # monotonic
    last_token_at: float | None = None  # monotonic
    # LayerKV: groups the prediction at dispatch expected it to offload, until a load
    # report says how many it did.
    offloaded_groups: int = 0


@dataclass
class WorkerEndpoint:
    address: str
    channel: grpc.aio.Channel = field(repr=False)
    stub: worker_pb2_grpc.WorkerStub = field(repr=False)
    unhealthy_until: float = 0.0  # time.monotonic()
    consecutive_failures: int = 0
    load: worker_pb2.WorkerLoad | None = field(default=None, repr=False)
    load_at: float = 0.0  # monotonic time of the last answer; 0 = never
    reachable: bool = False
    local: dict[str, LocalRequest] = field(default_factory=dict, repr=False)
    finished_at: dict[str, float] = field(default_factory=dict, repr=False)
    # Learned per-request overhead not in the engine's own timings (RPC hops,
    # tokenisation, output streaming): the median of measured - predicted over recent
    # requests predicted not to wait (a median: an unforeseen burst that made a few of
    # them wait must not shift it).
    overhead_s: float = 0.0
    overhead_samples: deque[float] = field(default_factory=lambda: deque(maxlen=31), repr=False)
    # (seconds per token between consecutive token messages of one request, requests
    # decoding here then and the context they held), as streamed through here: the
    # decode cadence clients get, engine step plus everything around it (output
    # processing, the worker's and this service's streaming, the CPU they share),
    # which the engine's step fit misses.
    token_intervals: deque[tuple[float, int, int]] = field(
        default_factory=lambda: deque(maxlen=63), repr=False
    )
    _step_factor: tuple[LatencyCoefficients, float] | None = field(default=None, repr=False)

    def healthy(self, now: float) -> bool:
        return now >= self.unhealthy_until

    def state_age(self, now: float) -> float | None:
        return now - self.load_at if self.load_at else None

    def routable(self, now: float, stale_after_s: float) -> bool:
        return (
            self.reachable
            and self.load is not None
            and not self.load.draining
            and self.healthy(now)
            and now - self.load_at <= stale_after_s
        )

    def snapshot(self, prior: LatencyCoefficients, now: float | None = None) -> WorkerSnapshot:
        """The last report merged with what happened here since it was taken."""
        now = time.monotonic() if now is None else now
        load = self.load
        assert load is not None
        bs = max(load.config.block_size, 1)
        groups = max(load.kv_groups, 1)

        def blocks(tokens: int, offloaded: int = 0) -> int:
            # LayerKV: a request with offloaded groups holds its resident groups' block
            # lists and one staging list (policy/sizing.py).
            return blocks_needed(groups, groups - offloaded, cdiv(tokens, bs))

        # 1. The report on its own terms; 2. what happened here since.
        holding, preempted = _engine_view_of_report(load)
        merged = _Merged(load.kv_blocks_free)
        self._merge_reported(load, holding, preempted, blocks, now, merged)
        self._merge_unreported(load, blocks, now, merged)
        return WorkerSnapshot(
            address=self.address,
            kv=_kv_state(load, bs, groups, merged.free),
            latency=_latency_from_report(load, prior),
            running=tuple(merged.running),
            waiting=tuple(merged.requeued + merged.waiting),
            max_num_seqs=load.max_num_seqs or 256,
            overhead_s=self.overhead_s,
        )

    def _merge_reported(
        self,
        load: worker_pb2.WorkerLoad,
        holding: set[str],
        preempted: set[str],
        blocks: Callable[..., int],
        now: float,
        merged: _Merged,
    ) -> None:
        """Step 2 for the reported requests: what happened here since the report
        (tokens streamed, requests finished)."""
        free = merged.free
        running, requeued, waiting = merged.running, merged.requeued, merged.waiting
        for r in load.requests:
            rid = r.request_id
            fin = self.finished_at.get(rid)
            if fin is not None and fin >= self.load_at:
                if rid in holding:  # its blocks are free again
                    free += blocks(r.prompt_tokens + r.output_tokens, r.offloaded_groups)
                continue
            mine = self.local.get(rid)
            out = max(r.output_tokens, mine.output_tokens if mine else 0)
            if rid in holding:
                off = r.offloaded_groups
                free -= blocks(r.prompt_tokens + out, off) - blocks(
                    r.prompt_tokens + r.output_tokens, off
                )
                running.append(RequestLoad(r.prompt_tokens, r.max_tokens, out, r.started, rid, off))
            elif rid in preempted and out == r.output_tokens:
                # Waits again, ahead of the queue, to recompute prompt + output.
                requeued.append(
                    RequestLoad(r.prompt_tokens + out, r.max_tokens - out, 0, False, rid)
                )
            elif out > 0 or (mine is not None and mine.started):
                # Started (or resumed) since the report: it took its blocks since.
                off = mine.offloaded_groups if mine is not None else 0
                free -= blocks(r.prompt_tokens + out, off)
                running.append(RequestLoad(r.prompt_tokens, r.max_tokens, out, True, rid, off))
            else:
                sent_s_ago = now - mine.dispatched_at if mine is not None else 0.0
                waiting.append(
                    RequestLoad(r.prompt_tokens, r.max_tokens, 0, False, rid, sent_s_ago=sent_s_ago)
                )
        merged.free = free

    def _merge_unreported(
        self, load: worker_pb2.WorkerLoad, blocks: Callable[..., int], now: float, merged: _Merged
    ) -> None:
        """Step 2 for the requests sent here that the report does not list yet."""
        reported = {r.request_id for r in load.requests}
        for rid, mine in self.local.items():
            if rid in reported:
                continue
            sent_s_ago = 0.0 if mine.started else now - mine.dispatched_at
            off = mine.offloaded_groups if mine.started else 0
            req = RequestLoad(mine.prompt_tokens, mine.max_tokens, mine.output_tokens,
                              mine.started, rid, off, sent_s_ago=sent_s_ago)  # fmt: skip
            if mine.started:
                merged.free -= blocks(mine.prompt_tokens + mine.output_tokens, off)
                merged.running.append(req)
            else:
                merged.waiting.append(req)

    # -- local bookkeeping --------------------------------------------------------------

    def dispatched(
        self,
        request_id: str,
        prompt_tokens: int,
        max_tokens: int,
        tpot_target_s: float | None = None,
        offloaded_groups: int = 0,
        first_token_due: float | None = None,
    ) -> None:
        self.local[request_id] = LocalRequest(
            prompt_tokens,
            max_tokens,
            time.monotonic(),
            tpot_target_s=tpot_target_s,
            first_token_due=first_token_due,
            offloaded_groups=offloaded_groups,
        )

    def streamed(self, request_id: str, tokens: int, now: float | None = None) -> None:
        mine = self.local.get(request_id)
        if mine is None or tokens < 1:
            return
        now = time.monotonic() if now is None else now
        if not mine.started:
            mine.first_token_at = now
            mine.started = True
        elif mine.last_token_at is not None:
            decoding = context = 0
            for r in self.local.values():
                if r.started:
                    decoding += 1
                    context += r.prompt_tokens + r.output_tokens
            self.token_intervals.append(((now - mine.last_token_at) / tokens, decoding, context))
            self._step_factor = None
        mine.last_token_at = now
        mine.output_tokens += tokens

    def decode_step_factor(self, latency: LatencyCoefficients) -> float:
        """How much slower tokens stream than ``latency.decode_step`` (the engine's
        fitted step for n sequences) says: the median ratio over the recent token
        messages (a median: the intervals a prefill stalled are the few long ones); 1
        until there are enough, and never below 1 (the step is part of every interval).
        Kept until a token message or a new fit changes it: it is asked for on every
        dispatch pass, and recomputing it was most of a pass's cost."""
        if self._step_factor is not None and self._step_factor[0] == latency:
            return self._step_factor[1]
        factor = 1.0
        if len(self.token_intervals) >= 8:
            ratios = [
                dt / step
                for dt, n, context in self.token_intervals
                if (step := latency.decode_step(n, context)) > 0
            ]
            factor = max(1.0, statistics.median(ratios)) if ratios else 1.0
        self._step_factor = (latency, factor)
        return factor

    def decode_progress(self, now: float) -> list[DecodeProgress]:
        """The TPOT state of the requests this service has sent to the worker.

        A request sent but not started yet counts as if its first token came ``now``
        (the soonest it can): every prefill sent here after it will run after its own
        and stall its decode. Left out until its first token, it was unprotected
        exactly while new prefills landed on it (docs/decisions/0001-tpot-guard.md)."""
        progress = []
        for r in self.local.values():
            if r.started:
                progress.append(
                    DecodeProgress(
                        tpot_target_s=r.tpot_target_s,
                        output_tokens=r.output_tokens,
                        first_token_time_s=r.first_token_at,
                        remaining_tokens=max(r.max_tokens - r.output_tokens, 0),
                        first_token_due_s=r.first_token_due,
                    )
                )
            elif r.max_tokens > 1:  # one token has no TPOT to protect
                progress.append(
                    DecodeProgress(
                        tpot_target_s=r.tpot_target_s,
                        output_tokens=1,
                        first_token_time_s=now,
                        remaining_tokens=r.max_tokens - 1,
                        first_token_due_s=r.first_token_due,
                    )
                )
        return progress

    def finished(self, request_id: str) -> None:
        if self.local.pop(request_id, None) is not None:
            now = time.monotonic()
            self.finished_at[request_id] = now
            if len(self.finished_at) > 4096:  # bounded: older than any report we keep
                cutoff = now - 60.0
                self.finished_at = {k: v for k, v in self.finished_at.items() if v >= cutoff}

    def learn_overhead(self, measured_minus_predicted_s: float) -> None:
        self.overhead_samples.append(measured_minus_predicted_s)
        self.overhead_s = max(0.0, statistics.median(self.overhead_samples))


@dataclass
class _Merged:
    """A snapshot's requests and free blocks as step 2 of :meth:`WorkerEndpoint.snapshot`
    builds them (``requeued``: preempted, waiting again ahead of ``waiting``)."""

    free: int
    running: list[RequestLoad] = field(default_factory=list)
    requeued: list[RequestLoad] = field(default_factory=list)
    waiting: list[RequestLoad] = field(default_factory=list)


def _engine_view_of_report(load: worker_pb2.WorkerLoad) -> tuple[set[str], set[str]]:
    """Step 1 of a snapshot, the report on its own terms: the requests holding blocks
    at report time, and the ones preempted.

    The engine counts ``running`` requests (they hold blocks: decoding, or prefilling
    without a first token yet) and ``waiting`` ones (queued, or preempted to
    recompute); the worker lists each request with its first-token flag. More running
    than started: the oldest unstarted are prefilling. Fewer: the newest started were
    preempted (vLLM preempts the newest first). Local knowledge must not enter this
    step: a first token seen here after the report says nothing about the engine's
    counts at report time."""
    started = [r for r in load.requests if r.started]
    pending = [r for r in load.requests if not r.started]
    n_prefilling = min(max(load.running - len(started), 0), len(pending))
    n_preempted = min(max(len(started) - load.running, 0), len(started))
    preempted = {r.request_id for r in started[len(started) - n_preempted :]}
    holding = {r.request_id for r in started if r.request_id not in preempted}
    holding |= {r.request_id for r in pending[:n_prefilling]}
    return holding, preempted


def _latency_from_report(
    load: worker_pb2.WorkerLoad, prior: LatencyCoefficients
) -> LatencyCoefficients:
    """The worker's latency fit, or ``prior`` while it has none."""
    if len(load.prefill_s_coeffs) != 3 or load.latency_samples <= 0:
        return prior
    a, b, c = load.prefill_s_coeffs
    # The step fit with the context term if the worker has a usable one (older
    # workers and young fits report the fit by request count alone; a NaN or
    # negative coefficient would turn every room check false or infinite).
    coeffs = tuple(load.decode_step_coeffs)
    usable = len(coeffs) == 3 and all(math.isfinite(c) and c >= 0 for c in coeffs)
    d0, d1, d2 = coeffs if usable else (load.decode_step_s, load.decode_step_s_per_seq, 0.0)
    return LatencyCoefficients(a, b, c, d0, d1, load.latency_samples, d2)


def _kv_state(load: worker_pb2.WorkerLoad, block_size: int, groups: int, free: int) -> KvState:
    """The worker's KV cache with ``free`` blocks (the report's, merged)."""
    return KvState(
        block_size=block_size,
        blocks_total=load.kv_blocks_total,
        blocks_free=min(max(free, 0), load.kv_blocks_total),
        groups=groups,
        layerkv=load.layerkv,
        min_resident_groups=load.min_resident_groups,
        host_blocks_free=load.host_kv_blocks_free,
        reserve_requests=load.reserve_requests,
        max_model_len=load.config.max_model_len,
    )
