"""The neutral profile model: frames, stacks, labels and values that every writer reads."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


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


@dataclass(frozen=True)
class Labels:
    pid: int
    tid: int
    comm: str  # process name
    thread: str  # thread name
    extra: Tuple[Tuple[str, str], ...] = ()  # e.g. container, pod


@dataclass(frozen=True)
class ValueType:
    type: str
    unit: str


SAMPLES = ValueType("samples", "count")
CPU_NS = ValueType("cpu", "nanoseconds")
WALL_NS = ValueType("wall", "nanoseconds")
CONTENTIONS = ValueType("contentions", "count")
DELAY_NS = ValueType("delay", "nanoseconds")


@dataclass
class Profile:
    """Values summed per (stack, labels); `values` lines up with `sample_types`."""

    sample_types: Tuple[ValueType, ...]
    period_type: ValueType
    period: int
    start_ns: int  # wall-clock time the profile starts, ns since the epoch
    duration_ns: int = 0
    samples: Dict[Tuple[Stack, Labels], List[int]] = field(default_factory=dict)
    main_value: int = 0  # the value folded output and summaries show

    def add(self, stack: Stack, labels: Labels, values: List[int]) -> None:
        total = self.samples.get((stack, labels))
        if total is None:
            self.samples[(stack, labels)] = list(values)
        else:
            for i, v in enumerate(values):
                total[i] += v

    def empty_copy(self, **changes) -> "Profile":
        """A profile of the same types and time span with no samples (fields as `changes` say)."""
        return dataclasses.replace(self, samples={}, **changes)

    def num_samples(self) -> int:
        return sum(v[0] for v in self.samples.values())

    def total(self) -> int:
        return sum(v[self.main_value] for v in self.samples.values())

    @property
    def main_type(self) -> ValueType:
        """The type of the value shown; samples, counted, for a profile declaring none."""
        return self.sample_types[self.main_value] if self.sample_types else SAMPLES


def cpu_profile(hz: int, start_ns: int) -> Profile:
    """A CPU profile as pprof expects it: [samples/count, cpu/nanoseconds], period 1e9/Hz."""
    return Profile(
        sample_types=(SAMPLES, CPU_NS),
        period_type=CPU_NS,
        period=1_000_000_000 // hz,
        start_ns=start_ns,
    )


def block_profile(start_ns: int) -> Profile:
    """Blocking delay as Go's block profile: [contentions/count, delay/nanoseconds],
    period type contentions/count; folded output carries the nanoseconds."""
    return Profile(
        sample_types=(CONTENTIONS, DELAY_NS),
        period_type=CONTENTIONS,
        period=1,
        start_ns=start_ns,
        main_value=1,
    )


def wall_profile(hz: int, start_ns: int) -> Profile:
    """Wall-clock time per thread: [wall/nanoseconds], on-CPU time from samples (period
    1e9/Hz) and off-CPU time, blocked or waiting to run, measured exactly."""
    return Profile(
        sample_types=(WALL_NS,),
        period_type=WALL_NS,
        period=1_000_000_000 // hz,
        start_ns=start_ns,
    )
