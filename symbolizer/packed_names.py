"""Many short names in one block of bytes: a fraction of the memory of as many Python strs,
for symbol tables that a whole-system profiler holds for every binary it has seen."""

from __future__ import annotations

import itertools
from array import array
from typing import Sequence


class PackedNames:
    def __init__(self, names: Sequence[bytes]) -> None:
        self._block = b"\0".join(names) + b"\0"
        self._starts = array("I", itertools.accumulate([len(n) + 1 for n in names[:-1]], initial=0)) if names \
            else array("I")

    @classmethod
    def from_block(cls, block: bytes, starts: array) -> PackedNames:
        """Names already packed: each at its start in the block, ending at a zero byte."""
        packed = cls([])
        packed._block, packed._starts = block, starts
        return packed

    def __len__(self) -> int:
        return len(self._starts)

    def num_bytes(self) -> int:
        return len(self._block) + self._starts.itemsize * len(self._starts)

    def __getitem__(self, i: int) -> str:
        start = self._starts[i]
        return self._block[start:self._block.index(b"\0", start)].decode(errors="replace")
