"""Which layers share a KV group, and which groups a request keeps resident.

Groups are *strided* (group g holds layers g, g+G, g+2G, ...), so offloading any group
spreads its layers evenly through the model. Resident groups are then chosen evenly
spaced too: each offloaded layer sits next to resident ones, whose compute hides the
fetch of the offloaded layer's KV (LayerKV's interleaving).
"""

from __future__ import annotations


def layer_groups(num_layers: int, num_groups: int) -> list[tuple[int, ...]]:
    """Layer indices of each KV group: group g = layers {g, g+G, g+2G, ...}."""
    if num_layers < 1:
        raise ValueError(f"the model has no attention layers (num_layers={num_layers})")
    if not 1 <= num_groups <= num_layers:
        raise ValueError(
            f"LayerKV num_groups={num_groups} must be between 1 and the number of "
            f"attention layers ({num_layers})"
        )
    return [tuple(range(g, num_layers, num_groups)) for g in range(num_groups)]


def resident_groups(num_groups: int, num_resident: int) -> tuple[int, ...]:
    """The ``num_resident`` group ids to keep on the device, evenly spaced over
    ``range(num_groups)`` so that offloaded groups are interleaved with resident ones.
    """
    if not 0 <= num_resident <= num_groups:
        raise ValueError(f"num_resident={num_resident} not in [0, {num_groups}]")
    if num_resident == 0:
        return ()
    # Centre each resident slot in its stride: for 8 groups and 4 resident this keeps
    # 1, 3, 5, 7 (every offloaded layer has a resident successor to hide under).
    stride = num_groups / num_resident
    return tuple(int(stride * i + stride / 2) for i in range(num_resident))


def offloaded_groups(num_groups: int, resident: tuple[int, ...]) -> tuple[int, ...]:
    keep = set(resident)
    return tuple(g for g in range(num_groups) if g not in keep)
