"""Contiguous ranges of host KV blocks, one range per request with offloaded layers.

Contiguous ranges keep every host<->device copy of a layer one large transfer (small
block-sized copies are slow on PCIe). First fit over a sorted free list, coalescing on
free; the free count returns to the total when everything is released.
"""

from __future__ import annotations

import bisect


class HostRangeAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        self.num_blocks = num_blocks
        # Sorted, non-overlapping, non-adjacent (start, length) free ranges.
        self._free: list[tuple[int, int]] = [(0, num_blocks)] if num_blocks else []
        self._allocated: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def largest_free(self) -> int:
        """The longest range :meth:`allocate` can hand out now."""
        return max((length for _, length in self._free), default=0)

    def allocate(self, length: int) -> int | None:
        """Start of a free range of ``length`` blocks, or None if none is large enough."""
        if length <= 0:
            raise ValueError("length must be > 0")
        for i, (start, free_len) in enumerate(self._free):
            if free_len >= length:
                if free_len == length:
                    del self._free[i]
                else:
                    self._free[i] = (start + length, free_len - length)
                self._allocated[start] = length
                return start
        return None

    def free(self, start: int) -> None:
        length = self._allocated.pop(start)
        i = bisect.bisect_left(self._free, (start, 0))
        self._free.insert(i, (start, length))
        # Coalesce with the right, then the left neighbour.
        if i + 1 < len(self._free) and start + length == self._free[i + 1][0]:
            self._free[i] = (start, length + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == self._free[i][0]:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]
