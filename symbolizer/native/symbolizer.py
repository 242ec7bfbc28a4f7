"""Native addresses to frames: binaries kept reachable when first mapped, symbols cached per file.

A binary is kept open from when a process is seen mapping it until its symbols are read,
so that it can be read after the process exits; at most MAX_OPEN_FILES descriptors are
kept, counting the symbols that read their file's lines lazily, the least recently used
closed first. A binary no longer kept is opened again through a process that maps it."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.errors import SymbolizerError
from bpfprof.symbolizer.frames import Frame, FrameKind, Module
from bpfprof.symbolizer.native.content_identity import ContentIdentity
from bpfprof.symbolizer.native.elf import ElfSymbols, LoadedData, open_elf_symbols, read_exported_data
from bpfprof.symbolizer.safe_open import open_in_root, open_regular

FileId = Tuple[int, int, int]  # (device major, device minor, inode) as /proc/PID/maps gives them

# A binary's symbols that name no new address for this long are closed (read again if one
# comes): a whole-system agent sees most binaries briefly (a compiler's libraries, 4 MB of
# names for LLVM's, while it compiles), and their frames once named stay named.
IDLE_SYMBOLS_S = 180.0
MAX_OPEN_FILES = 256  # descriptors kept: binaries kept reachable and symbols that read lines lazily
MAX_BINARY = 4 << 30  # bytes of a binary that is read
# Bytes all binaries' symbols and lines may hold: one binary holds at most 32 MiB of names
# (elf.MAX_NAME_BYTES), libpython3.12 with the lines of most of its units 2.4 MiB.
MAX_SYMBOL_BYTES = 128 << 20
# Named frames kept (about 35 MiB of them), least recently used out first: a frame dropped
# is named again from its binary's symbols if it comes again.
MAX_FRAMES = 1 << 16


@dataclass(frozen=True)
class ObjectFile:
    """A binary as one process maps it."""

    file_id: FileId
    path: str  # as the process names it
    open_path: str  # opens it while the process lives (/proc/PID/map_files/...)
    root: str  # the process's filesystem root, where its debug files are


def _open_same_file(obj: ObjectFile) -> Optional[int]:
    """An fd of the mapped file: through the process's map_files while it lives, else by
    path (resolved in its root, then in ours) if that path still names the same device
    and inode. None if neither opens a regular file of an accepted size."""
    try:
        return open_regular(obj.open_path, MAX_BINARY)
    except (OSError, SymbolizerError):
        pass
    for root in (obj.root, "/"):
        try:
            fd = open_in_root(root, obj.path, MAX_BINARY)
        except (OSError, SymbolizerError):
            continue
        st = os.fstat(fd)
        if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) == obj.file_id:
            return fd
        os.close(fd)
    return None


class NativeSymbolizer:
    """Names native frames. Call keep_reachable() when a mapping is first seen: the
    binary stays readable after its process exits or its file is replaced."""

    def __init__(self, data_names: Tuple[str, ...] = (), failures: Optional[Failures] = None) -> None:
        self._data_names = data_names  # data objects whose addresses callers need
        self._failures = failures or Failures()
        self._lock = threading.Lock()  # over _fds: open_binary() is called from other threads
        self._fds: "OrderedDict[FileId, Tuple[int, float]]" = OrderedDict()  # kept -> (fd, last use); LRU first
        self._symbols: Dict[FileId, Optional[ElfSymbols]] = {}
        self._used: Dict[FileId, float] = {}  # binaries with symbols -> when last asked for them
        self._exported: Dict[FileId, Optional[LoadedData]] = {}
        self._by_identity: Dict[ContentIdentity, ElfSymbols] = {}  # shared between files of equal content
        self._modules: Dict[FileId, Module] = {}
        # Least recently used first: looked up for every native frame of every stack drained,
        # so an OrderedDict (a hit costs a C call more than a dict's) rather than LruCache.
        self._frames: "OrderedDict[Tuple[FileId, int], Frame]" = OrderedDict()

    def keep_reachable(self, obj: ObjectFile) -> None:
        # Once its symbols are read (or known unreadable) a binary need not be kept.
        if obj.file_id in self._symbols:
            return
        with self._lock:
            if self._touch(obj.file_id) is not None:
                return
        fd = _open_same_file(obj)
        if fd is not None:
            with self._lock:
                self._fds[obj.file_id] = (fd, time.monotonic())
            self._make_room()

    def open_binary(self, obj: ObjectFile) -> Optional[int]:
        """A descriptor of the binary for the caller to close (a copy of the one kept, else
        opened again through the process); None if it cannot be opened. Safe from any thread."""
        with self._lock:
            fd = self._touch(obj.file_id)
            if fd is not None:
                return os.dup(fd)
        return _open_same_file(obj)

    def num_open_files(self) -> int:
        """Descriptors held: binaries kept reachable, and symbols that read their lines lazily."""
        with self._lock:
            kept = len(self._fds)
        return kept + len({id(s) for s in self._symbols.values() if s is not None and s.has_open_file()})

    def _touch(self, file_id: FileId) -> Optional[int]:
        """The fd kept of the binary, now its most recently used; with the lock held."""
        kept = self._fds.get(file_id)
        if kept is None:
            return None
        self._fds[file_id] = (kept[0], time.monotonic())
        self._fds.move_to_end(file_id)
        return kept[0]

    def _release(self, file_id: FileId) -> None:
        with self._lock:
            kept = self._fds.pop(file_id, None)
            if kept is not None:
                os.close(kept[0])

    def _make_room(self) -> None:
        """Close the least recently used of the binaries kept and the symbols holding their
        file until at most MAX_OPEN_FILES descriptors are held."""
        while self.num_open_files() > MAX_OPEN_FILES:
            with self._lock:
                oldest_kept = next(iter(self._fds.items()), None)
            holding: Dict[int, Tuple[float, List[FileId]]] = {}  # symbols -> (last use, binaries sharing them)
            for file_id, used in self._used.items():
                symbols = self._symbols[file_id]
                if symbols.has_open_file():
                    last, sharing = holding.get(id(symbols), (used, []))
                    holding[id(symbols)] = (max(last, used), sharing + [file_id])
            oldest_symbols = min(holding.values(), default=None)
            if oldest_kept is not None and (oldest_symbols is None or oldest_kept[1][1] <= oldest_symbols[0]):
                self._release(oldest_kept[0])
            elif oldest_symbols is not None:
                self._close_symbols(oldest_symbols[1])
            else:
                return

    def get_exported_data(self, obj: ObjectFile) -> Optional[LoadedData]:
        """The data objects asked for at construction that the binary exports, read
        without its function symbols (much sooner); None when it cannot be read."""
        if obj.file_id in self._symbols:
            return self._symbols[obj.file_id]
        if obj.file_id not in self._exported:
            self.keep_reachable(obj)
            fd = self.open_binary(obj)
            exported = None
            if fd is not None:
                with self._failures.contain("binary", obj.path):
                    exported = read_exported_data(f"/proc/self/fd/{fd}", self._data_names)
                os.close(fd)
            self._exported[obj.file_id] = exported
        return self._exported[obj.file_id]

    def get_symbols(self, obj: ObjectFile) -> Optional[ElfSymbols]:
        if obj.file_id in self._used:
            self._used[obj.file_id] = time.monotonic()
        if obj.file_id in self._symbols:
            return self._symbols[obj.file_id]
        symbols = None
        fd = self.open_binary(obj)
        if fd is None:
            self._failures.add("binary", obj.path, FileNotFoundError("gone before it could be opened"))
        else:
            with self._failures.contain("binary", obj.path):
                symbols = open_elf_symbols(f"/proc/self/fd/{fd}", obj.path, obj.root, self._data_names)
            os.close(fd)
            if symbols is not None:
                self._tell_problems(obj, symbols)
                # Copies of one binary (and debug file) in two mount namespaces share one
                # ElfSymbols; a file that only claims another's build ID gets its own. So
                # does one whose lines are read later from its file: whoever owns that file
                # could rewrite it after its identity was taken.
                shared = None if symbols.has_open_file() else self._by_identity.get(symbols.identity)
                if shared is not None:
                    symbols.close()
                    symbols = shared
                elif not symbols.has_open_file():
                    self._by_identity[symbols.identity] = symbols
                self._used[obj.file_id] = time.monotonic()
        self._symbols[obj.file_id] = symbols
        self._modules[obj.file_id] = Module(obj.path, symbols.build_id if symbols else "")
        self._release(obj.file_id)  # read, or known unreadable: nothing needs it kept
        self._make_room()
        self._keep_within_bytes(obj.file_id)
        return symbols

    def _keep_within_bytes(self, reading: Optional[FileId] = None) -> None:
        """Close the least recently used symbols, never those just read, while all of them
        hold more than MAX_SYMBOL_BYTES (a new address in one reads it again, as after
        close_idle)."""
        for file_id in sorted(self._used, key=self._used.__getitem__):
            if self.num_bytes() <= MAX_SYMBOL_BYTES:
                return
            if file_id != reading:
                self._close_symbols([file_id])

    def _tell_problems(self, obj: ObjectFile, symbols: ElfSymbols) -> None:
        """Parts of the binary left out (lines malformed, symbols past their caps) count as failures."""
        for problem in symbols.take_problems():
            self._failures.add("binary", obj.path, problem)

    def num_binaries(self) -> int:
        """Binaries whose symbols are cached (or known unreadable)."""
        return len(self._symbols)

    def num_frames(self) -> int:
        return len(self._frames)

    def num_bytes(self) -> int:
        """Bytes held by the symbols of the binaries cached (each shared one once), about."""
        return sum(s.num_bytes() for s in {id(s): s for s in self._symbols.values() if s is not None}.values())

    def get_frame(self, obj: ObjectFile, file_offset: int) -> Frame:
        key = (obj.file_id, file_offset)
        frame = self._frames.get(key)
        if frame is not None:
            self._frames.move_to_end(key)
        else:
            symbols = self.get_symbols(obj)
            module = self._modules[obj.file_id]
            info = None
            if symbols is not None:
                with self._failures.contain("binary", obj.path):
                    info = symbols.get_function(file_offset)
                self._tell_problems(obj, symbols)
            if info is None:
                frame = Frame(FrameKind.NATIVE, f"[{os.path.basename(obj.path)}+{file_offset:#x}]", module, file_offset)
            else:
                frame = Frame(FrameKind.NATIVE, info.name, module, file_offset, info.file, info.line)
            self._frames[key] = frame
            if len(self._frames) > MAX_FRAMES:
                self._frames.popitem(last=False)
        return frame

    def drop_inflated(self) -> None:
        """Free the compressed debug sections inflated while naming frames: call when a
        batch of frames (a drain) is named, so each is inflated once a batch."""
        for symbols in {id(s): s for s in self._symbols.values() if s is not None}.values():
            symbols.drop_inflated()

    def close_idle(self, now: Optional[float] = None) -> None:
        """Close the symbols that no new frame asked for in IDLE_SYMBOLS_S, and the binaries
        kept but not asked for in that time (a new address in one reads it again, through a
        process that maps it), and the least recently used symbols past MAX_SYMBOL_BYTES.
        Binaries known unreadable stay so. Call it after each batch of frames."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle_kept = [file_id for file_id, (_, used) in self._fds.items() if now - used > IDLE_SYMBOLS_S]
        for file_id in idle_kept:
            self._release(file_id)
        self._close_symbols([file_id for file_id, used in self._used.items() if now - used > IDLE_SYMBOLS_S])
        self._keep_within_bytes()  # with the lines read since

    def _close_symbols(self, idle: List[FileId]) -> None:
        """Close these binaries' symbols, but for those shared with a binary still in use."""
        closing = {id(s): s for s in (self._symbols.pop(file_id) for file_id in idle)}
        for file_id in idle:
            del self._used[file_id]
        for symbols in self._symbols.values():  # shared with a copy still in use
            closing.pop(id(symbols), None)
        for symbols in closing.values():
            if self._by_identity.get(symbols.identity) is symbols:
                del self._by_identity[symbols.identity]
            symbols.close()

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()
        for symbols in self._symbols.values():
            if symbols is not None:
                symbols.close()
