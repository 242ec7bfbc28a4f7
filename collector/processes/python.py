"""CPython processes: recognising the interpreter in a process, attaching a PythonProcess
to it, and bringing it what the BPF side tells of its threads and stacks."""

from __future__ import annotations

import os
import threading
import time
from typing import Dict, List, Optional, Set, Tuple

from bpfprof.collector.probe.sampler import RawPythonFrame, Sampler
from bpfprof.collector.processes.table import Mapping, ProcFiles, Process, parse_maps, read_maps
from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.errors import SymbolizerError
from bpfprof.symbolizer.interpreters.python.code_objects import PythonSymbolizer
from bpfprof.symbolizer.interpreters.python.process import PythonProcess
from bpfprof.symbolizer.interpreters.python.threads import INTERPRETER_NAME, RUNTIME_SYMBOLS, layout_of
from bpfprof.symbolizer.native.elf import LoadedData
from bpfprof.symbolizer.native.symbolizer import NativeSymbolizer
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory

# The interpreter is the executable (static builds) or libpython; either has these
# (3.6's interp_head in .symtab only, Py_Version from 3.11 on).
PYTHON_DATA_SYMBOLS = (*RUNTIME_SYMBOLS, "Py_Version")
_NAME_SCAN_S = 0.2  # how long a process with new threads is scanned again, while some have no name
_LOOK_FOR_S = 2.0  # how long a Python executable is looked at again, waiting for its libpython


def _candidates(process: Process) -> List[Mapping]:
    """The first mapping of each binary named like an interpreter: the executable of a
    static build, or libpython (the executable of a shared build has no runtime symbol)."""
    found: Dict[str, Mapping] = {}
    for m in process.mappings:
        if m.obj is not None and INTERPRETER_NAME.match(os.path.basename(m.obj.path)):
            found.setdefault(m.obj.path, m)
    return list(found.values())


def _runtime_symbol(symbols: Optional[LoadedData]) -> Optional[str]:
    """The symbol of RUNTIME_SYMBOLS the binary has, if any."""
    return next((name for name in RUNTIME_SYMBOLS if symbols is not None and name in symbols.data), None)


def _name(pid: int) -> str:
    return f"{pid} (CPython)"


def _still_mapped(pid: int, mapping: Mapping) -> bool:
    """Whether the process still maps the interpreter where it was seen (within the
    bounded part of its maps, as its snapshot was)."""
    try:
        maps, _ = read_maps(f"/proc/{pid}/maps")
    except OSError:
        return False
    return any(m.start == mapping.start for m in parse_maps(pid, maps)[0])


class PythonProcesses:
    """Finds CPython in processes and keeps a PythonProcess for each. What must be read
    while a thread or process still runs is read on the event thread (on_thread_found,
    work, on_stack); the rest on the recorder's."""

    name = "python"

    def __init__(self, sampler: Sampler, native: NativeSymbolizer, failures: Failures) -> None:
        self._sampler = sampler
        self._native = native
        self._failures = failures
        self.interpreters: Dict[int, PythonProcess] = {}
        self.symbols = PythonSymbolizer()
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
            self._start_walking(Process(pid, files.comm, parse_maps(pid, files.maps, files.root)[0]), exported_only=True)

    def on_snapshot(self, process: Process) -> None:
        """A process was (re)read: start walking it if it runs a CPython we know."""
        self._start_walking(process, exported_only=False)

    def _start_walking(self, process: Process, exported_only: bool) -> None:
        with self._walk_lock, self._failures.contain("process", _name(process.pid)):
            self._start_walking_locked(process, exported_only)

    def _start_walking_locked(self, process: Process, exported_only: bool) -> None:
        if process.pid in self.interpreters or process.pid in self._unreadable or not process.readable:
            return
        candidates = _candidates(process)
        for mapping in candidates:
            symbols = self._native.get_exported_data(mapping.obj)
            if _runtime_symbol(symbols) is None and not exported_only:
                symbols = self._native.get_symbols(mapping.obj)  # a build may not export it
            runtime_symbol = _runtime_symbol(symbols)
            if runtime_symbol is not None:
                break
        else:
            if exported_only:
                return
            # A libpython from before 3.6 (or a 3.6 without its symbol table) has neither
            # symbol. An executable without one may just not have mapped its libpython yet:
            # read it again at its next mmap or sample.
            old = [m for m in candidates if os.path.basename(m.obj.path).startswith("lib")]
            if old:
                self._cannot_read(old[0].obj.path, "no _PyRuntime or interp_head symbol")
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
            runtime = bias + symbols.data[runtime_symbol]
            layout = layout_of(memory, runtime, bias + version if version else None, mapping.obj.path)
            reason = "no known layout"
        except SymbolizerError as e:  # a structure no layout fits, or unreadable
            layout, reason = None, str(e)
        if layout is None and not _still_mapped(process.pid, mapping):
            memory.close()  # it exited or exec'd while being read: nothing to say of its interpreter
            return
        if layout is None:
            memory.close()
            self._unreadable.add(process.pid)  # not looked at again until it execs
            self._cannot_read(mapping.obj.path, reason)
            return
        interpreter = PythonProcess(process.pid, layout, runtime, mapping.obj.path, memory, self.symbols, self._sampler,
                                    self._failures)
        self.scan_threads(interpreter)
        self.interpreters[process.pid] = interpreter  # before the walker's events about it can come
        with self._scan_lock, self._failures.contain("process", _name(process.pid)):
            interpreter.start_walker()

    def _cannot_read(self, path: str, reason: str) -> None:
        """Counted, and told once per interpreter binary with its version."""
        major, minor, abi_flags = INTERPRETER_NAME.match(os.path.basename(path)).groups()
        build = "t" if "t" in abi_flags else ""
        self._failures.add("binary", path, SymbolizerError(
            f"CPython {major}.{minor}{build} cannot be read ({reason}); its processes get native frames only"))

    def scan_threads(self, interpreter: PythonProcess) -> None:
        """Re-read the process's thread lists (either thread may ask)."""
        with self._scan_lock, self._failures.contain("process", _name(interpreter.pid)):
            interpreter.scan()

    def on_thread_found(self, pid: int) -> None:
        """The walker found a thread (or needs the pthread tid offset). Event thread."""
        self._new_threads[pid] = time.monotonic() + _NAME_SCAN_S

    def has_work(self) -> bool:
        """Whether work() has processes to scan again. Event thread."""
        return bool(self._new_threads)

    def work(self) -> None:
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

    def on_stack(self, pid: int, frames: Tuple[RawPythonFrame, ...]) -> None:
        """A stack the walker stored for the first time since a drain: read its code
        objects now, in case the process exits before the drain. Runs on the event thread."""
        interpreter = self.interpreters.get(pid)
        if interpreter is not None:
            interpreter.learn(frames)

    def ended_threads(self) -> Dict[int, Set[int]]:
        """pid -> tids seen to end since the last call. Called before a drain, whose
        samples are the last these threads can have, so that drop_names can follow it."""
        with self._scan_lock:
            interpreters = list(self.interpreters.items())  # the event thread adds and removes them
            ended = {pid: interpreter.take_ended() for pid, interpreter in interpreters}
        return {pid: tids for pid, tids in ended.items() if tids}

    def drop_names(self, ended: Dict[int, Set[int]]) -> None:
        with self._scan_lock:
            for pid, tids in ended.items():
                interpreter = self.interpreters.get(pid)
                if interpreter is not None:
                    interpreter.drop_names(tids)

    def num_bytes(self) -> int:
        return self.symbols.num_bytes()

    def get(self, pid: int) -> Optional[PythonProcess]:
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
                interpreter.close()
            self.symbols.forget(pid)
            self._looks.pop(pid, None)
            self._unreadable.discard(pid)

    def close(self) -> None:
        for pid in list(self.interpreters):
            self.forget(pid)
