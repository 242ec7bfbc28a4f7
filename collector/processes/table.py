"""Process table: /proc snapshots taken when a process is first seen, so that processes
that exit before the profile is written are still named and symbolized."""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from bpfprof.collector.processes.containers import Container, container_of
from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.errors import TooLarge
from bpfprof.symbolizer.native.symbolizer import NativeSymbolizer, ObjectFile

_LOOK_FOR_GONE_DRAINS = 10
# Bounds on what a process's /proc/PID/maps may cost, as any process can map one file
# tens of thousands of times under a long path. The largest processes have hundreds of
# executable mappings (one per library, a few for JIT code) and maps of a few hundred KB.
MAPS_BYTES_AT_MOST = 8 << 20
MAPPINGS_AT_MOST = 4096  # executable ones
PATH_CHARS_AT_MOST = 4096  # PATH_MAX; a longer name is cut (the file is still opened through map_files)
_READ_CHUNK = 256 << 10


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int  # file offset of `start`
    obj: Optional[ObjectFile]  # None for anonymous memory ([vdso], JIT code...)
    name: str  # path or pseudo-name like [vdso]


@dataclass
class Process:
    pid: int
    comm: str
    mappings: List[Mapping] = field(default_factory=list)  # executable ones, by start
    readable: bool = True
    exited: bool = False
    container: Optional[Container] = None  # None on the host
    maps_hash: int = 0  # of the /proc/PID/maps text the mappings were parsed from

    def __post_init__(self) -> None:
        self._starts = [m.start for m in self.mappings]

    def get_mapping(self, address: int) -> Optional[Mapping]:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self.mappings[i].end:
            return self.mappings[i]
        return None


def parse_maps(pid: int, text: str, root: str = "") -> Tuple[List[Mapping], bool]:
    """Executable mappings of /proc/PID/maps, sorted by start address: the first
    MAPPINGS_AT_MOST of them, and whether there were more."""
    mappings: List[Mapping] = []
    for line in text.split("\n"):  # the only line break: names may hold \r, \x1c, \u2028...
        parts = line.split(None, 5)
        if len(parts) < 5 or "x" not in parts[1]:
            continue
        if len(mappings) == MAPPINGS_AT_MOST:
            return mappings, True
        start, end = (int(a, 16) for a in parts[0].split("-"))
        major, minor = (int(n, 16) for n in parts[3].split(":"))
        inode = int(parts[4])
        # The name is the rest of the line, spaces included (the kernel escapes newlines).
        name = parts[5][:PATH_CHARS_AT_MOST] if len(parts) > 5 else ""
        obj = None
        if inode and name.startswith("/"):
            path = name[: -len(" (deleted)")] if name.endswith(" (deleted)") else name
            obj = ObjectFile(
                file_id=(major, minor, inode),
                path=path,
                open_path=f"/proc/{pid}/map_files/{start:x}-{end:x}",  # unpadded, unlike maps
                root=root or f"/proc/{pid}/root",
            )
            name = path
        mappings.append(Mapping(start, end, int(parts[2], 16), obj, name or "[anon]"))
    mappings.sort(key=lambda m: m.start)
    return mappings, False


def _decode(data: bytes) -> str:
    # A name is any bytes (a comm cut inside a UTF-8 character, a file named in Latin-1):
    # such a process is still profiled, with U+FFFD in its names.
    return data.decode("utf-8", errors="replace")


def _read(path: str) -> str:
    """A file the kernel keeps short (comm, cgroup)."""
    with open(path, "rb") as f:
        return _decode(f.read())


def read_maps(path: str) -> Tuple[str, bool]:
    """The whole lines of a maps file within its first MAPS_BYTES_AT_MOST bytes, and
    whether there was more (then the rest is not read)."""
    chunks: List[bytes] = []
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while size <= MAPS_BYTES_AT_MOST:
            chunk = os.read(fd, _READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if size <= MAPS_BYTES_AT_MOST:
        return _decode(data), False
    return _decode(data[: data.rfind(b"\n", 0, MAPS_BYTES_AT_MOST) + 1]), True


@dataclass(frozen=True)
class ProcFiles:
    """A process's comm, maps and cgroup as read at one moment."""

    comm: str
    maps: str  # whole lines, at most MAPS_BYTES_AT_MOST bytes of them
    cgroup: str = ""  # "" where it cannot be read: the process is taken as on the host
    maps_cut: bool = False  # maps was longer: the rest is left out
    root: str = "/"  # its filesystem root, as a path that still opens it after the process exits if it can


def process_root(pid: int, proc: str = "/proc") -> str:
    """Where the process's files are: "/" when its root is ours (found so after it exits
    too, with its debug files), else its root through /proc, in a container."""
    try:
        theirs, ours = os.stat(f"{proc}/{pid}/root"), os.stat("/")
    except OSError:
        return f"{proc}/{pid}/root"
    return "/" if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino) else f"{proc}/{pid}/root"


def read_proc_files(pid: int, proc: str = "/proc") -> Optional[ProcFiles]:
    try:
        comm = _read(f"{proc}/{pid}/comm").strip()
        maps, maps_cut = read_maps(f"{proc}/{pid}/maps")
    except OSError:
        return None
    try:
        cgroup = _read(f"{proc}/{pid}/cgroup")
    except OSError:
        cgroup = ""
    return ProcFiles(comm, maps, cgroup, maps_cut, process_root(pid, proc))


def _still_loading(process: Process) -> bool:
    """The dynamic loader is mapped but the C library it loads for nearly every program
    is not (executable) yet: taken in the middle of start-up."""
    names = [os.path.basename(m.name) for m in process.mappings]
    return any(n.startswith("ld-linux") for n in names) and not any(n.startswith("libc.so") for n in names)


class ProcessTable:
    """Snapshots of every profiled process, refreshed on exec and dropped after exit."""

    def __init__(self, native: NativeSymbolizer, proc: str = "/proc",
                 on_snapshot: Sequence[Callable[[Process], None]] = (),
                 see_again: Optional[Callable[[int], None]] = None, failures: Optional[Failures] = None):
        self._native = native
        self._failures = failures or Failures()
        self._on_snapshot = on_snapshot  # told of every fresh snapshot (to find CPython, to unwind)
        self._see_again = see_again  # asks for a process to be read again soon
        self._proc = proc
        self._processes: Dict[int, Process] = {}
        self._code_mapped: Set[int] = set()  # pids that mapped code since their snapshot, as the kernel said
        self._drains = 0
        self.num_seen = 0
        self.num_unreadable = 0  # processes gone before they could be read

    def snapshot(self, pid: int, comm: str = "", early: Optional[ProcFiles] = None) -> Process:
        """Take the process as read early (when its event arrived, milliseconds ago), else
        read it now, and keep its binaries reachable. If it can no longer be read, an
        earlier snapshot stands; without one it is marked unreadable."""
        earlier = self._processes.get(pid)
        files = early or read_proc_files(pid, self._proc)
        if files is not None:
            mappings, too_many = parse_maps(pid, files.maps, files.root)
            process = Process(pid, files.comm or comm, mappings, container=container_of(files.cgroup),
                              maps_hash=hash(files.maps))
            if files.maps_cut or too_many:
                # The mappings within the bounds are kept: the executable and the libraries
                # at addresses below the excess are still named; the rest of its code
                # shows as unmapped addresses.
                excess = (f"maps of more than {MAPS_BYTES_AT_MOST} bytes" if files.maps_cut
                          else f"more than {MAPPINGS_AT_MOST} executable mappings")
                self._failures.add("process", str(pid), TooLarge(f"{excess}; the first {len(mappings)} are kept"))
        elif earlier is not None:
            return earlier
        else:
            process = Process(pid, comm, readable=False)
            self.num_unreadable += 1
        for m in process.mappings:
            if m.obj is not None:
                self._native.keep_reachable(m.obj)
        if earlier is None:
            self.num_seen += 1
        if self._see_again is not None and _still_loading(process):
            self._see_again(pid)
        self._processes[pid] = process
        self._code_mapped.discard(pid)
        if process.readable:
            for told in self._on_snapshot:
                told(process)
        return process

    def on_exec(self, pid: int) -> None:
        """The process's snapshot is stale; its next sample (PROCESS_SEEN) takes a new one."""
        self._processes.pop(pid, None)
        self._code_mapped.discard(pid)

    def on_code_mapped(self, pids: Iterable[int]) -> None:
        """These processes mapped code (or made memory executable) since they were read."""
        self._code_mapped.update(pid for pid in pids if pid in self._processes)

    def on_exit(self, pid: int) -> None:
        process = self._processes.get(pid)
        if process is not None:
            process.exited = True

    def get(self, pid: int, comm_hint: str = "") -> Process:
        process = self._processes.get(pid)
        return process if process is not None else self.snapshot(pid, comm_hint)

    def get_mapping(self, pid: int, address: int) -> Optional[Mapping]:
        """The mapping holding address; when it is in none, a live process that mapped
        code since its snapshot (a library it loaded) is read again, once for each time
        it did. Mostly such an address is no code at all (a frame pointer that is not one)."""
        process = self.get(pid)
        mapping = process.get_mapping(address)
        if mapping is None and not process.exited and pid in self._code_mapped:
            self._code_mapped.discard(pid)
            files = read_proc_files(pid, self._proc)
            if files is not None and hash(files.maps) != process.maps_hash:
                mapping = self.snapshot(pid, process.comm, files).get_mapping(address)
        return mapping

    def num_live(self) -> int:
        return len(self._processes)

    def exited(self) -> List[int]:
        """Processes whose exit has been seen. Their last samples are in the buffer the
        next drain reads: pass these to end_drain after it."""
        return [pid for pid, p in self._processes.items() if p.exited]

    def end_drain(self, exited: List[int]) -> List[int]:
        """Forget the processes that had exited before the drain began (unless the pid
        has since been taken by a new process), and say which were forgotten. Every
        _LOOK_FOR_GONE_DRAINS drains, a process no longer in /proc is taken as exited:
        no exit event comes for one that was read for a sample drained after its exec, or
        after the kernel forgot having told us of it."""
        gone = [pid for pid in exited if pid in self._processes and self._processes[pid].exited]
        for pid in gone:
            del self._processes[pid]
            self._code_mapped.discard(pid)
        self._drains += 1
        if self._drains % _LOOK_FOR_GONE_DRAINS == 0:
            for pid, process in self._processes.items():
                if not process.exited and not os.path.exists(f"{self._proc}/{pid}"):
                    process.exited = True
        return gone
