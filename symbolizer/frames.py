"""The frame model at the bottom of every stage: a frame, the binary it comes from, and
a stack of them. The symbolizer makes frames; the collector's profiles and writers read them."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Tuple


class FrameKind(enum.Enum):
    KERNEL = "kernel"
    NATIVE = "native"
    PYTHON = "python"


@dataclass(frozen=True)
class Module:
    """A binary that frames come from, identified by build ID where it has one."""

    path: str
    build_id: str = ""  # hex GNU build ID; "" when the binary carries none


@dataclass(frozen=True)
class Frame:
    kind: FrameKind
    name: str  # demangled function name, or "[module+0xoffset]" when unknown
    module: Optional[Module] = None
    # Native: file offset of the instruction in `module`; kernel: the kernel address.
    # Normalised so that one binary mapped by many processes shares its locations.
    address: int = 0
    file: str = ""
    line: int = 0  # the line being executed
    start_line: int = 0  # first line of the function, where known

    def __post_init__(self) -> None:
        # A frame is hashed again in every stack that holds it, whenever a stack is a key
        # (each sample added to each profile, each writer): the hash is made once.
        object.__setattr__(self, "_hash", hash((self.kind, self.name, self.module, self.address, self.file,
                                                self.line, self.start_line)))

    def __hash__(self) -> int:
        return self._hash


Stack = Tuple[Frame, ...]  # leaf first, as pprof stores it
