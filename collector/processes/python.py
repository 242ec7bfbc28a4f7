"""CPython processes: recognising the interpreter in a process, telling the BPF walker
where to find its thread states, and naming its threads and frames."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from bpfprof.collector.probe.sampler import RawPythonFrame, Sampler
from bpfprof.collector.processes.table import Mapping, ProcFiles, Process, parse_maps
from bpfprof.symbolizer.frames import Frame
from bpfprof.symbolizer.interpreters.python.code_objects import EVAL_FUNCTIONS, TRUNCATED, PythonSymbolizer
from bpfprof.symbolizer.interpreters.python.layouts import PythonLayout
from bpfprof.symbolizer.interpreters.python.thread_names import Searches, thread_names
from bpfprof.symbolizer.interpreters.python.threads import (FRAME_SHIM, INTERPRETER_NAME, ThreadState,
                                                            layout_of, learn_pthread_tid_offset, thread_states,
                                                            walk_frames, walker_fields)
from bpfprof.symbolizer.native.symbolizer import NativeSymbolizer
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory

# The interpreter is the executable (static builds) or libpython; either exports these.
PYTHON_DATA_SYMBOLS = ("_PyRuntime", "Py_Version")
_NAME_SCAN_S = 0.2  # how long a process with new threads is scanned again, while some have no name
_LOOK_FOR_S = 2.0  # how long a Python executable is looked at again, waiting for its libpython


@dataclass
class Interpreter:
    """One CPython process as the walker and the symbolizer see it: an InterpreterProcess."""

    pid: int
    layout: PythonLayout
    runtime: int  # address of _PyRuntime in the process
    module_path: str  # the binary the interpreter lives in
    memory: ProcessMemory
    symbols: PythonSymbolizer  # the code objects read so far, of every process
    threads: Set[int] = field(default_factory=set)  # tids with a thread state at the last scan
    names: Dict[int, str] = field(default_factory=dict)  # tid -> threading.Thread name, till the drain after it ends
    ended: Set[int] = field(default_factory=set)  # tids that left the thread list since ended_threads()
    pthread_tid_offset: Optional[int] = None  # <= 3.10: where the C library keeps a thread's tid
    scanned: bool = False
    name_searches: Searches = field(default_factory=Searches)  # what reading the names found on the way
    eval_functions = EVAL_FUNCTIONS

    def frames(self, raw: Sequence[RawPythonFrame], truncated: bool) -> List[Tuple[Frame, bool]]:
        named = [(self.symbols.get_frame(self.memory, self.layout, f.code, f.instr, f.check), f.entry) for f in raw]
        return named + [(TRUNCATED, True)] if truncated else named

    def thread_name(self, tid: int) -> Optional[str]:
        return self.names.get(tid)


def _candidates(process: Process) -> List[Mapping]:
    """The first mapping of each binary named like an interpreter: the executable of a
    static build, or libpython (the executable of a shared build has no _PyRuntime)."""
    found: Dict[str, Mapping] = {}
    for m in process.mappings:
        if m.obj is not None and INTERPRETER_NAME.match(os.path.basename(m.obj.path)):
            found.setdefault(m.obj.path, m)
    return list(found.values())


def _still_mapped(pid: int, mapping: Mapping) -> bool:
    """Whether the process still maps the interpreter where it was seen."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(line.startswith(f"{mapping.start:08x}-") for line in f)
    except OSError:
        return False


class PythonProcesses:
    """Finds CPython in processes, tells the walker where to look, and names threads and
    frames. What must be read while a thread or process still runs is read on the event
    thread (on_python_thread, scan_new_threads, on_python_stack); the rest on the
    recorder's."""

    def __init__(self, sampler: Sampler, native: NativeSymbolizer,
                 warn: Callable[[str], None] = lambda message: None) -> None:
        self._sampler = sampler
        self._native = native
        self._warn = warn
        self.interpreters: Dict[int, Interpreter] = {}
        self.symbols = PythonSymbolizer()
        self._warned: Set[str] = set()
        self._looks: Dict[int, float] = {}  # pid -> when it was first looked at waiting for libpython
        self._unreadable: Set[int] = set()  # pids running a CPython that cannot be read
        self._new_threads: Dict[int, float] = {}  # pid -> scanned until (monotonic); event thread only
        self._scan_lock = threading.Lock()  # scans and name pruning, on either thread
        self._walk_lock = threading.Lock()  # starting and ending walks, on either thread

    def on_first_read(self, pid: int, files: ProcFiles) -> None:
        """On the event thread, as a process's first sample arrives with its /proc files:
        start walking its CPython now if the interpreter exports _PyRuntime, rather than
        when the recorder's thread takes the snapshot. Naming a binary's first frames in
        a drain can keep that thread from it for a few hundred milliseconds: a short
        process's whole life. Anything else is left to on_snapshot."""
        if "python" in files.maps:  # as every interpreter binary is named
            self._start_walking(Process(pid, files.comm, parse_maps(pid, files.maps)), exported_only=True)

    def on_snapshot(self, process: Process) -> None:
        """A process was (re)read: start walking it if it runs a CPython we know."""
        self._start_walking(process, exported_only=False)

    def _start_walking(self, process: Process, exported_only: bool) -> None:
        with self._walk_lock:
            self._start_walking_locked(process, exported_only)

    def _start_walking_locked(self, process: Process, exported_only: bool) -> None:
        if process.pid in self.interpreters or process.pid in self._unreadable or not process.readable:
            return
        candidates = _candidates(process)
        for mapping in candidates:
            symbols = self._native.get_exported_data(mapping.obj)
            if (symbols is None or "_PyRuntime" not in symbols.data) and not exported_only:
                symbols = self._native.get_symbols(mapping.obj)  # a build may not export it
            if symbols is not None and "_PyRuntime" in symbols.data:
                break
        else:
            if exported_only:
                return
            # A libpython from before 3.7 has no _PyRuntime. An executable without it may
            # just not have mapped its libpython yet: read it again at its next mmap or sample.
            old = [m for m in candidates if os.path.basename(m.obj.path).startswith("lib")]
            if old:
                self._cannot_read(old[0].obj.path, "no _PyRuntime symbol")
            elif candidates and time.monotonic() - self._looks.setdefault(process.pid, time.monotonic()) < _LOOK_FOR_S:
                self._sampler.see_again(process.pid)
            return
        text_vaddr = symbols.vaddr(mapping.offset)
        if text_vaddr is None:
            return
        bias = mapping.start - text_vaddr
        version = symbols.data.get("Py_Version")
        try:
            memory = ProcessMemory(process.pid)
        except UnreadableMemory:
            return
        try:
            runtime = bias + symbols.data["_PyRuntime"]
            layout = layout_of(memory, runtime, bias + version if version else None, mapping.obj.path)
            reason = "no known layout"
        except (UnreadableMemory, ValueError) as e:
            layout, reason = None, str(e)
        if layout is None and not _still_mapped(process.pid, mapping):
            memory.close()  # it exited or exec'd while being read: nothing to say of its interpreter
            return
        if layout is None:
            memory.close()
            self._unreadable.add(process.pid)  # not looked at again until it execs
            self._cannot_read(mapping.obj.path, reason)
            return
        interpreter = Interpreter(process.pid, layout, runtime, mapping.obj.path, memory, self.symbols)
        self.scan_threads(interpreter)
        self.interpreters[process.pid] = interpreter
        self._sampler.set_python_process(process.pid, self._walker_fields(interpreter))
        if self._sampler.follows_offcpu_python:
            self._walk_threads_away(interpreter, self._thread_states(interpreter))

    def _walk_threads_away(self, interpreter: Interpreter, states: List[ThreadState]) -> None:
        """Threads that left the CPU before the walker could find them (a lock or a read at
        a thread's first line, before the process was read or before <= 3.10's pthread tid
        offset was learnt) get the Python stack they left with: it cannot change while they
        are away, so a walk bracketed by the same time away is theirs. `states` as
        _thread_states gives them."""
        own = {tid: tstate for tstate, _, tid in states if tid}  # newest first: the oldest with a tid is its own
        for tid, tstate in own.items():
            since = self._sampler.offcpu_start_ns(tid)
            if since is None:
                continue
            try:
                frames = walk_frames(interpreter.memory, interpreter.layout, tstate)
                for code, _, check, flags in frames:
                    if not flags & FRAME_SHIM:
                        self.symbols.learn(interpreter.memory, interpreter.layout, code, check)
            except UnreadableMemory:
                continue
            if frames and self._sampler.offcpu_start_ns(tid) == since:
                self._sampler.set_late_python_stack(tid, since, frames)

    def _cannot_read(self, path: str, reason: str) -> None:
        """One warning per interpreter binary, naming its version."""
        if path not in self._warned:
            self._warned.add(path)
            major, minor = INTERPRETER_NAME.match(os.path.basename(path)).groups()
            self._warn(f"CPython {major}.{minor} ({path}) cannot be read ({reason}); "
                       "its processes get native frames only")

    @staticmethod
    def _walker_fields(interpreter: Interpreter) -> Dict[str, int]:
        return walker_fields(interpreter.layout, interpreter.runtime, interpreter.pthread_tid_offset)

    def scan_threads(self, interpreter: Interpreter) -> None:
        """Re-read the thread lists of every interpreter in the process: which threads
        have a thread state, and the names threading gave them. (The walker finds thread
        states itself; for <= 3.10 it needs the pthread tid offset learnt here.)"""
        with self._scan_lock:
            self._scan_threads(interpreter)

    def _scan_threads(self, interpreter: Interpreter) -> None:
        threads = self._thread_ids(interpreter)  # tid -> pthread_t
        if set(threads) - interpreter.names.keys():  # names are read for unnamed threads only
            named = {ident for tid, ident in threads.items() if tid in interpreter.names}
            try:
                by_ident = thread_names(interpreter.memory, interpreter.layout, interpreter.runtime,
                                        interpreter.name_searches, named)
            except (UnreadableMemory, ValueError):
                by_ident = {}
            # A thread may end and another take its pthread_t while the names are read:
            # a name counts for the threads that are the same before and after.
            again = self._thread_ids(interpreter)
            interpreter.names.update({tid: by_ident[ident] for tid, ident in threads.items()
                                      if again.get(tid) == ident and ident in by_ident})
            threads = again
        # A walk of a thread list that changes under it can miss threads that live on:
        # one has ended when the kernel no longer has it (its name goes after the drain).
        missing = interpreter.threads - threads.keys()
        alive = {tid for tid in missing if os.path.exists(f"/proc/{interpreter.pid}/task/{tid}")}
        interpreter.ended |= missing - alive
        interpreter.threads = set(threads) | alive
        interpreter.scanned = True

    def _thread_ids(self, interpreter: Interpreter) -> Dict[int, int]:
        """tid -> pthread_t of each thread state in every interpreter of the process.
        Newest first: a thread state made for a new thread carries its creator's ids until
        the thread runs, so the oldest with a tid is that thread's own."""
        return {tid: ident for _, ident, tid in self._thread_states(interpreter) if tid}

    def _thread_states(self, interpreter: Interpreter) -> List[ThreadState]:
        """Every thread state of the process, newest first, with its tid (<= 3.10: from the
        pthread struct, once the offset of the tid in it is learnt)."""
        states = thread_states(interpreter.memory, interpreter.layout, interpreter.runtime)
        if interpreter.layout.tstate_native_thread_id >= 0:
            return states
        # <= 3.10: a thread state made for a new thread holds its creator's pthread_t
        # until the thread runs, so pthread_t values are taken once each.
        idents = sorted({ident for _, ident, _ in states if ident})
        learnt_late = False  # after the walker was told of the process: it waits for this
        try:
            if interpreter.pthread_tid_offset is None:
                interpreter.pthread_tid_offset = learn_pthread_tid_offset(interpreter.memory, interpreter.pid, idents)
                if interpreter.pthread_tid_offset is None:
                    return states
                learnt_late = interpreter.scanned
                if learnt_late:
                    self._sampler.set_python_process(interpreter.pid, self._walker_fields(interpreter))
            by_ident = {ident: interpreter.memory.u32(ident + interpreter.pthread_tid_offset) for ident in idents}
        except (OSError, UnreadableMemory):
            return states
        states = [(tstate, ident, by_ident.get(ident, 0)) for tstate, ident, _ in states]
        if learnt_late and self._sampler.follows_offcpu_python:  # threads that blocked while it could not look
            self._walk_threads_away(interpreter, states)
        return states

    def on_python_thread(self, pid: int) -> None:
        """The walker found a thread (or needs the pthread tid offset). Event thread."""
        self._new_threads[pid] = time.monotonic() + _NAME_SCAN_S

    def scans_pending(self) -> bool:
        """Whether scan_new_threads has processes to scan again. Event thread."""
        return bool(self._new_threads)

    def scan_new_threads(self) -> None:
        """Name the threads found since the last call, while they run. Event thread,
        after each batch of events. A thread that has only just started may not be in
        threading's list yet: a process with unnamed threads is scanned again after the
        next batches, for _NAME_SCAN_S (a count of scans would run out in a burst of
        events)."""
        now = time.monotonic()
        for pid, until in list(self._new_threads.items()):
            interpreter = self.interpreters.get(pid)
            if interpreter is not None:
                self.scan_threads(interpreter)
            if interpreter is None or now >= until or interpreter.threads <= interpreter.names.keys():
                del self._new_threads[pid]

    def on_python_stack(self, pid: int, frames: Tuple[RawPythonFrame, ...]) -> None:
        """A stack the walker stored for the first time since a drain: read its code
        objects now, in case the process exits before the drain. Runs on the event thread."""
        interpreter = self.interpreters.get(pid)
        if interpreter is not None:
            for frame in frames:
                self.symbols.learn(interpreter.memory, interpreter.layout, frame.code, frame.check)

    def ended_threads(self) -> Dict[int, Set[int]]:
        """pid -> tids seen to end since the last call. Called before a drain, whose
        samples are the last these threads can have, so that drop_names can follow it."""
        with self._scan_lock:
            interpreters = list(self.interpreters.items())  # the event thread adds and removes them
            ended = {pid: i.ended for pid, i in interpreters if i.ended}
            for _, interpreter in interpreters:
                interpreter.ended = set()
        return ended

    def drop_names(self, ended: Dict[int, Set[int]]) -> None:
        with self._scan_lock:
            for pid, tids in ended.items():
                interpreter = self.interpreters.get(pid)
                if interpreter is not None:
                    interpreter.names = {t: name for t, name in interpreter.names.items() if t not in tids}

    def get(self, pid: int) -> Optional[Interpreter]:
        """The process's interpreter, once it is being walked."""
        return self.interpreters.get(pid)

    def on_exec(self, pid: int) -> None:
        """A new image: the walker dropped the process, and so does this. On the event
        thread, as the exec arrives: before the new image's first sample can start a walk."""
        self.forget(pid)

    def forget(self, pid: int) -> None:
        """After the last drain that can hold the process's samples."""
        with self._walk_lock:
            interpreter = self.interpreters.pop(pid, None)
            if interpreter is not None:
                interpreter.memory.close()
            self.symbols.forget(pid)
            self._looks.pop(pid, None)
            self._unreadable.discard(pid)

    def close(self) -> None:
        for pid in list(self.interpreters):
            self.forget(pid)
