import pytest

from layerkv.common.requests import (
    DEFAULT_MAX_TOKENS,
    InvalidRequest,
    check_prompt,
    request_id_or_new,
    sampling_from_proto,
)
from layerkv.common.serving import parse_strict
from layerkv.v1 import admission_pb2, common_pb2


def test_sampling_defaults_apply_to_unset_fields():
    s = sampling_from_proto(common_pb2.SamplingParams())
    assert (s.max_tokens, s.temperature, s.top_p, s.seed) == (DEFAULT_MAX_TOKENS, 1.0, 1.0, None)
    s = sampling_from_proto(common_pb2.SamplingParams(temperature=0.0, seed=7, max_tokens=3))
    assert (s.temperature, s.seed, s.max_tokens) == (0.0, 7, 3)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-5), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_bad_sampling_is_refused_with_the_field_named(params, message):
    with pytest.raises(InvalidRequest, match=message):
        sampling_from_proto(common_pb2.SamplingParams(**params))


def test_prompt_must_be_exactly_one_of_text_and_ids():
    check_prompt("hi", [])
    check_prompt("", [1, 2])
    with pytest.raises(InvalidRequest, match="empty"):
        check_prompt("", [])
    with pytest.raises(InvalidRequest, match="not both"):
        check_prompt("hi", [1])


def test_request_ids():
    assert len(request_id_or_new("")) == 32
    assert request_id_or_new("abc-1:2.3_x") == "abc-1:2.3_x"
    for bad in ("has space", "x" * 129, "semi;colon"):
        with pytest.raises(InvalidRequest, match="request_id"):
            request_id_or_new(bad)


def test_parse_strict_refuses_unknown_fields_even_nested():
    ok = admission_pb2.GenerateRequest(prompt="x").SerializeToString()
    assert parse_strict(admission_pb2.GenerateRequest, ok).prompt == "x"
    unknown_top = ok + bytes([0xA0, 0x06, 0x01])  # field 100, varint 1
    with pytest.raises(InvalidRequest, match=r"field numbers \[100\]"):
        parse_strict(admission_pb2.GenerateRequest, unknown_top)
    inner = common_pb2.SamplingParams(max_tokens=3).SerializeToString() + bytes([0xA0, 0x06, 1])
    nested = bytes([0x22, len(inner)]) + inner  # field 4 (sampling), length-delimited
    with pytest.raises(InvalidRequest, match="does not know"):
        parse_strict(admission_pb2.GenerateRequest, nested)


def test_parse_strict_refuses_garbage():
    with pytest.raises(InvalidRequest, match="malformed"):
        parse_strict(admission_pb2.GenerateRequest, b"\xff\xff\xff")
