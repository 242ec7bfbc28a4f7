"""Imports point one way: the frame model at the bottom, the symbolizer above it, the
collector's stages above that, and no two folders import each other, however indirectly."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("bpf", "collector", "symbolizer")


def modules() -> Dict[str, Path]:
    """bpfprof.x.y -> its file, for every module of the package."""
    found = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(("bpfprof",) + parts)] = path
    return found


def imported(path: Path, known: Set[str]) -> Set[str]:
    """The bpfprof modules a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # a module imported by name
    return {name for name in names if name in known}


def folder_of(module: str, known: Dict[str, Path]) -> str:
    """The package whose folder holds the module's file."""
    return module if known[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def import_graph() -> Dict[str, Set[str]]:
    """folder -> the other folders its modules import."""
    known = modules()
    graph: Dict[str, Set[str]] = {}
    for module, path in known.items():
        source = folder_of(module, known)
        targets = {folder_of(target, known) for target in imported(path, set(known))}
        graph.setdefault(source, set()).update(targets - {source})
    return graph


def cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of folders, or [] when there is none."""
    done: Set[str] = set()

    def visit(folder: str, path: List[str]) -> List[str]:
        if folder in path:
            return path[path.index(folder):] + [folder]
        if folder in done:
            return []
        for target in sorted(graph.get(folder, ())):
            found = visit(target, path + [folder])
            if found:
                return found
        done.add(folder)
        return []

    for folder in sorted(graph):
        found = visit(folder, [])
        if found:
            return found
    return []


def test_no_folder_imports_one_that_imports_it():
    assert cycle(import_graph()) == []


def test_the_symbolizer_imports_nothing_of_the_collector():
    graph = import_graph()
    for folder, targets in graph.items():
        if folder.startswith("bpfprof.symbolizer"):
            assert not [t for t in targets if t.startswith("bpfprof.collector")], folder


def test_the_frame_model_imports_no_other_module():
    known = modules()
    assert imported(known["bpfprof.symbolizer.frames"], set(known)) == set()


def test_a_cycle_is_found():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) == []
