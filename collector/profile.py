"""The neutral profile model: stacks of frames (symbolizer/frames.py) with their labels and
values, which every writer reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from bpfprof.symbolizer.frames import Stack


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
ALLOC_OBJECTS = ValueType("alloc_objects", "count")
ALLOC_SPACE = ValueType("alloc_space", "bytes")
INUSE_OBJECTS = ValueType("inuse_objects", "count")
INUSE_SPACE = ValueType("inuse_space", "bytes")
FAULTS = ValueType("faults", "count")
FAULT_SPACE = ValueType("fault_space", "bytes")
PAGE_SIZE = 4096


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


def memory_profile(start_ns: int) -> Profile:
    """Memory obtained from the kernel as Go's heap profile: [alloc_objects/count,
    alloc_space/bytes, inuse_objects/count, inuse_space/bytes], in use shown."""
    return Profile(
        sample_types=(ALLOC_OBJECTS, ALLOC_SPACE, INUSE_OBJECTS, INUSE_SPACE),
        period_type=ALLOC_SPACE,
        period=1,
        start_ns=start_ns,
        main_value=3,
    )


def faults_profile(fault_period: int, start_ns: int) -> Profile:
    """Page faults, 1 in fault_period sampled and counted as fault_period:
    [faults/count, fault_space/bytes], bytes shown."""
    return Profile(
        sample_types=(FAULTS, FAULT_SPACE),
        period_type=FAULTS,
        period=fault_period,
        start_ns=start_ns,
        main_value=1,
    )
