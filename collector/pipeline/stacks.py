"""Raw samples from the sampler to symbolized stacks with their labels."""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple

from bpfprof.collector.processes.table import ProcessTable
from bpfprof.collector.profile import Labels
from bpfprof.symbolizer.frames import Frame, FrameKind, Module, Stack
from bpfprof.collector.processes.python import PythonProcesses
from bpfprof.collector.probe.sampler import RawSample
from bpfprof.symbolizer.kernel import KernelSymbols
from bpfprof.symbolizer.native.symbolizer import NativeSymbolizer

# The eval loop: each call of it runs one group of Python frames.
EVAL_FUNCTIONS = frozenset({"_PyEval_EvalFrameDefault"})
TRUNCATED = Frame(FrameKind.PYTHON, "[more Python frames]")
# Where every thread's native stack begins; a stack that does not end in one of these
# lost its way (frame-pointer unwinding through code built without them).
STACK_ROOTS = frozenset({"_start", "__libc_start_main", "__libc_start_call_main", "start_thread", "clone", "clone3"})


def _lookup_addresses(stack: Tuple[int, ...]) -> Iterable[int]:
    """Callers' entries are return addresses, which may already belong to the next
    function (after a call to a noreturn function); look up the call instead."""
    for i, address in enumerate(stack):
        yield address if i == 0 else address - 1


def merge_python(native: List[Frame], python: List[Tuple[Frame, bool]], interpreter: str,
                 complete: bool = False) -> List[Frame]:
    """One user stack, leaf first, from native frames and Python frames (leaf first, each
    with whether the eval loop was entered there). `complete`: the native unwinder
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
    evals = [i for i, f in enumerate(root_first) if f.name in EVAL_FUNCTIONS] if complete else []
    if evals and len(evals) == len(groups):
        merged = root_first[: evals[0]]
        for n, (at, group) in enumerate(zip(evals, groups)):
            merged += group
            if n + 1 < len(evals):
                merged += [f for f in root_first[at + 1: evals[n + 1]]
                           if f.module is None or f.module.path != interpreter]
            else:
                merged += root_first[at + 1:]
    elif evals:
        merged = root_first[: evals[0]] + python_root_first + root_first[evals[-1] + 1:]
    else:
        called: List[Frame] = []  # leaf first, down to the first interpreter frame
        for f in native:
            if f.module is None:
                break  # unwinding went astray
            if f.module.path == interpreter:
                if f.name not in EVAL_FUNCTIONS:
                    called.append(f)
                break
            called.append(f)
        merged = python_root_first + called[::-1]
    return merged[::-1]


class StackResolver:
    def __init__(self, processes: ProcessTable, native: NativeSymbolizer, kernel: KernelSymbols,
                 python: Optional[PythonProcesses] = None, between_frames: Callable[[], None] = lambda: None):
        self._between_frames = between_frames  # called before each user frame is named
        self._processes = processes
        self._native = native
        self._kernel = kernel
        self._python = python

    def forget(self, pid: int) -> None:
        """The process is gone and its last samples are in."""
        if self._python is not None:
            self._python.forget(pid)

    def resolve(self, sample: RawSample) -> Tuple[Stack, Labels]:
        process = self._processes.get(sample.pid, sample.thread_name)
        interpreter = self._python.interpreters.get(sample.pid) if self._python else None
        frames: List[Frame] = [self._kernel.get_frame(a) for a in _lookup_addresses(sample.kernel_stack)]
        if sample.user_stack and not process.readable:
            name = f"[{process.comm or sample.pid}: process exited before it could be read]"
            frames.append(Frame(FrameKind.NATIVE, name))
        elif sample.user_stack or sample.python_stack:
            user = [self._user_frame(sample.pid, a) for a in _lookup_addresses(sample.user_stack)]
            if sample.python_stack and interpreter is not None:
                python = [
                    (self._python.symbols.get_frame(interpreter.memory, interpreter.layout, f.code, f.instr, f.check),
                     f.entry)
                    for f in sample.python_stack
                ]
                if sample.python_truncated:
                    python.append((TRUNCATED, True))
                user = merge_python(user, python, interpreter.module_path, sample.user_stack_complete)
            frames.extend(user)
        thread = interpreter.names.get(sample.tid, sample.thread_name) if interpreter else sample.thread_name
        extra = process.container.labels if process.container else ()
        labels = Labels(sample.pid, sample.tid, process.comm or sample.thread_name, thread, extra)
        return tuple(frames), labels

    def _user_frame(self, pid: int, address: int) -> Frame:
        self._between_frames()
        mapping = self._processes.get_mapping(pid, address)
        if mapping is None:
            return Frame(FrameKind.NATIVE, f"[unmapped {address:#x}]")
        offset = address - mapping.start + mapping.offset
        if mapping.obj is None:
            return Frame(FrameKind.NATIVE, f"[{mapping.name}+{offset:#x}]", Module(mapping.name), offset)
        return self._native.get_frame(mapping.obj, offset)
