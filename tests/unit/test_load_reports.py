from layerkv.admission.load_reports import load_report
from layerkv.common.load import summarize_pool
from layerkv.v1 import worker_pb2


def test_layerkv_load_becomes_an_offload_report():
    load = worker_pb2.WorkerLoad(
        running=5,
        waiting=1,
        in_flight=6,
        kv_blocks_total=560,
        kv_blocks_free=3,
        layerkv=True,
        host_kv_blocks_total=1000,
        host_kv_blocks_free=300,
        offloaded_requests=2,
    )
    report = load_report("10.0.0.1:50061", load, reported_at=100.0)
    assert (report.running, report.waiting, report.in_flight) == (5, 1, 6)
    assert report.offloaded_requests == 2
    assert (report.host_kv_blocks_used, report.host_kv_blocks_total) == (700, 1000)
    pool = summarize_pool([report], now=101.0, stale_after_s=30)
    assert pool.offloaded_requests == 2 and pool.kv_blocks_free == 3


def test_stock_worker_reports_no_offload():
    load = worker_pb2.WorkerLoad(running=1, kv_blocks_total=100, kv_blocks_free=40)
    report = load_report("w:1", load, reported_at=1.0)
    assert report.offloaded_requests == 0 and report.host_kv_blocks_total == 0
    assert report.host_kv_blocks_used == 0
