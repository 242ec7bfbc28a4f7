"""An interpreter's frames placed into the native stack of the same sample, so that a stack
reads kernel -> native code it called -> its frames -> the native code that started it."""

from __future__ import annotations

from typing import List, Tuple

from bpfprof.symbolizer.frames import Frame
from bpfprof.symbolizer.interpreters import InterpreterProcess

# Where every thread's native stack begins; a stack that does not end in one of these
# lost its way (frame-pointer unwinding through code built without them).
STACK_ROOTS = frozenset({"_start", "__libc_start_main", "__libc_start_call_main", "start_thread", "clone", "clone3"})


def merge(native: List[Frame], python: List[Tuple[Frame, bool]], interpreter: InterpreterProcess,
          complete: bool = False) -> List[Frame]:
    """One user stack, leaf first, from native frames and the interpreter's frames (leaf
    first, each with whether the eval loop was entered there: Python frames, say). `complete`: the native unwinder
    reached the thread's outermost frame (else a stack is taken as complete when it ends
    in one of STACK_ROOTS).

    In a complete stack each eval-loop frame is replaced by the Python frames it ran, and
    the interpreter's own frames between two such groups (its call machinery) are left
    out, so Python calls read as they do in Python; an extension's frames between them
    stay. Where native unwinding did not reach the eval loop, Python frames take the
    place of the interpreter and what it called sits on top of them; the rest of such a
    native stack is noise."""
    groups: List[List[Frame]] = []  # root first, each group root first
    for frame, entry in reversed(python):
        if entry or not groups:
            groups.append([])
        groups[-1].append(frame)
    python_root_first = [f for group in groups for f in group]
    root_first = native[::-1]
    complete = bool(native) and (complete or native[-1].name in STACK_ROOTS)
    evals = [i for i, f in enumerate(root_first) if f.name in interpreter.eval_functions] if complete else []
    if evals and len(evals) == len(groups):
        merged = root_first[: evals[0]]
        for n, (at, group) in enumerate(zip(evals, groups)):
            merged += group
            if n + 1 < len(evals):
                merged += [f for f in root_first[at + 1: evals[n + 1]]
                           if f.module is None or f.module.path != interpreter.module_path]
            else:
                merged += root_first[at + 1:]
    elif evals:
        merged = root_first[: evals[0]] + python_root_first + root_first[evals[-1] + 1:]
    else:
        called: List[Frame] = []  # leaf first, down to the first interpreter frame
        for f in native:
            if f.module is None:
                break  # unwinding went astray
            if f.module.path == interpreter.module_path:
                if f.name not in interpreter.eval_functions:
                    called.append(f)
                break
            called.append(f)
        merged = python_root_first + called[::-1]
    return merged[::-1]
