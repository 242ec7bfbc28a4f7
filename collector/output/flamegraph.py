"""An interactive flame graph as one self-contained HTML file: the page beside this module
(flamegraph.html, its script and styles inline) with the profile's call tree and function
table embedded as JSON, so it opens from disk with no network and nothing else to carry."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from bpfprof.symbolizer.atomic_file import write_atomically
from bpfprof.collector.output.functions import Function, PerFrame, diff_rows, function_of, function_rows
from bpfprof.collector.profile import Profile
from bpfprof.symbolizer.frames import FrameKind
from bpfprof.collector.output.units import format_value

ROOT = -1  # the function index of the tree's root, "all"
KINDS = list(FrameKind)  # the page receives a frame's kind as its index here
_PLACEHOLDER = "__PROFILE_DATA__"  # where the template takes the JSON, once


@dataclass
class Node:
    """One call path from the root: its last function (an index into the page's function
    table), the value of every stack through it, and the part that ends in it."""

    function: int
    total: int = 0
    self: int = 0
    children: Dict[int, Node] = field(default_factory=dict)


def call_tree(profile: Profile, index: Dict[Function, int]) -> Node:
    """The profile's stacks merged root first by function, so that frames of one function
    at different lines (or under other labels) share a node, as the table counts them."""
    root = Node(ROOT)
    function_index = PerFrame(lambda frame: index[function_of(frame)])
    for (stack, _labels), values in profile.samples.items():
        value = values[profile.main_value]
        node = root
        node.total += value
        for frame in reversed(stack):
            f = function_index(frame)
            child = node.children.get(f)
            if child is None:
                child = node.children[f] = Node(f)
            child.total += value
            node = child
        node.self += value
    return root


def preorder(root: Node, base: Optional[Node] = None) -> Iterator[Tuple[Node, Optional[Node]]]:
    """Parents before children, the heaviest child first (the page draws siblings left to
    right in this order), each node with the node at the same path in `base`, if any.
    Iterative: recursive stacks can be deeper than Python's recursion limit."""
    pending = [(root, base)]
    while pending:
        node, other = pending.pop()
        yield node, other
        # Pushed lightest first, so popped heaviest first; ties by function for a stable page.
        for child in sorted(node.children.values(), key=lambda c: (c.total, -c.function)):
            pending.append((child, other.children.get(child.function) if other else None))


def write_flamegraph(profile: Profile, path: str) -> None:
    """The flame graph and function table of the profile's main value."""
    rows = function_rows(profile)
    tree = call_tree(profile, {row.function: i for i, row in enumerate(rows)})
    data = {
        "title": summary(profile),
        "unit": profile.main_type.unit,
        "kinds": [kind.value for kind in KINDS],
        "functions": [_function(row.function) + [row.self, row.total] for row in rows],
        "tree": _flatten(node for node, _ in preorder(tree)),
        "base": None,
    }
    write_atomically(path, _page(data))


def write_diff_flamegraph(base: Profile, new: Profile, path: str) -> None:
    """The new profile's flame graph coloured by how each frame's share of the whole changed
    since base; the table has every function of either profile with both shares."""
    rows = diff_rows(base, new)
    index = {row.function: i for i, row in enumerate(rows)}
    nodes = list(preorder(call_tree(new, index), call_tree(base, index)))
    data = {
        "title": f"{summary(new)}; compared with base {summary(base)}",
        "unit": new.main_type.unit,
        "kinds": [kind.value for kind in KINDS],
        "functions": [_function(row.function) + [row.new.self, row.new.total] for row in rows],
        "tree": _flatten(node for node, _ in nodes),
        "base": {
            "total": base.total(),
            "functions": [[row.base.self, row.base.total] for row in rows],
            "tree": [other.total if other else 0 for _, other in nodes],
        },
    }
    write_atomically(path, _page(data))


def summary(profile: Profile) -> str:
    """The page's title line: value type and total, samples, stacks, duration."""
    main = profile.main_type
    parts = [f"{main.type}: {format_value(profile.total(), main.unit)}"]
    first = profile.sample_types[0]
    if profile.main_value != 0 and first.unit == "count":
        parts.append(f"{profile.num_samples()} {first.type}")  # e.g. contentions beside delay
    stacks = len({stack for stack, _labels in profile.samples})
    parts.append(f"{stacks} stack" if stacks == 1 else f"{stacks} stacks")
    if profile.duration_ns:
        parts.append(f"over {format_value(profile.duration_ns, 'nanoseconds')}")
    return ", ".join(parts)


def _function(function: Function) -> list:
    return [function.name, function.where, KINDS.index(function.kind)]


def _flatten(nodes: Iterable[Node]) -> List[int]:
    """Four numbers a node, in preorder: function, total, self, number of children. Flat
    rather than nested, which keeps the JSON small and its depth independent of the stacks'."""
    return [n for node in nodes for n in (node.function, node.total, node.self, len(node.children))]


def _page(data: dict) -> bytes:
    text = json.dumps(data, separators=(",", ":"))
    # A function named "</script>" (or "<!--") must not end the element holding the data.
    text = text.replace("<", "\\u003c")
    before, after = _template()
    return (before + text + after).encode()


def _template() -> Tuple[str, str]:
    page = resources.files("bpfprof.collector.output").joinpath("flamegraph.html").read_text(encoding="utf-8")
    before, after = page.split(_PLACEHOLDER)
    return before, after
