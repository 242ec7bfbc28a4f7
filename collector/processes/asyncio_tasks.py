"""asyncio tasks sampled for the wall profile: the time a task spends awaiting is on no
thread's stack (its loop's thread sits in select or runs another task), so a thread of
ours reads the awaiting tasks of every CPython process being walked, from outside, many
times a second, and gives each its share of the time at its await chain.

A read takes about 15 reads of process memory per task (3 µs each) and a few dozen per
process, so it runs at the profile's rate but at most TASK_HZ times a second, and less
often when reads take more than MAX_CPU_SHARE of a CPU (hundreds of tasks), at intervals
jittered so that tasks sleeping on a period in step with ours are not always seen in the
same state. The time between two reads goes half to where the first saw each task and
half to where the second does: our thread may be kept from the interpreter lock for a
hundred milliseconds while the recorder names frames, and a gap like that belongs to
either end as much as to the other."""

from __future__ import annotations

import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Dict, Optional, Set, Tuple

from bpfprof.collector.processes.python import PythonProcesses
from bpfprof.collector.processes.table import parse_maps, read_maps
from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.errors import MalformedInput
from bpfprof.symbolizer.frames import Stack
from bpfprof.symbolizer.interpreters.python.asyncio_layouts import (ASYNCIO_DEBUG_SECTION, AsyncioLayout,
                                                                    asyncio_layout_for,
                                                                    asyncio_layout_from_debug_offsets)
from bpfprof.symbolizer.interpreters.python.asyncio_tasks import TaskReader
from bpfprof.symbolizer.interpreters.python.layouts import DEBUG_OFFSETS_SIZE
from bpfprof.symbolizer.interpreters.python.process import PythonProcess
from bpfprof.symbolizer.interpreters.python.threads import thread_states
from bpfprof.symbolizer.native.elf import read_section_place
from bpfprof.symbolizer.native.symbolizer import MAX_BINARY, FileId
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory
from bpfprof.symbolizer.safe_open import open_regular

TASK_HZ = 100
MAX_CPU_SHARE = 0.02
_COST_SMOOTHING = 0.2  # weight of a read's CPU time in the running mean that paces the reads
MAX_TASK_WAITS = 1 << 16  # distinct TaskWaits kept between two takes; past it, waits are left out and counted
# A 3.14+ process is looked at again while no binary it maps has .AsyncioDebug (asyncio not
# imported yet): soon at first, as a program imports asyncio as it starts, then less often.
LOOK_AGAIN_S = 0.05
LOOK_AGAIN_AT_MOST_S = 5.0
# The binaries that may hold .AsyncioDebug: the _asyncio module (3.14), the interpreter (3.15).
_ASYNCIO_BINARY = re.compile(r"^(?:_asyncio\.|(?:lib)?python\d)")
_MAX_SECTION = 1 << 12  # bytes of .AsyncioDebug read


@dataclass(frozen=True)
class TaskWait:
    """Where one task awaited: leaf-first stack of its await chain, on its loop's thread."""
    pid: int
    tid: int
    thread_name: str  # as the kernel has it
    task: str
    stack: Stack


class _Followed:
    """One process's tasks, read with a memory of our own (the interpreter's closes when
    the process is forgotten, which may happen while we read), once its asyncio layout is
    known."""

    def __init__(self, interpreter: PythonProcess) -> None:
        self.interpreter = interpreter
        self.memory = ProcessMemory(interpreter.pid)
        self.reader: Optional[TaskReader] = None
        self.look_at = 0.0  # when to look for its asyncio layout next (monotonic); inf: never
        self.look_wait = LOOK_AGAIN_S  # before the next look after one that finds nothing
        self.without_section: Set[FileId] = set()  # binaries it maps that have no .AsyncioDebug
        self.threads: Dict[int, Tuple[int, str]] = {}  # thread ident -> tid, its name as the kernel has it

    def find_reader(self, failures: Failures) -> bool:
        """Whether the process's tasks can be read now; its asyncio layout is looked for
        again after waits that double from LOOK_AGAIN_S to LOOK_AGAIN_AT_MOST_S, and
        given up, once told, when it cannot be used."""
        now = time.monotonic()
        if now < self.look_at:
            return False
        self.look_at, self.look_wait = now + self.look_wait, min(2 * self.look_wait, LOOK_AGAIN_AT_MOST_S)
        interpreter = self.interpreter
        layout = asyncio_layout_for(interpreter.layout.version)
        if layout is None:
            try:
                layout = published_asyncio_layout(self.memory, interpreter.runtime, self.without_section)
            except MalformedInput as error:
                failures.add("binary", interpreter.module_path, MalformedInput(f"asyncio tasks not read: {error}"))
                self.look_at = math.inf
                return False
        if layout is not None:
            self.reader = TaskReader(self.memory, interpreter.layout, layout, interpreter.runtime)
        return layout is not None

    def thread(self, ident: int) -> Optional[Tuple[int, str]]:
        """The tid and name of the thread whose pthread_t is `ident`, None for no thread."""
        if ident not in self.threads:
            tids = {i: tid for _, i, tid in thread_states(self.memory, self.interpreter.layout,
                                                          self.interpreter.runtime) if tid}
            self.threads = {i: (tid, _kernel_name(self.interpreter.pid, tid)) for i, tid in tids.items()}
        return self.threads.get(ident)


def published_asyncio_layout(memory: ProcessMemory, runtime: int,
                             without_section: Optional[Set[FileId]] = None) -> Optional[AsyncioLayout]:
    """3.14+: the asyncio layout from the offsets a process publishes (`runtime`: the
    address of its _PyRuntime), None while no binary it maps has them (3.14's _asyncio
    module is mapped when asyncio is first imported). Binaries found without them are
    added to `without_section` and not opened again. Raises MalformedInput for offsets
    that cannot be used, OSError or UnreadableMemory when the process is gone."""
    without_section = set() if without_section is None else without_section
    maps, _ = read_maps(f"/proc/{memory.pid}/maps")
    for mapping in parse_maps(memory.pid, maps)[0]:
        obj = mapping.obj
        if obj is None or obj.file_id in without_section or not _ASYNCIO_BINARY.match(os.path.basename(obj.path)):
            continue
        fd = open_regular(obj.open_path, MAX_BINARY)
        try:
            place = read_section_place(f"/proc/self/fd/{fd}", ASYNCIO_DEBUG_SECTION)
        finally:
            os.close(fd)
        vaddr = place[0].vaddr(mapping.offset) if place is not None else None
        if vaddr is None:
            without_section.add(obj.file_id)
            continue
        _, address, size = place
        if size > _MAX_SECTION:
            raise MalformedInput(f"{obj.path}: its .AsyncioDebug section claims {size} bytes")
        return asyncio_layout_from_debug_offsets(memory.read(runtime, DEBUG_OFFSETS_SIZE),
                                                 memory.read(mapping.start - vaddr + address, size))
    return None


def _kernel_name(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm", "rb") as comm:
            return comm.read(64).rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return ""


class TaskSampler:
    """Reads awaiting tasks on its own thread from start() to stop(); take() hands over
    the time each waited since the last take."""

    def __init__(self, python: PythonProcesses, failures: Failures, hz: int) -> None:
        self._python = python
        self._failures = failures
        self._period_s = 1.0 / min(hz, TASK_HZ)
        self._followed: Dict[int, _Followed] = {}
        self._lock = threading.Lock()
        self._waited: Dict[TaskWait, float] = {}  # seconds, since the last take
        self._last_seen: Dict[Tuple[int, int], TaskWait] = {}  # by the last read: (pid, task) -> where it awaits
        self._dropped = 0  # waits left out: more distinct than MAX_TASK_WAITS
        self.num_reads = 0  # reads of every followed process's tasks, since the start
        self.num_task_samples = 0  # awaiting tasks seen by them: how far the pacing let the reads go
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._random = random.Random()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._failures.keep_running, args=("asyncio tasks", self._run),
                                        name="bpfprof-asyncio", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for followed in self._followed.values():
            followed.memory.close()
        self._followed.clear()

    def take(self) -> Tuple[Dict[TaskWait, int], int]:
        """Nanoseconds each TaskWait took since the last take, and how many waits were
        left out meanwhile."""
        with self._lock:
            taken = {wait: int(seconds * 1e9) for wait, seconds in self._waited.items()}, self._dropped
            self._waited, self._dropped = {}, 0
        return taken

    def _run(self) -> None:
        cost = 0.0  # CPU seconds a read takes, a running mean
        last = time.monotonic()
        while not self._stopping.wait(max(self._period_s, cost / MAX_CPU_SHARE) * self._random.uniform(0.5, 1.5)):
            now, cpu = time.monotonic(), time.thread_time()
            self.sample(now - last)
            cost += _COST_SMOOTHING * (time.thread_time() - cpu - cost)
            last = now

    def sample(self, seconds: float) -> None:
        """Read every followed process's awaiting tasks once, `seconds` after the last read:
        each task gets half of them for where the last read saw it awaiting and half for
        where this one does."""
        interpreters = dict(self._python.interpreters)  # the event thread adds and removes them
        for pid in list(self._followed):
            if interpreters.get(pid) is not self._followed[pid].interpreter:
                self._followed.pop(pid).memory.close()
        seen: Dict[Tuple[int, int], TaskWait] = {}
        for pid, interpreter in interpreters.items():
            with self._failures.contain("process", f"{pid} (CPython, asyncio tasks)"):
                seen.update(self._read_process(pid, interpreter))
        self.num_reads += 1
        self.num_task_samples += len(seen)
        with self._lock:
            for wait in (*self._last_seen.values(), *seen.values()):
                if wait in self._waited or len(self._waited) < MAX_TASK_WAITS:
                    self._waited[wait] = self._waited.get(wait, 0.0) + seconds / 2
                else:
                    self._dropped += 1
        self._last_seen = seen

    def _read_process(self, pid: int, interpreter: PythonProcess) -> Dict[Tuple[int, int], TaskWait]:
        """(pid, task) -> where it awaits, for each awaiting task of the process."""
        followed = self._followed.get(pid)
        if followed is None:
            if interpreter.layout.version < (3, 11) or interpreter.layout.objects is None:
                return {}
            followed = self._followed[pid] = _Followed(interpreter)
        if followed.reader is None and not followed.find_reader(self._failures):
            return {}
        try:
            tasks = followed.reader.awaiting_tasks()
        except UnreadableMemory:
            return {}  # the process exited, or changed under the read: the next read tells
        layout, symbols = interpreter.layout, interpreter.symbols
        seen: Dict[Tuple[int, int], TaskWait] = {}
        for task in tasks:
            thread = followed.thread(task.loop_thread)
            if thread is not None:
                stack = tuple(symbols.get_frame(followed.memory, layout, code, instr, check)
                              for code, instr, check in task.chain)
                seen[(pid, task.address)] = TaskWait(pid, thread[0], thread[1], task.name, stack)
        return seen
