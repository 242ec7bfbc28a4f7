"""Raw samples from the sampler to symbolized stacks with their labels."""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from bpfprof.collector.probe.sampler import RawSample
from bpfprof.collector.processes.interpreters import InterpreterProcesses
from bpfprof.collector.processes.table import ProcessTable
from bpfprof.collector.profile import Labels
from bpfprof.symbolizer.frames import Frame, FrameKind, Module, Stack
from bpfprof.symbolizer.interpreters import InterpreterProcess
from bpfprof.symbolizer.interpreters.merge import merge
from bpfprof.symbolizer.kernel import KernelSymbols
from bpfprof.symbolizer.native.symbolizer import NativeSymbolizer
from bpfprof.symbolizer.text import printable


def _lookup_addresses(stack: Tuple[int, ...]) -> Iterable[int]:
    """Callers' entries are return addresses, which may already belong to the next
    function (after a call to a noreturn function); look up the call instead."""
    for i, address in enumerate(stack):
        yield address if i == 0 else address - 1


class StackResolver:
    def __init__(self, processes: ProcessTable, native: NativeSymbolizer, kernel: KernelSymbols,
                 interpreters: Sequence[InterpreterProcesses] = (), between_frames: Callable[[], None] = lambda: None):
        self._between_frames = between_frames  # called before each user frame is named
        self._processes = processes
        self._native = native
        self._kernel = kernel
        self._interpreters = interpreters

    def forget(self, pid: int) -> None:
        """The process is gone and its last samples are in."""
        for interpreters in self._interpreters:
            interpreters.forget(pid)

    def _interpreter(self, pid: int) -> Optional[InterpreterProcess]:
        for interpreters in self._interpreters:
            found = interpreters.get(pid)
            if found is not None:
                return found
        return None

    def resolve(self, sample: RawSample) -> Tuple[Stack, Labels]:
        process = self._processes.get(sample.pid, sample.thread_name)
        interpreter = self._interpreter(sample.pid)
        frames: List[Frame] = [self._kernel.get_frame(a) for a in _lookup_addresses(sample.kernel_stack)]
        if sample.user_stack and not process.readable:
            name = f"[{process.comm or sample.pid}: process exited before it could be read]"
            frames.append(Frame(FrameKind.NATIVE, name))
        elif sample.user_stack or sample.python_stack:
            user = [self._user_frame(sample.pid, a) for a in _lookup_addresses(sample.user_stack)]
            if sample.python_stack and interpreter is not None:
                interpreted = interpreter.frames(sample.python_stack, sample.python_truncated)
                user = merge(user, interpreted, interpreter, sample.user_stack_complete)
            frames.extend(user)
        return tuple(frames), self.labels(sample.pid, sample.tid, sample.thread_name)

    def labels(self, pid: int, tid: int, thread_name: str, extra: Tuple[Tuple[str, str], ...] = ()) -> Labels:
        """The labels of a thread (`thread_name` as the kernel has it), `extra` added."""
        process = self._processes.get(pid, thread_name)
        interpreter = self._interpreter(pid)
        thread = (interpreter.thread_name(tid) if interpreter else None) or thread_name
        container = process.container.labels if process.container else ()
        # Names the process gave itself and its threads: escaped, as every label a store keeps.
        return Labels(pid, tid, printable(process.comm or thread_name), printable(thread), container + extra)

    def _user_frame(self, pid: int, address: int) -> Frame:
        self._between_frames()
        mapping = self._processes.get_mapping(pid, address)
        if mapping is None:
            return Frame(FrameKind.NATIVE, f"[unmapped {address:#x}]")
        offset = address - mapping.start + mapping.offset
        if mapping.obj is None:
            return Frame(FrameKind.NATIVE, f"[{mapping.name}+{offset:#x}]", Module(mapping.name), offset)
        return self._native.get_frame(mapping.obj, offset)
