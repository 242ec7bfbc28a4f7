"""CPython processes: recognising the interpreter in a process, telling the BPF walker
where to find its thread states, and naming its threads and frames."""

from __future__ import annotations

import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

from bpfprof.collector.processes.table import Mapping, ProcFiles, Process, parse_maps
from bpfprof.collector.probe.sampler import (PYTHON_FRAME_CHAINS, PYTHON_FRAME_ENTRY, PYTHON_FRAME_SHIM,
                                       PYTHON_OWNED_BY_SHIM, PYTHON_STACK_DEPTH, RawPythonFrame, Sampler)
from bpfprof.symbolizer.native.symbolizer import NativeSymbolizer
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory
from bpfprof.symbolizer.interpreters.python.layouts import (
    DEBUG_OFFSETS_COOKIE,
    DEBUG_OFFSETS_SIZE,
    PythonLayout,
    layout_for,
    parse_debug_offsets,
)
from bpfprof.symbolizer.interpreters.python.code_objects import PythonSymbolizer, check_of
from bpfprof.symbolizer.interpreters.python.thread_names import Searches, thread_names

# The interpreter is the executable (static builds) or libpython; either exports these.
PYTHON_DATA_SYMBOLS = ("_PyRuntime", "Py_Version")
_INTERPRETER_NAME = re.compile(r"^(?:lib)?python(\d)\.(\d+)")
_MAX_INTERPRETERS = 64
_MAX_THREADS = 4096
_PTHREAD_SEARCH = 1024  # bytes of a pthread struct searched for the thread's tid
_NAME_SCAN_S = 0.2  # how long a process with new threads is scanned again, while some have no name
_LOOK_FOR_S = 2.0  # how long a Python executable is looked at again, waiting for its libpython


@dataclass
class Interpreter:
    """One CPython process as the walker and the symbolizer see it."""

    pid: int
    layout: PythonLayout
    runtime: int  # address of _PyRuntime in the process
    module_path: str  # the binary the interpreter lives in
    memory: ProcessMemory
    threads: Set[int] = field(default_factory=set)  # tids with a thread state at the last scan
    names: Dict[int, str] = field(default_factory=dict)  # tid -> threading.Thread name, till the drain after it ends
    ended: Set[int] = field(default_factory=set)  # tids that left the thread list since ended_threads()
    pthread_tid_offset: Optional[int] = None  # <= 3.10: where the C library keeps a thread's tid
    scanned: bool = False
    name_searches: Searches = field(default_factory=Searches)  # what reading the names found on the way


def _candidates(process: Process) -> List[Mapping]:
    """The first mapping of each binary named like an interpreter: the executable of a
    static build, or libpython (the executable of a shared build has no _PyRuntime)."""
    found: Dict[str, Mapping] = {}
    for m in process.mappings:
        if m.obj is not None and _INTERPRETER_NAME.match(os.path.basename(m.obj.path)):
            found.setdefault(m.obj.path, m)
    return list(found.values())


def _still_mapped(pid: int, mapping: Mapping) -> bool:
    """Whether the process still maps the interpreter where it was seen."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(line.startswith(f"{mapping.start:08x}-") for line in f)
    except OSError:
        return False


def _s32(value: int) -> int:
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


def walk_frames(memory: ProcessMemory, layout: PythonLayout, tstate: int) -> List[Tuple[int, int, int, int]]:
    """A thread's Python frames, leaf first, read as the BPF walker reads them (struct
    python_frame: code, instr, check, flags), for a thread whose frames stay put while they
    are read: one off the CPU."""
    frame = memory.pointer(tstate + layout.tstate_frame)
    if layout.cframe_current_frame >= 0 and frame:
        frame = memory.pointer(frame + layout.cframe_current_frame)
    objects = layout.version <= (3, 10)  # every frame object is an eval loop entry; f_lasti an int
    frames = []
    while frame and len(frames) <= PYTHON_STACK_DEPTH:  # one more than a stack holds: truncated
        code = memory.pointer(frame + layout.frame_code) & ~3  # 3.14 tags f_executable's low bits
        if objects:
            instr = memory.s32(frame + layout.frame_instr)
        else:
            instr = _s32(memory.pointer(frame + layout.frame_instr) - code)
        owner = memory.read(frame + layout.frame_owner, 1)[0] if layout.frame_owner >= 0 else 0
        entry = memory.read(frame + layout.frame_is_entry, 1)[0] if layout.frame_is_entry >= 0 else 0
        check = check_of(memory.s32(code + layout.code_firstlineno), memory.pointer(code + layout.code_name))
        flags = (PYTHON_FRAME_SHIM if owner >= PYTHON_OWNED_BY_SHIM else 0) | \
                (PYTHON_FRAME_ENTRY if objects or entry else 0)
        frames.append((code, instr, check, flags))
        frame = memory.pointer(frame + layout.frame_previous)
    return frames


def _layout(memory: ProcessMemory, runtime: int, version_address: Optional[int], path: str) -> Optional[PythonLayout]:
    """From 3.13 on _PyRuntime starts with _Py_DebugOffsets; before, the table by version."""
    head = memory.read(runtime, len(DEBUG_OFFSETS_COOKIE))
    if head == DEBUG_OFFSETS_COOKIE:
        return parse_debug_offsets(memory.read(runtime, DEBUG_OFFSETS_SIZE))
    if version_address is not None:
        hex_version = memory.u32(version_address)
        return layout_for((hex_version >> 24, (hex_version >> 16) & 0xFF))
    match = _INTERPRETER_NAME.match(os.path.basename(path))
    return layout_for((int(match.group(1)), int(match.group(2)))) if match else None


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
            layout = _layout(memory, runtime, bias + version if version else None, mapping.obj.path)
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
        interpreter = Interpreter(process.pid, layout, runtime, mapping.obj.path, memory)
        self.scan_threads(interpreter)
        self.interpreters[process.pid] = interpreter
        self._sampler.set_python_process(process.pid, self._walker_fields(interpreter))
        if self._sampler.follows_offcpu_python:
            self._walk_threads_away(interpreter, self._thread_states(interpreter))

    def _walk_threads_away(self, interpreter: Interpreter, states: List[Tuple[int, int, int]]) -> None:
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
                    if not flags & PYTHON_FRAME_SHIM:
                        self.symbols.learn(interpreter.memory, interpreter.layout, code, check)
            except UnreadableMemory:
                continue
            if frames and self._sampler.offcpu_start_ns(tid) == since:
                self._sampler.set_late_python_stack(tid, since, frames)

    def _cannot_read(self, path: str, reason: str) -> None:
        """One warning per interpreter binary, naming its version."""
        if path not in self._warned:
            self._warned.add(path)
            major, minor = _INTERPRETER_NAME.match(os.path.basename(path)).groups()
            self._warn(f"CPython {major}.{minor} ({path}) cannot be read ({reason}); "
                       "its processes get native frames only")

    @staticmethod
    def _walker_fields(interpreter: Interpreter) -> Dict[str, int]:
        layout = interpreter.layout
        if layout.version <= (3, 10):
            chain = "PYTHON_FRAME_OBJECTS"
        elif layout.cframe_current_frame >= 0:
            chain = "PYTHON_CFRAME"
        else:
            chain = "PYTHON_CURRENT_FRAME"
        return {
            "runtime": interpreter.runtime,
            "runtime_interpreters_head": layout.runtime_interpreters_head,
            "interp_next": layout.interp_next,
            "interp_threads_head": layout.interp_threads_head,
            "tstate_next": layout.tstate_next,
            "tstate_thread_id": layout.tstate_thread_id,
            "tstate_native_thread_id": layout.tstate_native_thread_id,
            "pthread_tid": -1 if interpreter.pthread_tid_offset is None else interpreter.pthread_tid_offset,
            "frame_chain": PYTHON_FRAME_CHAINS[chain],
            "tstate_frame": layout.tstate_frame,
            "cframe_current_frame": layout.cframe_current_frame,
            "frame_previous": layout.frame_previous,
            "frame_code": layout.frame_code,
            "frame_instr": layout.frame_instr,
            "frame_owner": layout.frame_owner,
            "frame_is_entry": layout.frame_is_entry,
            "code_firstlineno": layout.code_firstlineno,
            "code_name": layout.code_name,
        }

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

    def _thread_states(self, interpreter: Interpreter) -> List[Tuple[int, int, int]]:
        """(PyThreadState, pthread_t, tid or 0) of each thread state in every interpreter of
        the process, newest first."""
        layout, memory = interpreter.layout, interpreter.memory
        states: List[Tuple[int, int, int]] = []  # (PyThreadState, pthread_t, tid or 0)
        try:
            interp = memory.pointer(interpreter.runtime + layout.runtime_interpreters_head)
            for _ in range(_MAX_INTERPRETERS):
                if not interp:
                    break
                tstate = memory.pointer(interp + layout.interp_threads_head)
                while tstate and len(states) < _MAX_THREADS:
                    tid = memory.u32(tstate + layout.tstate_native_thread_id) if layout.tstate_native_thread_id >= 0 else 0
                    states.append((tstate, memory.pointer(tstate + layout.tstate_thread_id), tid))
                    tstate = memory.pointer(tstate + layout.tstate_next)
                interp = memory.pointer(interp + layout.interp_next)
        except UnreadableMemory:
            pass  # exiting, or a thread list changing under us: what was read stands
        if layout.tstate_native_thread_id < 0:  # <= 3.10 keeps only the pthread_t
            learnt = interpreter.pthread_tid_offset
            states = self._tids_from_pthreads(interpreter, states)
            if interpreter.scanned and interpreter.pthread_tid_offset != learnt:  # the walker waits for it
                self._sampler.set_python_process(interpreter.pid, self._walker_fields(interpreter))
                if self._sampler.follows_offcpu_python:  # threads that blocked while it could not look
                    self._walk_threads_away(interpreter, states)
        return states

    @staticmethod
    def _tids_from_pthreads(interpreter: Interpreter, states: List[Tuple[int, int, int]]) -> List[Tuple[int, int, int]]:
        """Kernel tids for thread states known by pthread_t alone. The C library keeps each
        thread's tid inside its pthread struct; where, is learnt once per process: the
        offset at which every struct holds a distinct tid of the process, the main
        thread's being the pid. (A thread state made for a new thread holds its creator's
        pthread_t until the thread runs, so pthread_t values are taken once each.)"""
        memory, pid = interpreter.memory, interpreter.pid
        idents = sorted({ident for _, ident, _ in states if ident})
        known = interpreter.pthread_tid_offset
        try:
            if known is not None:
                by_ident = {ident: memory.u32(ident + known) for ident in idents}
            else:
                # The structs first, the tasks after: a thread cloned in between is listed.
                # A struct whose thread is not cloned yet holds tid 0 there.
                structs = [memory.read(ident, _PTHREAD_SEARCH) for ident in idents]
                tasks = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
                for offset in range(0, _PTHREAD_SEARCH, 4):
                    tids = [struct.unpack_from("<i", data, offset)[0] for data in structs]
                    cloned = [tid for tid in tids if tid]
                    if pid in tids and set(cloned) <= tasks and len(set(cloned)) == len(cloned):
                        interpreter.pthread_tid_offset = offset
                        break
                else:
                    return states
                by_ident = dict(zip(idents, tids))
        except (OSError, UnreadableMemory):
            return states
        return [(tstate, ident, by_ident.get(ident, 0)) for tstate, ident, _ in states]

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
