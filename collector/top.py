"""The functions with the most self time in a profile, as a short plain-text table."""

from __future__ import annotations

from collections import Counter
from typing import List, Tuple

from bpfprof.collector.profile import Frame, FrameKind, Profile


def _function(frame: Frame) -> str:
    suffix = " [k]" if frame.kind is FrameKind.KERNEL else ""
    return frame.name + suffix


def top_functions(profile: Profile, limit: int) -> List[Tuple[str, int, int]]:
    """(function, self, total), most self first, in the profile's main value (CPU:
    samples, block: nanoseconds)."""
    self_counts: Counter = Counter()
    total_counts: Counter = Counter()
    for (stack, _labels), values in profile.samples.items():
        if not stack:
            continue
        value = values[profile.main_value]
        self_counts[_function(stack[0])] += value
        for name in {_function(f) for f in stack}:
            total_counts[name] += value
    return [(name, n, total_counts[name]) for name, n in self_counts.most_common(limit)]


def format_top(profile: Profile, limit: int) -> str:
    total = profile.total() or 1
    lines = [f"{'self%':>6} {'self':>7} {'total%':>7}  function"]
    for name, self_n, total_n in top_functions(profile, limit):
        lines.append(f"{100 * self_n / total:6.1f} {self_n:7d} {100 * total_n / total:7.1f}  {name}")
    return "\n".join(lines)
