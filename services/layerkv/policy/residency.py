"""Residency planning: with how many KV groups on the device a waiting request starts.

The one rule both the LayerKV engine scheduler (``plugin/scheduler.py``, which applies
it) and admission's TTFT replay (``policy/ttft.py``, which predicts with it) call, so
the prediction cannot drift from the engine. In order:

1. **Leave room.** Taking every group for this request would leave the next waiting
   one (and ``reserve_requests`` more, sized like it, that may arrive meanwhile) stuck
   behind it: keep at most as many groups as leave them room with
   ``min_resident_groups`` each (:func:`~layerkv.policy.sizing.residency_leaving_room`).
2. **All resident** when its blocks for every layer fit: stock vLLM's rule.
3. **Partly resident**: the most groups that fit (at least ``min_resident_groups``),
   the rest offloaded to host memory.
4. Otherwise it waits.

LayerKV's own choices (1 and 3) size the request for its whole output and leave the
blocks running requests will still decode into (:func:`growth_blocks`): admitting
into those would end in a recompute preemption of someone later.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from layerkv.policy.sizing import (
    blocks_needed,
    cdiv,
    max_resident_groups,
    residency_leaving_room,
)


@dataclass(frozen=True)
class KvLayout:
    """The engine's KV geometry and LayerKV knobs, as residency planning needs them."""

    groups: int  # KV groups the layers are split into
    block_size: int
    # False: stock vLLM (a request starts with every group or waits).
    offload: bool = True
    min_resident_groups: int = 0
    reserve_requests: int = 0
    max_model_len: int = 0  # 0: unknown (no cap on a request's final size)

    @property
    def layerkv(self) -> bool:
        return self.offload and self.groups > 1


def held_blocks(layout: KvLayout, resident: int, tokens: int) -> int:
    """Device blocks a request with ``resident`` groups holds for ``tokens`` of KV (at
    least one block per list)."""
    return blocks_needed(layout.groups, resident, cdiv(max(tokens, 1), layout.block_size))


def final_blocks_per_group(layout: KvLayout, total_tokens: int) -> int:
    """Blocks per group a request holds at its end (prompt + its whole output), capped
    at the engine's ``max_model_len``."""
    if layout.max_model_len:
        total_tokens = min(total_tokens, layout.max_model_len)
    return cdiv(total_tokens, layout.block_size)


def growth_blocks(layout: KvLayout, resident: int, final_per_group: int, tokens: int) -> int:
    """Blocks a running request will still take as it decodes from ``tokens`` of KV to
    its end (``final_per_group`` blocks per group)."""
    remaining = max(final_per_group - cdiv(tokens, layout.block_size), 0)
    return blocks_needed(layout.groups, resident, remaining)


class Placement(enum.Enum):
    ALL_RESIDENT = "all_resident"
    LEAVES_ROOM = "leaves_room"  # rule 1: fewer groups than fit, to keep room
    PARTIAL = "partial"  # rule 3: as many groups as fit


@dataclass(frozen=True)
class ResidencyPlan:
    resident_groups: int
    placement: Placement
    # Its prompt fits with every group now (stock vLLM would start it): offloading it
    # to keep room (rule 1) is then not an early admission.
    fits_fully: bool


@dataclass(frozen=True)
class KvRoom:
    """The engine's free memory when a request is planned."""

    free_blocks: int  # device blocks free for admission now
    growth_blocks: int = 0  # of those, what running requests will still decode into
    # Host blocks (each one block of every layer) free for offloaded KV; None: the
    # caller has the host range already (a request being restored).
    host_free_blocks: int | None = None
    # Staging blocks the cap leaves for one more offloaded request; None: no cap.
    staging_free_blocks: int | None = None


def plan_residency(
    layout: KvLayout,
    tokens: int,
    total_tokens: int,
    room: KvRoom,
    *,
    following_total_tokens: int | None = None,
    reserve_requests: int | None = None,
    fits_fully: bool | None = None,
) -> ResidencyPlan | None:
    """How a waiting request with ``tokens`` of KV to compute (``total_tokens`` at its
    end) starts, or None when it must wait (see the module doc for the rules).

    ``following_total_tokens``: the final size of the next waiting request, if any.
    ``reserve_requests``: overrides the layout's (0 for a request being restored).
    ``fits_fully``: the caller's own answer to "do its blocks for every layer fit"
    (the engine passes False once vLLM has refused that allocation); None: from
    ``room.free_blocks``."""
    if fits_fully is None:
        fits_fully = held_blocks(layout, layout.groups, tokens) <= room.free_blocks
    if not layout.layerkv:
        return ResidencyPlan(layout.groups, Placement.ALL_RESIDENT, True) if fits_fully else None
    per_group = final_blocks_per_group(layout, total_tokens)
    usable = room.free_blocks - room.growth_blocks
    partial = _most_that_fit(layout, usable, per_group, room)
    reserve = layout.reserve_requests if reserve_requests is None else reserve_requests
    reserve = max(reserve, 1 if following_total_tokens is not None else 0)
    if reserve and partial is not None:
        following = following_total_tokens if following_total_tokens is not None else total_tokens
        cap = residency_leaving_room(
            usable,
            layout.groups,
            per_group,
            final_blocks_per_group(layout, following),
            layout.min_resident_groups,
            reserve,
        )
        if cap is not None:
            return ResidencyPlan(min(partial, cap), Placement.LEAVES_ROOM, fits_fully)
    if fits_fully:
        return ResidencyPlan(layout.groups, Placement.ALL_RESIDENT, True)
    if partial is not None:
        return ResidencyPlan(partial, Placement.PARTIAL, False)
    return None


def _most_that_fit(layout: KvLayout, usable: int, per_group: int, room: KvRoom) -> int | None:
    """The most groups (fewer than all) that fit in ``usable`` blocks, when the host
    range and the staging cap take the rest; None if not even ``min_resident_groups``."""
    best = max_resident_groups(usable, layout.groups, per_group, layout.min_resident_groups)
    if best is None:
        return None
    # An offloaded request takes a host range of its final size (one host block holds
    # a block of every layer) and one list of staging blocks.
    if room.host_free_blocks is not None and per_group > room.host_free_blocks:
        return None
    if room.staging_free_blocks is not None and per_group > room.staging_free_blocks:
        return None
    return best
