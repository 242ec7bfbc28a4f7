"""Kernel addresses to function names, from /proc/kallsyms."""

from __future__ import annotations

import bisect
import re
import threading
from array import array
from typing import Dict, List, Optional, Tuple

from bpfprof.symbolizer.frames import Frame, FrameKind, Module
from bpfprof.symbolizer.packed_names import PackedNames

KERNEL_MODULE = Module("[kernel.kallsyms]")
# Address, type and name (a module's name may follow) of a text symbol. Not the __pfx_
# ones: since 6.2 the kernel pads every function with a few bytes it names so, which are
# never run (a sample is not attributed to them); half the symbols of 6.x.
_TEXT_SYMBOL = re.compile(rb"^([0-9a-f]+) [tTwW] (?!__pfx_)(\S+)", re.MULTILINE)


class KernelSymbols:
    """Sorted text symbols of the running kernel and its modules, loaded on first use.
    Some 60k of them: kept as an array of addresses and one block of names, a fraction of
    the memory of as many Python ints and strs."""

    def __init__(self, path: str = "/proc/kallsyms"):
        self._path = path
        self._starts = array("Q")
        self._names = PackedNames([])  # in address order
        self._frames: Dict[int, Frame] = {}
        self._loaded = False
        self._loading = threading.Lock()

    def load_in_background(self) -> None:
        """Read kallsyms (0.2 s) on a thread of its own now, rather than in the first drain."""
        threading.Thread(target=self._load, name="bpfprof-kallsyms", daemon=True).start()

    def _load(self) -> None:
        with self._loading:
            if not self._loaded:
                self._read()
                self._loaded = True

    def _read(self) -> None:
        try:
            with open(self._path, "rb") as f:
                text = f.read()
        except OSError:
            return  # every frame then names its address; see get_frame
        # Straight into arrays and one block of bytes, without a Python object a symbol
        # on the way: 100k short-lived objects made beside the agent's lasting ones would
        # leave the heap fragmented, a few MB bigger for good.
        starts, names, name_starts = array("Q"), bytearray(), array("I")
        for symbol in _TEXT_SYMBOL.finditer(text):
            address = int(symbol[1], 16)
            if address:  # all zero when kptr_restrict hides them
                starts.append(address)
                name_starts.append(len(names))
                names += symbol[2]
                names.append(0)
        if any(a > b for a, b in zip(starts, starts[1:])):  # the kernel sorts them, but need not
            order = sorted(range(len(starts)), key=starts.__getitem__)
            starts = array("Q", (starts[i] for i in order))
            names, name_starts = _reordered(names, name_starts, order)
        self._starts = starts
        self._names = PackedNames.from_block(bytes(names), name_starts)

    def get_name(self, address: int) -> Optional[str]:
        if not self._loaded:
            self._load()
        i = bisect.bisect_right(self._starts, address) - 1
        if i < 0:
            return None
        return self._names[i]

    def get_frame(self, address: int) -> Frame:
        frame = self._frames.get(address)
        if frame is None:
            name = self.get_name(address) or f"[kernel.kallsyms+{address:#x}]"
            frame = Frame(FrameKind.KERNEL, name, KERNEL_MODULE, address)
            self._frames[address] = frame
        return frame


def _reordered(names: bytearray, starts: array, order: List[int]) -> Tuple[bytearray, array]:
    """The packed names (each ending at a zero byte) in a new order of their indices."""
    block, new_starts = bytearray(), array("I")
    for i in order:
        new_starts.append(len(block))
        block += names[starts[i]:names.index(0, starts[i]) + 1]
    return block, new_starts
