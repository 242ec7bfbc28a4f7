"""Kernel addresses to function names, from /proc/kallsyms."""

from __future__ import annotations

import bisect
import threading
from array import array
from typing import Dict, List, Optional, Tuple

from bpfprof.collector.profile import Frame, FrameKind, Module
from bpfprof.symbolizer.packed_names import PackedNames

KERNEL_MODULE = Module("[kernel.kallsyms]")
_TEXT_TYPES = frozenset((b"t", b"T", b"w", b"W"))


class KernelSymbols:
    """Sorted text symbols of the running kernel and its modules, loaded on first use.
    About 100k of them: kept as an array of addresses and one block of names (13 MB less
    than as Python ints and strs)."""

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
        symbols: List[Tuple[int, bytes]] = []
        try:
            with open(self._path, "rb") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[1] in _TEXT_TYPES:
                        address = int(parts[0], 16)
                        if address:  # all zero when kptr_restrict hides them
                            symbols.append((address, parts[2]))
        except OSError:
            return  # every frame then names its address; see get_frame
        symbols.sort()
        self._starts = array("Q", [a for a, _ in symbols])
        self._names = PackedNames([n for _, n in symbols])

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
