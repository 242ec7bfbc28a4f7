"""Unwind tables into the sampler's maps: each binary's rows once, each process's
executable mappings as they are read, so that BPF unwinds native stacks without frame
pointers.

Tables are built (or read from the disk cache) on a thread of their own, so that a large
binary seen for the first time never holds up a drain: until its table is in, a process
is unwound by frame pointers through that binary, and that thread installs it again as
soon as the table is loaded. Rows of a binary stay loaded while any process maps it, and
after that until the space is needed. A binary whose table cannot be built or placed,
and anonymous code (JIT), get a mapping without rows: BPF follows frame pointers there.
So does bpfprof itself, and a command it forks until that execs: the compiler libraries
bcc maps into it (LLVM, clang) hold 2M rows, the whole default map.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

from bpfprof.collector.processes.table import Mapping, Process
from bpfprof.collector.processes.run_allocator import RunAllocator
from bpfprof.collector.probe.sampler import UNWIND_MAPPINGS_SEARCHED, UNWIND_ROWS_SEARCHED, Sampler
from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.errors import MalformedInput
from bpfprof.symbolizer.native.content_identity import ContentIdentity
from bpfprof.symbolizer.native.symbolizer import FileId, NativeSymbolizer, ObjectFile
from bpfprof.symbolizer.native.unwind_cache import open_unwind_table
from bpfprof.symbolizer.native.unwind_table import UnwindTable



@dataclass
class _LoadedTable:
    """A binary's rows in unwind_rows."""

    first_row: int
    num_rows: int
    segments: Tuple[Tuple[int, int, int], ...]
    identity: ContentIdentity
    users: int = 0  # processes whose mappings point at these rows


@dataclass
class _InstalledProcess:
    process: Process  # the snapshot installed, to install again as its tables arrive
    first_mapping: int
    num_mappings: int
    tables: List[_LoadedTable]


@dataclass
class UnwindStats:
    rows_capacity: int
    rows_used: int
    binaries: int  # with rows loaded
    processes: int  # whose mappings were installed, in all
    kernel_bytes: int  # of the unwinder's maps, allocated at start-up


class _TableBuilder:
    """A thread that builds the unwind tables submit() asks for, and hands each to
    on_built(file, its table or None if it has none, whether the binary could be opened).
    The binary is opened when its turn comes, with a descriptor of its own: the one that
    keeps it reachable may be closed meanwhile."""

    def __init__(self, cache_dir: Optional[str], open_binary: Callable[[ObjectFile], Optional[int]],
                 on_built: Callable[[FileId, Optional[UnwindTable], bool], None], failures: Failures) -> None:
        self._cache_dir = cache_dir
        self._open_binary = open_binary
        self._on_built = on_built
        self._failures = failures
        self._todo: "queue.Queue[Optional[ObjectFile]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def submit(self, obj: ObjectFile) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._failures.keep_running, args=("unwind tables", self._run),
                                            name="bpfprof-unwind-tables", daemon=True)
            self._thread.start()
        self._todo.put(obj)

    def stop(self) -> None:
        """The thread ends after the table it may be building (it is a daemon: nobody waits)."""
        self._todo.put(None)

    def _run(self) -> None:
        while True:
            obj = self._todo.get()
            if obj is None:
                return
            # A binary whose table fails to build has none (frame pointers there): it is
            # told as built either way, so that it is never left waiting.
            table: Optional[UnwindTable] = None
            opened = True
            with self._failures.contain("binary", obj.path):
                table, opened = self._build(obj)
            self._on_built(obj.file_id, table, opened)

    def _build(self, obj: ObjectFile) -> Tuple[Optional[UnwindTable], bool]:
        """The binary's table (None if it has none) and whether it could be opened."""
        fd = self._open_binary(obj)
        if fd is None:
            return None, False
        try:
            table = open_unwind_table(f"/proc/self/fd/{fd}", self._cache_dir)
        finally:
            os.close(fd)
        if table.unreadable_fdes:  # the rest of its rows stand
            self._failures.add("binary", obj.path, MalformedInput(
                f"{table.unreadable_fdes} unreadable entries in its unwind tables"))
        return table, True


class NativeUnwinding:
    """Call on_snapshot() for every fresh read of a process and forget() when it execs or
    exits; tables come in on the builder's thread, hence the lock."""

    def __init__(self, sampler: Sampler, native: NativeSymbolizer, failures: Failures,
                 cache_dir: Optional[str] = None) -> None:
        self._sampler = sampler
        self._lock = threading.Lock()
        self._closed = False
        self._builder = _TableBuilder(cache_dir, native.open_binary, self._on_built, failures)
        self._building: Dict[FileId, Set[int]] = {}  # binaries being built -> pids waiting for them
        self._rows = RunAllocator(sampler.config.unwind_rows)
        self._mappings = RunAllocator(sampler.config.unwind_mappings)
        self._by_file: Dict[FileId, Optional[_LoadedTable]] = {}  # None: no table for this file
        self._by_identity: Dict[ContentIdentity, _LoadedTable] = {}  # shared between files of equal content
        self._idle: "OrderedDict[int, _LoadedTable]" = OrderedDict()  # loaded, no users; oldest first
        self._processes: Dict[int, _InstalledProcess] = {}
        self._num_processes = 0
        self._skipped: Set[int] = {os.getpid()}

    def skip_until_exec(self, pid: int) -> None:
        """A copy of this process (a command forked, not yet exec'd): no tables for it."""
        with self._lock:
            self._skipped.add(pid)

    def on_snapshot(self, process: Process) -> None:
        """A fresh read of the process's maps: its mappings replace those installed."""
        with self._lock:
            self._install(process)

    def forget(self, pid: int) -> None:
        """The process exec'd or exited: its mappings are stale."""
        with self._lock:
            self._sampler.clear_unwind_process(pid)
            self._release(pid)
            self._skipped.discard(pid)

    def stats(self) -> UnwindStats:
        with self._lock:
            binaries = len({t.first_row for t in self._by_file.values() if t is not None})
            return UnwindStats(self._rows.capacity, self._rows.num_used, binaries, self._num_processes,
                               self._sampler.config.unwind_memory_bytes())

    def close(self) -> None:
        """Before the sampler closes: no table is loaded or installed after this returns."""
        with self._lock:
            self._closed = True
        self._builder.stop()

    def _install(self, process: Process) -> None:
        mappings = process.mappings[:UNWIND_MAPPINGS_SEARCHED]
        if not mappings or process.pid in self._skipped:
            return
        records = self._sampler.new_unwind_mappings(len(mappings))
        tables: List[_LoadedTable] = []
        for record, mapping in zip(records, mappings):
            record.start, record.end = mapping.start, mapping.end
            table = self._table(mapping, process.pid)
            bias = _bias(table, mapping) if table is not None else None
            if bias is not None:
                record.bias = bias & 0xFFFFFFFFFFFFFFFF
                record.first_row, record.num_rows = table.first_row, table.num_rows
                tables.append(table)
        first = self._mappings.allocate(len(mappings))
        if first is None:
            return  # no room: the process keeps frame pointers
        self._sampler.write_unwind_mappings(first, records)
        for table in tables:
            self._use(table)
        self._sampler.set_unwind_process(process.pid, first, len(mappings))
        if process.pid not in self._processes:
            self._num_processes += 1
        self._release(process.pid)
        self._processes[process.pid] = _InstalledProcess(process, first, len(mappings), tables)

    def _on_built(self, file_id: FileId, table: Optional[UnwindTable], opened: bool) -> None:
        """On the builder's thread: load the table, install again the processes waiting for
        it. A binary gone before it could be opened is asked for again by the next process
        that maps it."""
        with self._lock:
            if self._closed:
                return
            waiting = self._building.pop(file_id, set())
            if not opened:
                return
            self._by_file[file_id] = self._load(table) if table is not None else None
            for pid in waiting:
                if pid in self._processes:
                    self._install(self._processes[pid].process)

    def _release(self, pid: int) -> None:
        installed = self._processes.pop(pid, None)
        if installed is None:
            return
        self._mappings.free(installed.first_mapping, installed.num_mappings)
        for table in installed.tables:
            table.users -= 1
            if table.users == 0:
                self._idle[table.first_row] = table

    def _use(self, table: _LoadedTable) -> None:
        table.users += 1
        self._idle.pop(table.first_row, None)

    def _table(self, mapping: Mapping, pid: int) -> Optional[_LoadedTable]:
        """The mapped binary's loaded table; None while it is being built (pid waits for
        it), or if it has none."""
        obj = mapping.obj
        if obj is None:
            return None
        if obj.file_id in self._by_file:
            return self._by_file[obj.file_id]
        if obj.file_id not in self._building:
            self._building[obj.file_id] = set()
            self._builder.submit(obj)
        self._building[obj.file_id].add(pid)
        return None

    def _load(self, table: UnwindTable) -> Optional[_LoadedTable]:
        """The table's rows placed in unwind_rows; None for a binary without rows (no
        .eh_frame or .debug_frame), with more than BPF searches, or with no room left."""
        shared = self._by_identity.get(table.identity)
        if shared is not None:  # a copy of the binary (another mount namespace, say)
            return shared
        if not table.num_rows() or table.num_rows() > UNWIND_ROWS_SEARCHED:
            return None
        first = self._rows.allocate(table.num_rows())
        while first is None and self._idle:
            self._evict(self._idle.popitem(last=False)[1])
            first = self._rows.allocate(table.num_rows())
        if first is None:
            return None
        self._sampler.write_unwind_rows(first, table.records())
        loaded = _LoadedTable(first, table.num_rows(), table.segments, table.identity)
        self._by_identity[table.identity] = loaded
        return loaded

    def _evict(self, table: _LoadedTable) -> None:
        self._rows.free(table.first_row, table.num_rows)
        del self._by_identity[table.identity]
        for file_id in [f for f, t in self._by_file.items() if t is table]:
            del self._by_file[file_id]


def _bias(table: _LoadedTable, mapping: Mapping) -> Optional[int]:
    """What to subtract from an address in the mapping to get the binary's virtual
    address; None if no segment of the binary holds the mapping's offset."""
    for p_offset, p_filesz, p_vaddr in table.segments:
        if p_offset - p_offset % 4096 <= mapping.offset < p_offset + p_filesz:
            return mapping.start - mapping.offset + p_offset - p_vaddr
    return None
