import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layerkv.common.slo import (
    LATENCY_BUCKETS_S,
    RequestOutcome,
    SloTarget,
    histogram_index,
    percentile_from_histogram,
    violations,
)

TARGET = SloTarget("chat", ttft_s=1.0, tpot_s=0.1)


def outcome(**kw) -> RequestOutcome:
    base = dict(request_id="r", slo_class="chat", status="ok", finished_at=0.0)
    return RequestOutcome(**{**base, **kw})


def test_violations_per_target():
    assert violations(outcome(ttft_s=0.5, tpot_s=0.05), TARGET).any is False
    v = violations(outcome(ttft_s=1.5, tpot_s=0.05), TARGET)
    assert (v.ttft, v.tpot, v.any) == (True, False, True)
    v = violations(outcome(ttft_s=0.5, tpot_s=0.2), TARGET)
    assert (v.ttft, v.tpot) == (False, True)


def test_failed_and_rejected_requests_violate_ttft_but_cancelled_do_not():
    assert violations(outcome(status="error"), TARGET).ttft
    assert violations(outcome(status="rejected"), TARGET).ttft
    assert not violations(outcome(status="cancelled", ttft_s=0.2), TARGET).any


def test_no_target_means_no_violation():
    assert not violations(outcome(ttft_s=100.0), None).any


@pytest.mark.parametrize(
    "kw",
    [
        dict(name="Bad_Name", ttft_s=1, tpot_s=1),
        dict(name="ok", ttft_s=0, tpot_s=1),
        dict(name="ok", ttft_s=1, tpot_s=1, percentile=100),
        dict(name="ok", ttft_s=1, tpot_s=1, max_violation_rate=1.5),
    ],
)
def test_target_rejects_nonsense(kw):
    with pytest.raises(ValueError):
        SloTarget(**kw)


def test_outcome_rejects_unknown_status():
    with pytest.raises(ValueError, match="status"):
        outcome(status="weird")


def test_percentile_interpolates_inside_bucket():
    counts = [0] * len(LATENCY_BUCKETS_S)
    i = histogram_index(0.9)  # the (0.75, 1.0] bucket
    counts[i] = 100
    assert LATENCY_BUCKETS_S[i] == 1.0
    assert percentile_from_histogram(counts, 50) == pytest.approx(0.875)
    assert percentile_from_histogram([0] * len(counts), 50) is None


@given(st.lists(st.floats(0.001, 100.0), min_size=1, max_size=200), st.floats(1, 99))
def test_percentile_is_within_the_bucket_of_the_exact_value(values, q):
    counts = [0] * len(LATENCY_BUCKETS_S)
    for v in values:
        counts[histogram_index(v)] += 1
    exact = sorted(values)[max(0, math.ceil(q / 100 * len(values)) - 1)]
    got = percentile_from_histogram(counts, q)
    i = histogram_index(exact)
    lower = LATENCY_BUCKETS_S[i - 1] if i else 0.0
    assert lower <= got <= LATENCY_BUCKETS_S[i]
