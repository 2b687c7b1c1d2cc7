"""Validation of generation requests, shared by the admission service and the worker.

Pure: takes the generated protobuf messages, returns plain dataclasses or raises
:class:`InvalidRequest` with a message meant for the client."""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 64
MAX_STOP_STRINGS = 16
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class InvalidRequest(ValueError):
    """A request the server will not run; the message says why (-> INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


def sampling_from_proto(p) -> Sampling:
    """``p`` is a ``layerkv.v1.SamplingParams``; unset optional fields take defaults."""
    s = Sampling(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        ignore_eos=p.ignore_eos,
    )
    if s.max_tokens <= 0:
        raise InvalidRequest(f"sampling.max_tokens must be >= 1, got {s.max_tokens}")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise InvalidRequest(f"sampling.temperature must be >= 0, got {s.temperature}")
    if not math.isfinite(s.top_p) or not 0 < s.top_p <= 1:
        raise InvalidRequest(f"sampling.top_p must be in (0, 1], got {s.top_p}")
    if len(s.stop) > MAX_STOP_STRINGS or any(not x for x in s.stop):
        raise InvalidRequest(f"sampling.stop takes at most {MAX_STOP_STRINGS} non-empty strings")
    return s


def check_prompt(prompt: str, prompt_token_ids) -> None:
    """Exactly one of the text prompt and the token-id prompt must be given."""
    if prompt and len(prompt_token_ids):
        raise InvalidRequest("give either prompt or prompt_token_ids, not both")
    if not prompt and not len(prompt_token_ids):
        raise InvalidRequest("the prompt is empty: set prompt or prompt_token_ids")


def request_id_or_new(request_id: str) -> str:
    if not request_id:
        return uuid.uuid4().hex
    if not _REQUEST_ID.match(request_id):
        raise InvalidRequest(
            "request_id must be 1-128 characters of letters, digits, '-', '_', '.', ':'"
        )
    return request_id
