"""The store's worker-load section (added for the operator) against a real Redis."""

from __future__ import annotations

import time

import pytest

from layerkv.common.load import WorkerLoadReport
from layerkv.common.store import MetricsStore


def test_worker_loads_round_trip_and_latest_report_wins(store: MetricsStore) -> None:
    now = time.time()
    old = WorkerLoadReport("10.1.0.1:50061", now - 5, running=1, kv_blocks_total=100)
    new = WorkerLoadReport(
        "10.1.0.1:50061",
        now,
        running=3,
        waiting=1,
        in_flight=4,
        kv_blocks_total=100,
        kv_blocks_free=20,
        offloaded_requests=2,
        host_kv_blocks_used=10,
        host_kv_blocks_total=400,
        draining=True,
    )
    other = WorkerLoadReport("10.1.0.2:50061", now, running=2, kv_blocks_total=100)
    for report in (old, new, other):
        store.put_worker_load("pool-rt", report)
    store.put_worker_load("another-pool", other)
    loads = sorted(store.worker_loads("pool-rt"), key=lambda r: r.worker)
    assert loads == [new, other]
    assert store.worker_loads("nobody") == []


def test_expired_reports_drop_out_of_the_index(store: MetricsStore) -> None:
    now = time.time()
    store.put_worker_load("pool-ttl", WorkerLoadReport("gone:1", now - 100), ttl_s=30)
    store.put_worker_load("pool-ttl", WorkerLoadReport("live:1", now), ttl_s=30)
    # The old worker's index entry is trimmed on the next write; its hash expires by TTL.
    members = store.client.zrange("layerkv:load:pool-ttl", 0, -1)
    assert members == ["live:1"]
    assert 0 < store.client.ttl("layerkv:load:pool-ttl:live:1") <= 30
    with pytest.raises(ValueError):
        store.put_worker_load("pool-ttl", WorkerLoadReport("x:1", now), ttl_s=0)
