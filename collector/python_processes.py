"""CPython processes: recognising the interpreter in a process, and telling the BPF walker
where its thread states are, kept current as threads come and go."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set

from bpfprof.collector.processes import Mapping, Process
from bpfprof.collector.sampler import PYTHON_FRAME_CHAINS, PYTHON_THREAD_KEYS, Sampler
from bpfprof.symbolizer.native import NativeSymbolizer
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory
from bpfprof.symbolizer.python_layouts import (
    DEBUG_OFFSETS_COOKIE,
    DEBUG_OFFSETS_SIZE,
    PythonLayout,
    layout_for,
    parse_debug_offsets,
)

# The interpreter is the executable (static builds) or libpython; either exports these.
PYTHON_DATA_SYMBOLS = ("_PyRuntime", "Py_Version")
_INTERPRETER_NAME = re.compile(r"^(?:lib)?python(\d)\.(\d+)")
_MAX_INTERPRETERS = 64
_MAX_THREADS = 4096
_RESCAN_INTERVAL_S = 0.1


@dataclass
class Interpreter:
    """One CPython process as the walker and the symbolizer see it."""

    pid: int
    layout: PythonLayout
    runtime: int  # address of _PyRuntime in the process
    module_path: str  # the binary the interpreter lives in
    memory: ProcessMemory
    threads: Dict[int, int] = field(default_factory=dict)  # thread key -> PyThreadState
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
            if candidates:  # an interpreter from before 3.7 has no _PyRuntime
                self._cannot_read(candidates[-1].obj.path, "no _PyRuntime symbol")
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
        key = "PYTHON_KEY_TID" if layout.tstate_native_thread_id >= 0 else "PYTHON_KEY_PTHREAD"
        return {
            "frame_chain": PYTHON_FRAME_CHAINS[chain],
            "thread_key": PYTHON_THREAD_KEYS[key],
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
        """Re-read every interpreter's thread list and replace this process's entries."""
        layout, memory = interpreter.layout, interpreter.memory
        key_offset = layout.tstate_native_thread_id
        if key_offset < 0:
            key_offset = layout.tstate_thread_id
        threads: Dict[int, int] = {}
        try:
            interp = memory.pointer(interpreter.runtime + layout.runtime_interpreters_head)
            for _ in range(_MAX_INTERPRETERS):
                if not interp:
                    break
                tstate = memory.pointer(interp + layout.interp_threads_head)
                while tstate and len(threads) < _MAX_THREADS:
                    threads[memory.pointer(tstate + key_offset)] = tstate
                    tstate = memory.pointer(tstate + layout.tstate_next)
                interp = memory.pointer(interp + layout.interp_next)
        except UnreadableMemory:
            pass  # exiting, or a thread list changing under us: what was read stands
        gone = set(interpreter.threads) - set(threads)
        threads.pop(0, None)  # a thread state not bound to a thread yet
        self._sampler.set_python_threads(interpreter.pid, threads, gone)
        interpreter.threads = threads
        interpreter.last_scan = time.monotonic()

    def on_unknown_thread(self, pid: int, tid: int) -> None:
        """BPF met a thread without a known thread state: look again (at most every 100 ms)."""
        interpreter = self.interpreters.get(pid)
        if interpreter is None:
            return
        self._unknown.setdefault(pid, set()).add(tid)
        if time.monotonic() - interpreter.last_scan >= _RESCAN_INTERVAL_S:
            self.scan_threads(interpreter)

    def end_drain(self) -> None:
        """Threads still unknown may be reported again (they may not have started yet)."""
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
