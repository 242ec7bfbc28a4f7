"""Folded stacks (Brendan Gregg's flame graph input): `comm;root;...;leaf COUNT` per line."""

from __future__ import annotations

from collections import Counter

from bpfprof.symbolizer.atomic_file import write_atomically
from bpfprof.collector.profile import Profile
from bpfprof.symbolizer.frames import Frame, FrameKind
from bpfprof.symbolizer.text import printable


def folded_name(frame: Frame) -> str:
    if frame.kind == FrameKind.KERNEL:
        name = frame.name + "_[k]"
    elif frame.kind == FrameKind.PYTHON:
        name = f"{frame.name} ({frame.file.rsplit('/', 1)[-1]})" if frame.file else frame.name
    else:
        name = frame.name
    return _field(name)


def _field(name: str) -> str:
    """A name as one field of a line: ";" separates frames, and a line holds one stack."""
    return printable(name).replace(";", ":")


def write_folded(profile: Profile, path: str) -> None:
    """One line per distinct stack with its main value (CPU: samples, block: nanoseconds),
    process name as the root frame."""
    lines: Counter = Counter()
    for (stack, labels), values in profile.samples.items():
        names = [_field(labels.comm) or "?"] + [folded_name(frame) for frame in reversed(stack)]
        lines[";".join(names)] += values[profile.main_value]
    text = "".join(f"{line} {count}\n" for line, count in sorted(lines.items()))
    write_atomically(path, text.encode())
