"""Places runs of consecutive elements in a fixed-size array (a BPF map sized at start-up)."""

from __future__ import annotations

import bisect
from typing import List, Optional


class RunAllocator:
    """First fit over the free runs, which are kept sorted and merged with their
    neighbours when freed."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._starts: List[int] = [0] if capacity else []
        self._lengths: List[int] = [capacity] if capacity else []
        self.num_used = 0

    def allocate(self, length: int) -> Optional[int]:
        """The first index of a free run of `length` elements, now taken; None if no free
        run is that long."""
        if length <= 0:
            return None
        for i, free in enumerate(self._lengths):
            if free >= length:
                first = self._starts[i]
                if free == length:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i] += length
                    self._lengths[i] -= length
                self.num_used += length
                return first
        return None

    def free(self, first: int, length: int) -> None:
        i = bisect.bisect_left(self._starts, first)
        self.num_used -= length
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] == first:
            i -= 1
            self._lengths[i] += length
        else:
            self._starts.insert(i, first)
            self._lengths.insert(i, length)
        if i + 1 < len(self._starts) and self._starts[i] + self._lengths[i] == self._starts[i + 1]:
            self._lengths[i] += self._lengths.pop(i + 1)
            del self._starts[i + 1]
