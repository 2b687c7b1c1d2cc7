"""How many KV groups a request can keep resident with the blocks that are free.

A request with ``r`` resident groups out of ``G`` holds ``r`` block lists plus, when
``r < G``, one more list of *staging* blocks that every offloaded group shares (its
layers take turns: load from host, attend, save new KV back). So it needs
``(r + 1) * blocks_per_group`` blocks instead of ``G * blocks_per_group``.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceiling division: blocks of ``b`` tokens that hold ``a`` tokens."""
    return -(-a // b)


def blocks_needed(num_groups: int, num_resident: int, blocks_per_group: int) -> int:
    """Device blocks a request with ``num_resident`` resident groups holds."""
    lists = num_groups if num_resident >= num_groups else num_resident + 1
    return lists * blocks_per_group


def max_resident_groups(
    free_blocks: int, num_groups: int, blocks_per_group: int, min_resident: int
) -> int | None:
    """The most resident groups (fewer than ``num_groups``: the all-resident case is
    stock vLLM's, tried first) that fit in ``free_blocks``, or None when even
    ``min_resident`` groups do not fit.
    """
    if blocks_per_group <= 0:
        return num_groups - 1 if num_groups > min_resident else None
    lists = free_blocks // blocks_per_group
    best = min(num_groups - 1, lists - 1)
    if best < min_resident:
        return None
    return best


def promotion_target(
    free_blocks: int,
    num_groups: int,
    num_resident: int,
    blocks_per_group: int,
    headroom_blocks: int,
) -> int | None:
    """Resident-group count a running request can be promoted to, or None.

    ``free_blocks`` counts the blocks free now; the request's own blocks come back when
    it is re-planned, so the budget is free + held. ``headroom_blocks`` stays free for
    the decode growth of everyone else (promotion must not cause preemptions).
    """
    held = blocks_needed(num_groups, num_resident, blocks_per_group)
    budget = free_blocks + held - headroom_blocks
    if blocks_needed(num_groups, num_groups, blocks_per_group) <= budget:
        return num_groups
    target = min(num_groups - 1, budget // max(blocks_per_group, 1) - 1)
    return target if target > num_resident else None


def residency_leaving_room(
    free_blocks: int,
    num_groups: int,
    blocks_per_group: int,
    next_blocks_per_group: int,
    min_resident: int,
    next_requests: int = 1,
) -> int | None:
    """Resident groups for the head of the queue such that ``next_requests`` more
    requests of ``next_blocks_per_group`` can still be admitted with ``min_resident``
    groups; None when the head can be fully resident anyway, ``min_resident`` when no
    such split exists (the pool is nearly full: keep as much of it free as possible)."""
    if next_requests <= 0:
        return None
    reserve = next_requests * blocks_needed(num_groups, min_resident, next_blocks_per_group)
    if blocks_needed(num_groups, num_groups, blocks_per_group) + reserve <= free_blocks:
        return None
    best = max_resident_groups(free_blocks - reserve, num_groups, blocks_per_group, min_resident)
    return min_resident if best is None else best
