"""speedscope's file format (https://www.speedscope.app/file-format-schema.json): one
sampled profile per thread, frames shared, stacks root first with their weights."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Dict, List, Tuple

from bpfprof.symbolizer.atomic_file import write_atomically
from bpfprof.collector.output.functions import Function, PerFrame, function_of
from bpfprof.collector.profile import Profile

SCHEMA = "https://www.speedscope.app/file-format-schema.json"
UNITS = {"nanoseconds", "microseconds", "milliseconds", "seconds", "bytes"}  # else "none"


def to_speedscope(profile: Profile, name: str = "bpfprof") -> dict:
    frames: Dict[Function, int] = {}
    functions = PerFrame(function_of)
    threads: Dict[Tuple[int, int, str, str], Dict[Tuple[int, ...], int]] = defaultdict(lambda: defaultdict(int))
    for (stack, labels), values in profile.samples.items():
        indices = tuple(frames.setdefault(functions(frame), len(frames)) for frame in reversed(stack))
        threads[(labels.pid, labels.tid, labels.comm, labels.thread)][indices] += values[profile.main_value]
    value_type = profile.main_type
    unit = value_type.unit if value_type.unit in UNITS else "none"
    profiles: List[dict] = []
    for (pid, tid, comm, thread), stacks in sorted(threads.items(), key=lambda t: -sum(t[1].values())):
        weights = list(stacks.values())
        profiles.append({
            "type": "sampled",
            "name": f"{comm or '?'} ({pid}) {thread or '?'} ({tid})" if pid or tid else (comm or "all"),
            "unit": unit,
            "startValue": 0,
            "endValue": sum(weights),
            "samples": [list(s) for s in stacks],
            "weights": weights,
        })
    return {
        "$schema": SCHEMA,
        "name": f"{name}: {value_type.type}",
        "activeProfileIndex": 0,
        "exporter": "bpfprof",
        "shared": {"frames": [_frame(f) for f in frames]},
        "profiles": profiles,
    }


def _frame(function: Function) -> dict:
    frame = {"name": function.display_name}
    file, _, line = function.where.rpartition(":")
    if file and line.isdigit():
        frame.update(file=file, line=int(line))
    elif function.where:
        frame["file"] = function.where
    return frame


def write_speedscope(profile: Profile, path: str) -> None:
    write_atomically(path, json.dumps(to_speedscope(profile), separators=(",", ":")).encode())
