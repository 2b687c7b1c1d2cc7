"""The Redis store against a real redis-server."""

import uuid

import pytest
import redis

from layerkv.common.slo import RequestOutcome, SloTarget
from layerkv.common.store import MetricsStore


@pytest.fixture
def store(redis_server):
    s = MetricsStore.from_url(redis_server.extra["url"], prefix=f"t{uuid.uuid4().hex[:8]}")
    yield s
    for key in s.client.scan_iter(match=f"{s.prefix}:*"):
        s.client.delete(key)


def outcome(i: int, t: float, ttft: float, tpot: float, status="ok", cls="chat", predicted=None):
    return RequestOutcome(
        request_id=f"r{i}", slo_class=cls, status=status, finished_at=t, ttft_s=ttft, tpot_s=tpot,
        predicted_ttft_s=predicted,
    )  # fmt: skip


TARGET = SloTarget("chat", ttft_s=1.0, tpot_s=0.1)


def test_one_record_per_request_with_its_violations(store):
    store.record_outcome(outcome(1, 1000.0, 1.5, 0.05), TARGET)
    rec = store.get_outcome("r1")
    assert rec["slo_class"] == "chat" and rec["status"] == "ok"
    assert float(rec["ttft_s"]) == 1.5
    assert rec["ttft_violated"] == "1" and rec["tpot_violated"] == "0"
    assert 0 < store.client.ttl(f"{store.prefix}:outcome:r1") <= store.outcome_ttl_s
    assert store.get_outcome("missing") is None


def test_window_counts_rates_and_percentiles(store):
    now = 10_000.0
    # 80 good requests, 20 with slow first tokens, all in the last 30 s.
    for i in range(100):
        ttft = 3.0 if i % 5 == 0 else 0.2
        store.record_outcome(outcome(i, now - 30 + i * 0.3, ttft, 0.05), TARGET)
    store.record_outcome(outcome(999, now - 600, 9.0, 9.0), TARGET)  # outside the window
    w = store.window_stats("chat", 60, now=now)
    assert w.requests == 100
    assert w.ttft_violations == 20 and w.tpot_violations == 0
    assert w.violation_rate == pytest.approx(0.2)
    assert 2.0 < w.ttft_percentile(95) <= 3.0  # p95 lies among the slow ones
    assert w.ttft_percentile(50) <= 0.2
    assert w.newest_at == pytest.approx(now - 30 + 99 * 0.3)


def test_a_batch_counts_statuses_and_prediction_errors(store):
    batch = [
        (outcome(1, 1000.0, 0.5, 0.05, predicted=0.4), TARGET),
        (outcome(2, 1000.5, 2.0, 0.2, predicted=3.0), TARGET),
        (RequestOutcome("r3", "chat", "rejected", 1001.0, predicted_ttft_s=4.0), TARGET),
    ]
    store.record_outcomes(batch)
    w = store.window_stats("chat", 60, now=1002.0)
    assert (w.requests, w.errors, w.violations) == (3, 1, 2)
    assert (w.ttft_violations, w.tpot_violations) == (2, 1)
    assert w.predicted == 2  # the rejected one has a prediction but no first token
    assert w.ttft_pred_err_sum_s == pytest.approx(-0.1 + 1.0)
    assert w.ttft_pred_abs_err_sum_s == pytest.approx(0.1 + 1.0)
    assert w.ttft_mape == pytest.approx((0.1 / 0.5 + 1.0 / 2.0) / 2)
    assert store.get_outcome("r3")["ttft_s"] == ""  # None is stored as ""
    assert store.get_outcome("r2")["predicted_ttft_s"] == "3.0"


def test_an_outcome_redis_refuses_does_not_hold_back_the_rest_of_its_batch(store):
    # A bucket key of the wrong type: that outcome is refused and reported; the others
    # are stored once (a retry of the whole batch would count them twice).
    store.client.set(f"{store.prefix}:bucket:bad:1000", "not a hash")
    batch = [
        (outcome(1, 1000.0, 0.1, 0.01), TARGET),
        (outcome(2, 1000.0, 0.1, 0.01, cls="bad"), None),
    ]
    batch.append((outcome(3, 1001.0, 0.1, 0.01), TARGET))
    assert store.record_outcomes(batch) == 1
    assert store.window_stats("chat", 60, now=1002.0).requests == 2
    store.client.delete(f"{store.prefix}:bucket:bad:1000")
    store.client.set(f"{store.prefix}:bucket:chat:1000", "x")
    with pytest.raises(redis.ResponseError):  # all refused: nothing stored, caller retries
        store.record_outcomes(batch[:1])


def test_outcomes_are_recorded_after_redis_forgets_its_scripts(store):
    # A restarted Redis has an empty script cache: the store loads its script again.
    store.record_outcome(outcome(1, 1000.0, 0.1, 0.01), TARGET)
    store.client.script_flush()
    store.record_outcome(outcome(2, 1000.0, 0.1, 0.01), TARGET)
    store.client.script_flush()
    store.record_outcomes([(outcome(3, 1000.0, 0.1, 0.01), TARGET)] * 2)
    assert store.window_stats("chat", 60, now=1001.0).requests == 4


def test_empty_window_has_no_rate(store):
    w = store.window_stats("nobody", 60, now=5000.0)
    assert w.requests == 0 and w.violation_rate is None and w.ttft_percentile(95) is None


def test_buckets_expire(store):
    store.record_outcome(outcome(1, 1000.0, 0.1, 0.01), TARGET)
    (key,) = list(store.client.scan_iter(match=f"{store.prefix}:bucket:*"))
    assert 0 < store.client.ttl(key) <= store.retention_s + store.bucket_s


def test_targets_round_trip_and_delete_class(store):
    store.put_target(TARGET)
    store.put_target(SloTarget("batch", ttft_s=30, tpot_s=1, percentile=99))
    assert store.get_target("chat") == TARGET
    assert [t.name for t in store.list_targets()] == ["batch", "chat"]
    store.record_outcome(outcome(1, 1000.0, 0.1, 0.01), TARGET)
    assert store.delete_class("chat") >= 2  # target + one bucket
    assert store.get_target("chat") is None
    assert store.window_stats("chat", 60, now=1001.0).requests == 0
    assert [t.name for t in store.list_targets()] == ["batch"]


def test_unreachable_redis_raises_redis_error():
    s = MetricsStore.from_url("redis://127.0.0.1:1/0")
    with pytest.raises(redis.RedisError):
        s.record_outcome(outcome(1, 1.0, 0.1, 0.1), TARGET)
