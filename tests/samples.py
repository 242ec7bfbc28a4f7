"""Reading written profiles back in tests: the samples of a pprof as plain Python."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Union

from bpfprof.collector.output.pprof import read_pprof


@dataclass(frozen=True)
class SourceFrame:
    function: str
    filename: str
    start_line: int  # of the function
    line: int  # being run


@dataclass
class Sample:
    functions: List[str]  # leaf first
    labels: Dict[str, Union[str, int]]
    count: int
    frames: List[SourceFrame]  # leaf first, the same frames with their source
    values: List[int]  # all of the sample's values (count is the first)

    def has_chain(self, *callers_to_callee: str) -> bool:
        """True when these functions appear root to leaf, adjacent and in this order."""
        root_first = self.functions[::-1]
        n = len(callers_to_callee)
        return any(tuple(root_first[i:i + n]) == callers_to_callee for i in range(len(root_first) - n + 1))


def read_samples(path) -> List[Sample]:
    profile = read_pprof(str(path))
    strings = profile.string_table
    functions = {f.id: f for f in profile.function}
    locations = {
        loc.id: [
            SourceFrame(strings[functions[line.function_id].name], strings[functions[line.function_id].filename],
                        functions[line.function_id].start_line, line.line)
            for line in loc.line
        ]
        for loc in profile.location
    }
    samples = []
    for s in profile.sample:
        frames = [frame for location_id in s.location_id for frame in locations[location_id]]
        labels = {strings[l.key]: (strings[l.str] if l.str else l.num) for l in s.label}
        samples.append(Sample([f.function for f in frames], labels, s.value[0], frames, list(s.value)))
    return samples


def share(samples: List[Sample], predicate) -> float:
    total = sum(s.count for s in samples)
    return sum(s.count for s in samples if predicate(s)) / total if total else 0.0
