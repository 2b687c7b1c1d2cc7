"""The admission's outcome recorder against a real redis-server."""

import time
import uuid

from layerkv.admission.outcomes import OutcomeRecorder
from layerkv.common.slo import RequestOutcome, SloTarget
from layerkv.common.store import MetricsStore

from .conftest import wait_until

TARGET = SloTarget("chat", ttft_s=1.0, tpot_s=0.1)


async def test_outcomes_are_written_in_batches(redis_server):
    store = MetricsStore.from_url(redis_server.extra["url"], prefix=f"t{uuid.uuid4().hex[:8]}")
    writes: list[int] = []
    record = store.record_outcomes

    def counted(batch):
        writes.append(len(batch))
        return record(batch)

    store.record_outcomes = counted
    # Outcomes wait for company for up to a minute, unless a batch is full or the
    # recorder closes: 40 go as 16 (full), 16 (full), then 8 (on close).
    recorder = OutcomeRecorder(store, batch_size=16, flush_interval_s=60)
    recorder.start()
    now = time.time()
    for i in range(40):
        recorder.submit(RequestOutcome(f"r{i}", "chat", "ok", now, 0.1, 0.01), TARGET)
    await recorder.close(timeout_s=10)
    assert writes == [16, 16, 8]
    assert (recorder.pending, recorder.written, recorder.dropped) == (0, 40, 0)
    assert store.window_stats("chat", 60, now=now).requests == 40
    assert all(store.get_outcome(f"r{i}") for i in range(40))


async def test_a_lone_outcome_is_written_within_the_flush_interval(redis_server):
    store = MetricsStore.from_url(redis_server.extra["url"], prefix=f"t{uuid.uuid4().hex[:8]}")
    recorder = OutcomeRecorder(store, flush_interval_s=0.05)
    recorder.start()
    try:
        recorder.submit(RequestOutcome("r1", "chat", "ok", time.time(), 0.1, 0.01), TARGET)
        await wait_until(lambda: store.get_outcome("r1"), timeout_s=5, what="the outcome")
        assert recorder.written == 1
    finally:
        await recorder.close()


async def test_an_outcome_redis_refuses_is_counted_as_dropped_not_retried(redis_server):
    store = MetricsStore.from_url(redis_server.extra["url"], prefix=f"t{uuid.uuid4().hex[:8]}")
    now = time.time()
    start = int(now // store.bucket_s) * store.bucket_s
    store.client.set(f"{store.prefix}:bucket:bad:{start}", "not a hash")
    recorder = OutcomeRecorder(store, flush_interval_s=60)
    recorder.start()
    for i, cls in enumerate(("chat", "bad", "chat")):
        recorder.submit(RequestOutcome(f"r{i}", cls, "ok", now, 0.1, 0.01), TARGET)
    await recorder.close(timeout_s=10)
    assert (recorder.pending, recorder.written, recorder.dropped) == (0, 2, 1)
    assert recorder.redis_ok
    assert store.window_stats("chat", 60, now=now).requests == 2
