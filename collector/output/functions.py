"""The functions of a profile with their self and total values: the rows of every table
(report, top, the HTML view), for one profile or the change between two."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Generic, List, Optional, Sequence, TypeVar

from bpfprof.collector.errors import UsageError
from bpfprof.collector.profile import Profile
from bpfprof.symbolizer.frames import Frame, FrameKind, Stack

T = TypeVar("T")


@dataclass(frozen=True)
class Function:
    name: str
    where: str  # source file:first line, else the binary's file name
    kind: FrameKind

    @property
    def display_name(self) -> str:
        """The name as tables and other tools show it: kernel functions marked [k]."""
        return self.name + (" [k]" if self.kind is FrameKind.KERNEL else "")


def function_of(frame: Frame) -> Function:
    if frame.file:
        where = f"{frame.file}:{frame.start_line}" if frame.start_line else frame.file
    elif frame.module is not None:
        where = frame.module.path.rsplit("/", 1)[-1]
    else:
        where = ""
    return Function(frame.name, where, frame.kind)


class PerFrame(Generic[T]):
    """`of(frame)` for every frame of a profile, each frame object worked out once: a
    profile shares its Frame objects between stacks, and hashing a whole Frame (or even
    a Function) costs more than the rest of building a table or tree. Frames are told
    apart by identity, so they must outlive this (they do while their profile lives)."""

    def __init__(self, of: Callable[[Frame], T]) -> None:
        self._of = of
        self._by_id: Dict[int, T] = {}

    def __call__(self, frame: Frame) -> T:
        value = self._by_id.get(id(frame))
        if value is None:
            value = self._by_id[id(frame)] = self._of(frame)
        return value


@dataclass
class Row:
    function: Function
    self: int  # in the leaf frame
    total: int  # anywhere in the stack, once per stack however often it recurs


def function_rows(profile: Profile) -> List[Row]:
    """Every function in the profile's main value, most self first (then most total)."""
    index = profile.main_value
    rows: Dict[Function, Row] = {}
    functions = PerFrame(function_of)
    for (stack, _labels), values in profile.samples.items():
        value = values[index]
        seen = set()
        for depth, frame in enumerate(stack):
            function = functions(frame)
            row = rows.get(function)
            if row is None:
                row = rows[function] = Row(function, 0, 0)
            if depth == 0:
                row.self += value
            if function not in seen:
                seen.add(function)
                row.total += value
    return sorted(rows.values(), key=lambda r: (-r.self, -r.total, r.function.name))


@dataclass
class DiffRow:
    function: Function
    base: Row  # zero where the function is absent from that profile
    new: Row
    base_total: int  # of each whole profile: changes are compared as shares of them
    new_total: int

    def share(self, which: str, of: str) -> float:
        row, whole = (self.base, self.base_total) if which == "base" else (self.new, self.new_total)
        return getattr(row, of) / whole if whole else 0.0

    def change(self, of: str) -> float:
        """The change in share of the whole, as a fraction (0.05: five points more)."""
        return self.share("new", of) - self.share("base", of)


def diff_rows(base: Profile, new: Profile) -> List[DiffRow]:
    """Every function of either profile, the largest change in self share first."""
    old = {r.function: r for r in function_rows(base)}
    now = {r.function: r for r in function_rows(new)}
    base_total, new_total = base.total(), new.total()
    rows = [DiffRow(f, old.get(f, Row(f, 0, 0)), now.get(f, Row(f, 0, 0)), base_total, new_total)
            for f in dict.fromkeys([*now, *old])]
    return sorted(rows, key=lambda r: (-abs(r.change("self")), -abs(r.change("total")), r.function.name))


def narrow(profile: Profile, pids: Sequence[int] = (), focus: Optional[str] = None,
           sample_type: Optional[str] = None) -> Profile:
    """The samples of these processes (all when none) whose stacks have a function matching
    the focus regular expression (all when None), showing this sample type (else the
    profile's main one). UsageError for an unknown type or a bad expression."""
    main_value = profile.main_value
    if sample_type is not None:
        names = [t.type for t in profile.sample_types]
        if sample_type not in names:
            raise UsageError(f"no sample type {sample_type!r} in this profile: it has {', '.join(names)}")
        main_value = names.index(sample_type)
    try:
        pattern = re.compile(focus) if focus else None
    except re.error as e:
        raise UsageError(f"--focus {focus!r} is not a regular expression: {e}") from None

    def focused(stack: Stack) -> bool:
        return pattern is None or any(pattern.search(frame.name) for frame in stack)

    chosen = profile.empty_copy(main_value=main_value)
    for (stack, labels), values in profile.samples.items():
        if (not pids or labels.pid in pids) and focused(stack):
            chosen.samples[(stack, labels)] = values
    return chosen
