"""The ranges of memory BPF keeps for each process (memory.bpf.c): read from their maps,
holes BPF could not follow cut out of them, those of process images that ended taken out."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from bpfprof.bpf import define

RESERVED = define("MEMORY_RESERVED")  # a range's flag: reserved address space, not in use

RANGE_KEY = struct.Struct("@IIQ")  # struct memory_range_key
# struct memory_range, its struct sample_key's fields flattened at the end.
RANGE = struct.Struct("@QQQII" + "IIiiQQ16s")
HOLE = struct.Struct("@QQ")  # struct memory_hole
PROCESS = struct.Struct("@QqQ")  # struct memory_process
SAMPLE_KEY_FIELDS = 7


class Range(NamedTuple):
    pid: int
    start: int
    end: int
    generation: int
    since_ns: int
    flags: int
    key: Tuple  # struct sample_key's fields, in order


class Hole(NamedTuple):
    pid: int
    start: int
    end: int
    since_ns: int


def unpack_ranges(keys: bytes, values: bytes) -> Iterable[Range]:
    for (pid, _, start), (end, generation, since, flags, _, *key) in zip(RANGE_KEY.iter_unpack(keys),
                                                                           RANGE.iter_unpack(values)):
        yield Range(pid, start, end, generation, since, flags, tuple(key))


def unpack_holes(keys: bytes, values: bytes) -> Iterable[Hole]:
    for (pid, _, start), (end, since) in zip(RANGE_KEY.iter_unpack(keys), HOLE.iter_unpack(values)):
        yield Hole(pid, start, end, since)


def pack_range(r: Range) -> Tuple[bytes, bytes]:
    return RANGE_KEY.pack(r.pid, 0, r.start), RANGE.pack(r.end, r.generation, r.since_ns, r.flags, 0, *r.key)


def cut_holes(ranges: List[Range], holes: List[Hole]) -> Tuple[List[Range], List[Range]]:
    """The ranges to remove and to add so that no range obtained before a hole was made
    covers it: a range a hole cuts keeps what lies on either side. Holes apply in the
    order they were made."""
    by_pid: Dict[int, List[Range]] = {}
    for r in ranges:
        by_pid.setdefault(r.pid, []).append(r)
    removed: List[Range] = []
    added: List[Range] = []
    for hole in sorted(holes, key=lambda h: h.since_ns):
        kept = []
        for r in by_pid.get(hole.pid, ()):
            if r.since_ns >= hole.since_ns or r.end <= hole.start or r.start >= hole.end:
                kept.append(r)
                continue
            pieces = [r._replace(end=hole.start)] if r.start < hole.start else []
            if r.end > hole.end:
                pieces.append(r._replace(start=hole.end))
            if r in added:
                added.remove(r)
            else:
                removed.append(r)
            added.extend(pieces)
            kept.extend(pieces)
        if hole.pid in by_pid:
            by_pid[hole.pid] = kept
    return removed, added


@dataclass
class Held:
    """Memory held per struct sample_key: [ranges, bytes]."""

    by_key: Dict[Tuple, List[int]] = field(default_factory=dict)

    def add(self, r: Range) -> None:
        held = self.by_key.setdefault(r.key, [0, 0])
        held[0] += 1
        held[1] += r.end - r.start


@dataclass
class Reading:
    live: Held  # ranges of images still running
    ended: Held  # ranges of images that ended (exit or exec), to be removed
    ended_ranges: List[Range]
    remaining: List[Range]  # every range kept after this reading


def classify(ranges: Iterable[Range], generations: Dict[int, int], pid: Optional[int] = None) -> Reading:
    """Splits ranges into those of running images (a process's current generation) and
    those of images that ended; reserved ranges hold nothing. With `pid`, only that
    process's ranges, all taken as live (what it holds as the OOM killer ends it)."""
    reading = Reading(Held(), Held(), [], [])
    for r in ranges:
        if pid is not None:
            if r.pid == pid and not r.flags & RESERVED:
                reading.live.add(r)
            continue
        if generations.get(r.pid) == r.generation:
            reading.remaining.append(r)
            if not r.flags & RESERVED:
                reading.live.add(r)
        else:
            reading.ended_ranges.append(r)
            if not r.flags & RESERVED:
                reading.ended.add(r)
    return reading
