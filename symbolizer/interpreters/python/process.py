"""One CPython process: its interpreter attached, its threads discovered, its frames and
thread names read from its memory, and what the BPF walker needs of it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, Set, Tuple

from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.frames import Frame, FrameKind
from bpfprof.symbolizer.interpreters.python.code_objects import EVAL_FUNCTIONS, TRUNCATED, PythonSymbolizer
from bpfprof.symbolizer.interpreters.python.layouts import PythonLayout
from bpfprof.symbolizer.interpreters.python.thread_names import Searches, thread_names
from bpfprof.symbolizer.interpreters.python.threads import (FRAME_SHIM, ThreadState, learn_pthread_tid_offset,
                                                            thread_states, walk_frames, walker_fields)
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory


_UNUSABLE_CODE = Frame(FrameKind.PYTHON, "[unusable Python code object]")


class PythonWalker(Protocol):
    """The BPF side of CPython stacks, as the probe offers it."""

    @property
    def follows_offcpu_python(self) -> bool:
        """Whether threads leaving the CPU are kept with their Python stacks."""

    def set_python_process(self, pid: int, fields: Dict[str, int]) -> None:
        """Walk the process's threads from now on (fields of struct python_process)."""

    def offcpu_start_ns(self, tid: int) -> Optional[int]:
        """When the thread left the CPU, if it is away without a Python stack; else None."""

    def set_late_python_stack(self, tid: int, start_ns: int, frames: Sequence[Tuple[int, int, int, int]]) -> None:
        """Give the thread away since start_ns the stack walked for it meanwhile."""


class RawFrame(Protocol):
    """A frame the BPF walker recorded (shim frames already left out)."""

    code: int
    instr: int
    check: int
    entry: bool


@dataclass
class PythonProcess:
    """A CPython process being walked: an InterpreterProcess. Its thread lists are walked
    here alone (scan), for the tids the walker needs, the names threading gave, and the
    stacks of threads that left the CPU before the walker could find them."""

    pid: int
    layout: PythonLayout
    runtime: int  # address of _PyRuntime (3.6: of interp_head) in the process
    module_path: str  # the binary the interpreter lives in
    memory: ProcessMemory
    symbols: PythonSymbolizer  # the code objects read so far, of every process
    walker: PythonWalker
    failures: Failures  # of code objects that cannot be named
    threads: Set[int] = field(default_factory=set)  # tids with a thread state at the last scan
    names: Dict[int, str] = field(default_factory=dict)  # tid -> threading.Thread name, till the drain after it ends
    ended: Set[int] = field(default_factory=set)  # tids that left the thread list since take_ended()
    pthread_tid_offset: Optional[int] = None  # <= 3.10: where the C library keeps a thread's tid
    scanned: bool = False
    name_searches: Searches = field(default_factory=Searches)  # what reading the names found on the way
    eval_functions = EVAL_FUNCTIONS

    def start_walker(self) -> None:
        """Once scanned: the walker walks the process's threads from now on, and those away
        now get the stack they left with."""
        self.walker.set_python_process(self.pid, walker_fields(self.layout, self.runtime, self.pthread_tid_offset))
        if self.walker.follows_offcpu_python:  # those that blocked before the walker was told: walked again
            self._walk_threads_away(self._thread_states())

    def frames(self, raw: Sequence[RawFrame], truncated: bool) -> List[Tuple[Frame, bool]]:
        named = [(self._frame(f), f.entry) for f in raw]
        return named + [(TRUNCATED, True)] if truncated else named

    def _frame(self, raw: RawFrame) -> Frame:
        with self.failures.contain("code object", f"in process {self.pid}"):
            return self.symbols.get_frame(self.memory, self.layout, raw.code, raw.instr, raw.check)
        return _UNUSABLE_CODE

    def thread_name(self, tid: int) -> Optional[str]:
        return self.names.get(tid)

    def learn(self, frames: Sequence[RawFrame]) -> None:
        """Read the code objects of a stack the walker took, while they exist."""
        for frame in frames:
            with self.failures.contain("code object", f"in process {self.pid}"):
                self.symbols.learn(self.memory, self.layout, frame.code, frame.check)

    def scan(self) -> None:
        """Walk the thread lists: which threads have a thread state, and the names
        threading gave those without one yet."""
        threads = _tids(self._thread_states())
        if set(threads) - self.names.keys():  # names are read for unnamed threads only
            named = {ident for tid, ident in threads.items() if tid in self.names}
            try:
                by_ident = thread_names(self.memory, self.layout, self.runtime, self.name_searches, named)
            except (UnreadableMemory, ValueError):
                by_ident = {}
            # A thread may end and another take its pthread_t while the names are read:
            # a name counts for the threads that are the same before and after.
            again = _tids(self._thread_states())
            self.names.update({tid: by_ident[ident] for tid, ident in threads.items()
                               if again.get(tid) == ident and ident in by_ident})
            threads = again
        # A walk of a thread list that changes under it can miss threads that live on:
        # one has ended when the kernel no longer has it (its name goes after the drain).
        missing = self.threads - threads.keys()
        alive = {tid for tid in missing if os.path.exists(f"/proc/{self.pid}/task/{tid}")}
        self.ended |= missing - alive
        self.threads = set(threads) | alive
        self.scanned = True

    def take_ended(self) -> Set[int]:
        """Threads seen to end since the last call."""
        ended, self.ended = self.ended, set()
        return ended

    def drop_names(self, tids: Set[int]) -> None:
        self.names = {tid: name for tid, name in self.names.items() if tid not in tids}

    def close(self) -> None:
        self.memory.close()

    def _thread_states(self) -> List[ThreadState]:
        """Every thread state of the process, newest first, with its tid (<= 3.10: from the
        pthread struct, once the offset of the tid in it is learnt)."""
        states = thread_states(self.memory, self.layout, self.runtime)
        if self.layout.tstate_native_thread_id >= 0:
            return states
        # <= 3.10: a thread state made for a new thread holds its creator's pthread_t
        # until the thread runs, so pthread_t values are taken once each.
        idents = sorted({ident for _, ident, _ in states if ident})
        learnt_late = False  # after the walker was told of the process: it waits for this
        try:
            if self.pthread_tid_offset is None:
                self.pthread_tid_offset = learn_pthread_tid_offset(self.memory, self.pid, idents)
                if self.pthread_tid_offset is None:
                    return states
                learnt_late = self.scanned
                if learnt_late:
                    self.walker.set_python_process(self.pid, walker_fields(self.layout, self.runtime,
                                                                           self.pthread_tid_offset))
            by_ident = {ident: self.memory.u32(ident + self.pthread_tid_offset) for ident in idents}
        except (OSError, UnreadableMemory):
            return states
        states = [(tstate, ident, by_ident.get(ident, 0)) for tstate, ident, _ in states]
        if learnt_late and self.walker.follows_offcpu_python:  # threads that blocked while it could not look
            self._walk_threads_away(states)
        return states

    def _walk_threads_away(self, states: List[ThreadState]) -> None:
        """Threads that left the CPU before the walker could find them (a lock or a read at
        a thread's first line, before the process was read or before <= 3.10's pthread tid
        offset was learnt) get the Python stack they left with: it cannot change while they
        are away, so a walk bracketed by the same time away is theirs."""
        for tid, tstate in _own_states(states).items():
            since = self.walker.offcpu_start_ns(tid)
            if since is None:
                continue
            try:
                frames = walk_frames(self.memory, self.layout, tstate)
                for code, _, check, flags in frames:
                    if not flags & FRAME_SHIM:
                        self.symbols.learn(self.memory, self.layout, code, check)
            except UnreadableMemory:
                continue
            if frames and self.walker.offcpu_start_ns(tid) == since:
                self.walker.set_late_python_stack(tid, since, frames)


def _tids(states: List[ThreadState]) -> Dict[int, int]:
    """tid -> pthread_t of each thread with a tid. Newest first: a thread state made for a
    new thread carries its creator's ids until the thread runs, so the oldest with a tid is
    that thread's own."""
    return {tid: ident for _, ident, tid in states if tid}


def _own_states(states: List[ThreadState]) -> Dict[int, int]:
    """tid -> its own thread state, as _tids picks it."""
    return {tid: tstate for tstate, _, tid in states if tid}
