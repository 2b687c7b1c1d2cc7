"""Admission queue and routing policy (pure, fast, property-based where it fits)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerkv.policy.queue import (
    EdfQueue,
    FifoQueue,
    QueuedRequest,
    QueueFull,
    QueuePolicy,
    create_queue,
)
from layerkv.policy.routing import (
    MAX_RETRY_AFTER_S,
    ClassPolicy,
    MissPolicy,
    Verdict,
    best_prediction,
    deadline_for,
    dispatch_verdict,
    should_reject,
)
from layerkv.policy.ttft import TtftPrediction


def item(rid, deadline, *, priority=0, target=1.0, arrival=0.0, **kw) -> QueuedRequest:
    return QueuedRequest(rid, "c", arrival, deadline, target, priority, **kw)


def pred(worker="w", ttft=0.1, wait=0.0, prefill=None, fits=True) -> TtftPrediction:
    prefill = ttft - wait if prefill is None else prefill
    return TtftPrediction(worker, ttft, wait, 0.0, prefill, 1, fits)


# -- queue ---------------------------------------------------------------------------


def test_edf_orders_by_deadline_then_arrival():
    q = EdfQueue(10)
    for rid, d in [("a", 5.0), ("b", 1.0), ("c", 3.0), ("d", 1.0)]:
        q.push(item(rid, d))
    assert [x.request_id for x in q] == ["b", "d", "c", "a"]
    assert q.position(q.peek()) == 1
    assert q.pop().request_id == "b"


def test_priority_within_a_class_goes_first():
    q = EdfQueue(10)
    q.push(item("low", 2.0, priority=0, target=1.0))
    q.push(item("high", 2.5, priority=1, target=1.0))  # counts as due at 1.5
    assert [x.request_id for x in q] == ["high", "low"]


def test_late_requests_go_behind_on_time_ones():
    q = EdfQueue(10)
    lost = item("lost", 0.5)
    q.push(lost)
    q.push(item("ok", 3.0))
    q.mark_late(lost)
    assert [x.request_id for x in q] == ["ok", "lost"]
    assert lost.late


def test_bounded_queue_refuses_and_keeps_what_it_has():
    q = create_queue("edf", 2)
    q.push(item("a", 1))
    q.push(item("b", 2))
    with pytest.raises(QueueFull):
        q.push(item("c", 0))
    assert [x.request_id for x in q] == ["a", "b"]
    with pytest.raises(ValueError):
        create_queue("edf", 0)


def test_duplicate_id_and_remove_twice():
    q = EdfQueue(4)
    a = item("a", 1)
    q.push(a)
    with pytest.raises(ValueError):
        q.push(item("a", 2))
    assert q.remove(a) and not q.remove(a) and len(q) == 0 and a not in q


def test_fifo_and_factory():
    q = create_queue(QueuePolicy.FIFO, 5)
    assert isinstance(q, FifoQueue)
    for rid, d in [("a", 5.0), ("b", 1.0)]:
        q.push(item(rid, d))
    assert [x.request_id for x in q] == ["a", "b"]


ops = st.lists(
    st.tuples(
        st.sampled_from(["push", "pop", "remove", "late"]),
        st.floats(0, 100, allow_nan=False),
        st.integers(-2, 2),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, capacity=st.integers(1, 12))
def test_no_request_lost_or_duplicated_and_edf_order(ops, capacity):
    q = EdfQueue(capacity)
    model: dict[str, QueuedRequest] = {}
    out: list[str] = []
    n = 0
    for op, deadline, prio in ops:
        if op == "push":
            x = item(f"r{n}", deadline, priority=prio)
            n += 1
            if len(model) >= capacity:
                with pytest.raises(QueueFull):
                    q.push(x)
            else:
                q.push(x)
                model[x.request_id] = x
        elif op == "pop" and model:
            x = q.pop()
            out.append(x.request_id)
            del model[x.request_id]
        elif op == "remove" and model:
            x = model.pop(sorted(model)[0])
            assert q.remove(x)
        elif op == "late" and model:
            q.mark_late(model[sorted(model)[-1]])
        assert len(q) == len(model) <= capacity
        listed = list(q)
        assert {x.request_id for x in listed} == set(model)
        assert len(listed) == len(set(x.request_id for x in listed))
        keys = [(x.late, x.order_deadline, x.seq) for x in listed]
        assert keys == sorted(keys)
    assert len(out) == len(set(out))


# -- routing -------------------------------------------------------------------------


def test_best_prediction_prefers_lowest_ttft_and_fitting_workers():
    preds = [pred("a", 0.5), pred("b", 0.2), pred("c", 0.1, fits=False)]
    assert best_prediction(preds).worker == "b"
    assert best_prediction([]) is None


def test_reject_policy_fires_only_far_over_target_with_retry_after():
    policy = ClassPolicy(MissPolicy.REJECT, reject_factor=2.0)
    assert should_reject(pred(ttft=1.9), 1.0, policy) is None
    r = should_reject(pred(ttft=3.5, wait=3.4), 1.0, policy)
    assert r is not None and r.retry_after_s == pytest.approx(2.5)
    assert "exceeds" in r.reason
    huge = should_reject(pred(ttft=1e6, wait=1e6), 1.0, policy)
    assert huge.retry_after_s == MAX_RETRY_AFTER_S
    # A queue class never rejects.
    assert should_reject(pred(ttft=100), 1.0, ClassPolicy()) is None
    with pytest.raises(ValueError):
        ClassPolicy(MissPolicy.REJECT, reject_factor=0.5)


def test_dispatch_verdicts():
    x = item("x", deadline=10.0, arrival=0.0)
    # Plenty of slack: held here (late binding), not parked in a worker's queue.
    assert dispatch_verdict(x, pred(ttft=5, wait=4), now=1.0) is Verdict.WAIT
    # Just in time: sent while it still meets its deadline.
    assert dispatch_verdict(x, pred(ttft=8.9, wait=4), now=1.0, margin_s=0.3) is Verdict.DISPATCH
    assert dispatch_verdict(x, pred(ttft=20, wait=0), now=1.0) is Verdict.DISPATCH  # start now
    assert dispatch_verdict(x, pred(ttft=20, wait=15), now=1.0) is Verdict.WAIT
    assert dispatch_verdict(x, pred(ttft=20, wait=5, prefill=15), now=1.0) is Verdict.LATE
    assert dispatch_verdict(x, None, now=1.0) is Verdict.WAIT
    y = item("y", deadline=10.0, client_deadline=2.0)
    assert dispatch_verdict(y, pred(ttft=0.1), now=2.5) is Verdict.EXPIRED


def test_deadline_is_the_sooner_of_target_and_client_deadline():
    assert deadline_for(10.0, 2.0, None) == 12.0
    assert deadline_for(10.0, 2.0, 11.0) == 11.0
    assert deadline_for(10.0, 2.0, float("inf")) == 12.0
