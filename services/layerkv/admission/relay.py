"""Streaming a request to and from a worker: the worker call, the tokens and the
completion passed back to the client, and retry on another worker when one fails
before streaming anything."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from layerkv.admission import metrics
from layerkv.admission.request_state import Abort, Measured, Routed
from layerkv.admission.worker_state import WorkerEndpoint
from layerkv.admission.workers import WorkerPool
from layerkv.v1 import admission_pb2, common_pb2

log = logging.getLogger(__name__)

# Worker answers passed to the client as they are: the request itself is at fault.
_CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
}
# Worker answers after which the next worker may succeed (if nothing was streamed yet).
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


def completion(c: common_pb2.Completion, measured: Measured) -> common_pb2.Completion:
    """The worker's completion with the latencies the client actually saw."""
    return common_pb2.Completion(
        finish_reason=c.finish_reason,
        usage=c.usage,
        ttft_s=measured.ttft_s or 0.0,
        tpot_s=measured.tpot_s or 0.0,
        worker=measured.worker,
    )


class Relay:
    """Passes requests to the workers of ``pool`` and their streams back.

    ``replan`` is called when a request gets its first token: its blocks are now taken,
    which the admission queue's plan depends on."""

    def __init__(self, pool: WorkerPool, replan: Callable[[], None]) -> None:
        self.pool = pool
        self.replan = replan

    async def forward(
        self,
        worker_request,
        request_id: str,
        measured: Measured,
        timeout: float | None,
        routed: Routed | None,
        prompt_tokens: int,
        max_tokens: int,
        admitted: Callable[[], admission_pb2.GenerateResponse] | None,
    ):
        """Stream ``worker_request`` from the routed worker, or else from the first
        worker that takes it (a worker that fails before streaming anything). The
        ``admitted()`` decision goes to the client once the first worker call is under
        way. Raises ``Abort`` when the request cannot be served."""
        tried: list[str] = []
        for worker in self._order(routed):
            if routed is None or worker is not routed.worker:
                worker.dispatched(request_id, prompt_tokens, max_tokens)
            call = worker.stub.Generate(worker_request, timeout=timeout)
            measured.worker = worker.address
            if admitted is not None:
                # After the call is started: a yield waits for its write to finish, and
                # the request to the worker should not wait behind it
                # (docs/decisions/0004-hot-path-costs.md).
                yield admitted()
                admitted = None
            try:
                # Inline, not a helper generator: every token message passes here, and
                # each generator it passes through adds to its latency.
                async for response in call:
                    if response.HasField("tokens"):
                        first = measured.tokens == 0
                        n = len(response.tokens.token_ids)
                        measured.token(n)
                        worker.streamed(request_id, n)
                        if first:
                            self.replan()  # its blocks are now taken: re-plan the queue
                        yield admission_pb2.GenerateResponse(
                            request_id=request_id, tokens=response.tokens
                        )
                    elif response.HasField("completion"):
                        measured.prompt_tokens = response.completion.usage.prompt_tokens
                        yield admission_pb2.GenerateResponse(
                            request_id=request_id,
                            completion=completion(response.completion, measured),
                        )
                self.pool.mark_ok(worker)
                return
            except grpc.aio.AioRpcError as e:
                abort = self._failed(e, worker, measured)
                if abort is not None:
                    raise abort from e
                tried.append(worker.address)
            finally:
                call.cancel()  # no-op when finished; aborts the worker request otherwise
                worker.finished(request_id)
        raise Abort(
            grpc.StatusCode.UNAVAILABLE,
            f"no worker could take the request (tried {tried})",
            "error",
        )

    def _order(self, routed: Routed | None) -> list[WorkerEndpoint]:
        """The workers to try: the routed one, then the other routable ones; without
        a routing decision, the pool's candidates."""
        if routed is None:
            return self.pool.candidates()
        others = [w for w in self.pool.routable() if w is not routed.worker]
        return [routed.worker, *others]

    def _failed(
        self, e: grpc.aio.AioRpcError, worker: WorkerEndpoint, measured: Measured
    ) -> Abort | None:
        """What a failed worker call means for the request: the ``Abort`` that ends it,
        or None: the next worker may take it."""
        code = e.code()
        if code in _CLIENT_ERRORS:
            return Abort(code, e.details() or code.name, "client_error")
        streamed = measured.tokens > 0
        metrics.WORKER_FAILURES.labels(
            worker.address, "mid_stream" if streamed else "before_stream"
        ).inc()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Abort(code, "deadline exceeded", "error")
        if streamed or code not in _RETRYABLE:
            self.pool.mark_failed(worker)
            return Abort(
                grpc.StatusCode.UNAVAILABLE,
                f"worker {worker.address} failed after {measured.tokens} tokens: "
                f"{code.name}: {e.details()}",
                "error",
            )
        log.warning("worker %s unavailable (%s); trying the next", worker.address, code.name)
        self.pool.mark_failed(worker)
        return None
