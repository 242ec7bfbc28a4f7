"""CPython processes: recognising the interpreter in a process, and telling the BPF walker
where its thread states are, kept current as threads come and go."""

from __future__ import annotations

import os
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

from bpfprof.collector.processes import Mapping, Process
from bpfprof.collector.sampler import PYTHON_FRAME_CHAINS, Sampler
from bpfprof.symbolizer.native import NativeSymbolizer
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory
from bpfprof.symbolizer.python_layouts import (
    DEBUG_OFFSETS_COOKIE,
    DEBUG_OFFSETS_SIZE,
    PythonLayout,
    layout_for,
    parse_debug_offsets,
)
from bpfprof.symbolizer.python_thread_names import thread_names

# The interpreter is the executable (static builds) or libpython; either exports these.
PYTHON_DATA_SYMBOLS = ("_PyRuntime", "Py_Version")
_INTERPRETER_NAME = re.compile(r"^(?:lib)?python(\d)\.(\d+)")
_MAX_INTERPRETERS = 64
_MAX_THREADS = 4096
_RESCAN_INTERVAL_S = 0.01  # a thread that lives 100 ms (one per request) is still found
_PTHREAD_SEARCH = 1024  # bytes of a pthread struct searched for the thread's tid


@dataclass
class Interpreter:
    """One CPython process as the walker and the symbolizer see it."""

    pid: int
    layout: PythonLayout
    runtime: int  # address of _PyRuntime in the process
    module_path: str  # the binary the interpreter lives in
    memory: ProcessMemory
    threads: Dict[int, int] = field(default_factory=dict)  # tid -> PyThreadState
    names: Dict[int, str] = field(default_factory=dict)  # tid -> threading.Thread name
    pthread_tid_offset: Optional[int] = None  # <= 3.10: where the C library keeps a thread's tid
    last_scan: float = 0.0


def _candidates(process: Process) -> List[Mapping]:
    """The first mapping of each binary named like an interpreter: the executable of a
    static build, or libpython (the executable of a shared build has no _PyRuntime)."""
    found: Dict[str, Mapping] = {}
    for m in process.mappings:
        if m.obj is not None and _INTERPRETER_NAME.match(os.path.basename(m.obj.path)):
            found.setdefault(m.obj.path, m)
    return list(found.values())


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
    """Finds CPython in processes and keeps the BPF maps of interpreters and threads current."""

    def __init__(self, sampler: Sampler, native: NativeSymbolizer,
                 warn: Callable[[str], None] = lambda message: None) -> None:
        self._sampler = sampler
        self._native = native
        self._warn = warn
        self.interpreters: Dict[int, Interpreter] = {}
        self._unknown: Dict[int, Set[int]] = {}  # pid -> tids reported without a thread state
        self._warned: Set[str] = set()

    def on_snapshot(self, process: Process) -> None:
        """A process was (re)read: start walking it if it runs a CPython we know."""
        if process.pid in self.interpreters or not process.readable:
            return
        candidates = _candidates(process)
        for mapping in candidates:
            symbols = self._native.get_symbols(mapping.obj)
            if symbols is not None and "_PyRuntime" in symbols.data:
                break
        else:
            # A libpython from before 3.7 has no _PyRuntime. (An executable without it may
            # just not have mapped its libpython yet.)
            old = [m for m in candidates if os.path.basename(m.obj.path).startswith("lib")]
            if old:
                self._cannot_read(old[0].obj.path, "no _PyRuntime symbol")
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
        if layout is None:
            memory.close()
            self._cannot_read(mapping.obj.path, reason)
            return
        interpreter = Interpreter(process.pid, layout, runtime, mapping.obj.path, memory)
        self.interpreters[process.pid] = interpreter
        self._sampler.set_python_process(process.pid, self._walker_fields(layout))
        self.scan_threads(interpreter)

    def _cannot_read(self, path: str, reason: str) -> None:
        """One warning per interpreter binary, naming its version."""
        if path not in self._warned:
            self._warned.add(path)
            major, minor = _INTERPRETER_NAME.match(os.path.basename(path)).groups()
            self._warn(f"CPython {major}.{minor} ({path}) cannot be read ({reason}); "
                       "its processes get native frames only")

    @staticmethod
    def _walker_fields(layout: PythonLayout) -> Dict[str, int]:
        if layout.version <= (3, 10):
            chain = "PYTHON_FRAME_OBJECTS"
        elif layout.cframe_current_frame >= 0:
            chain = "PYTHON_CFRAME"
        else:
            chain = "PYTHON_CURRENT_FRAME"
        return {
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
        """Re-read the thread lists of every interpreter in the process and replace its
        entries: thread states by tid, and the names threading gave them."""
        layout, memory = interpreter.layout, interpreter.memory
        states: List[Tuple[int, int, int]] = []  # (PyThreadState, pthread ident, tid or 0)
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
            states = self._tids_from_pthreads(interpreter, states)
        threads = {tid: tstate for tstate, _, tid in states if tid}
        if threads.keys() != interpreter.threads.keys() or not interpreter.last_scan:  # names only for new threads
            try:
                by_ident = thread_names(memory, layout, interpreter.runtime)
            except (UnreadableMemory, ValueError):
                by_ident = {}
            interpreter.names = {tid: by_ident[ident] for _, ident, tid in states if tid and ident in by_ident}
        gone = set(interpreter.threads) - set(threads)
        self._sampler.set_python_threads(interpreter.pid, threads, gone)
        interpreter.threads = threads
        interpreter.last_scan = time.monotonic()

    @staticmethod
    def _tids_from_pthreads(interpreter: Interpreter, states: List[Tuple[int, int, int]]) -> List[Tuple[int, int, int]]:
        """Kernel tids for thread states known by pthread_t alone. The C library keeps each
        thread's tid inside its pthread struct; where, is learnt once per process: the
        offset at which every struct holds a distinct tid of the process, the main
        thread's being the pid."""
        memory, pid = interpreter.memory, interpreter.pid
        try:
            tasks = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
            structs = [memory.read(ident, _PTHREAD_SEARCH) if ident else b"" for _, ident, _ in states]
        except (OSError, UnreadableMemory):
            return states
        offsets = [interpreter.pthread_tid_offset] if interpreter.pthread_tid_offset is not None else \
            range(0, _PTHREAD_SEARCH, 4)
        for offset in offsets:
            tids = [struct.unpack_from("<i", data, offset)[0] if data else 0 for data in structs]
            found = [t for t in tids if t]
            if pid in found and set(found) <= tasks and len(set(found)) == len(found):
                interpreter.pthread_tid_offset = offset
                return [(tstate, ident, tid) for (tstate, ident, _), tid in zip(states, tids)]
        return states

    def on_unknown_thread(self, pid: int, tid: int) -> None:
        """BPF met a thread without a known thread state: look again (at most every 10 ms)."""
        interpreter = self.interpreters.get(pid)
        if interpreter is None:
            return
        if time.monotonic() - interpreter.last_scan >= _RESCAN_INTERVAL_S:
            self.scan_threads(interpreter)
        if tid not in interpreter.threads:
            self._unknown.setdefault(pid, set()).add(tid)

    def ask_again(self) -> None:
        """Threads still unknown may be reported again (their thread state may not have
        existed yet); called every time events have been handled."""
        for pid, tids in self._unknown.items():
            self._sampler.ask_again(tids)
        self._unknown.clear()

    def on_exit(self, pid: int) -> None:
        interpreter = self.interpreters.get(pid)
        if interpreter is not None:
            self._sampler.set_python_threads(pid, {}, interpreter.threads)
            interpreter.threads = {}

    def forget(self, pid: int) -> None:
        """After the last drain that can hold the process's samples."""
        interpreter = self.interpreters.pop(pid, None)
        if interpreter is not None:
            interpreter.memory.close()

    def close(self) -> None:
        for pid in list(self.interpreters):
            self.forget(pid)
