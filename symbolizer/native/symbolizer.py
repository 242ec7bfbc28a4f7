"""Native addresses to frames: binaries kept reachable when first mapped, symbols cached per file."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.errors import MalformedInput
from bpfprof.symbolizer.frames import Frame, FrameKind, Module
from bpfprof.symbolizer.native.elf import ElfSymbols, LoadedData, open_elf_symbols, read_exported_data

FileId = Tuple[int, int, int]  # (device major, device minor, inode) as /proc/PID/maps gives them

# A binary's symbols that name no new address for this long are closed (read again if one
# comes): a whole-system agent sees most binaries briefly (a compiler's libraries, 4 MB of
# names for LLVM's, while it compiles), and their frames once named stay named.
IDLE_SYMBOLS_S = 180.0


@dataclass(frozen=True)
class ObjectFile:
    """A binary as one process maps it."""

    file_id: FileId
    path: str  # as the process names it
    open_path: str  # opens it while the process lives (/proc/PID/map_files/...)
    root: str  # the process's filesystem root, where its debug files are


def _open_same_file(obj: ObjectFile) -> Optional[int]:
    """An fd of the mapped file: through the process's map_files while it lives, else by
    path (in its root, then in ours) if that path still names the same device and inode."""
    try:
        return os.open(obj.open_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        pass
    for path in (os.path.join(obj.root, obj.path.lstrip("/")), obj.path):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
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
        self._fds: Dict[FileId, int] = {}
        self._roots: Dict[FileId, str] = {}
        self._symbols: Dict[FileId, Optional[ElfSymbols]] = {}
        self._used: Dict[FileId, float] = {}  # binaries with symbols -> when last asked for them
        self._exported: Dict[FileId, Optional[LoadedData]] = {}
        self._by_build_id: Dict[str, ElfSymbols] = {}
        self._modules: Dict[FileId, Module] = {}
        self._frames: Dict[Tuple[FileId, int], Frame] = {}

    def keep_reachable(self, obj: ObjectFile) -> None:
        # Once its symbols are read (or known unreadable) a binary need not be reopened.
        if obj.file_id not in self._fds and obj.file_id not in self._symbols:
            fd = _open_same_file(obj)
            if fd is not None:
                self._fds[obj.file_id] = fd
                self._roots[obj.file_id] = obj.root

    def get_open_path(self, obj: ObjectFile) -> Optional[str]:
        """A path that opens the binary (kept reachable), or None if it could not be kept."""
        self.keep_reachable(obj)
        fd = self._fds.get(obj.file_id)
        return f"/proc/self/fd/{fd}" if fd is not None else None

    def get_exported_data(self, obj: ObjectFile) -> Optional[LoadedData]:
        """The data objects asked for at construction that the binary exports, read
        without its function symbols (much sooner); None when it cannot be read."""
        if obj.file_id in self._symbols:
            return self._symbols[obj.file_id]
        if obj.file_id not in self._exported:
            path = self.get_open_path(obj)
            exported = None
            if path is not None:
                with self._failures.contain("binary", obj.path):
                    exported = read_exported_data(path, self._data_names)
            self._exported[obj.file_id] = exported
        return self._exported[obj.file_id]

    def get_symbols(self, obj: ObjectFile) -> Optional[ElfSymbols]:
        if obj.file_id in self._used:
            self._used[obj.file_id] = time.monotonic()
        if obj.file_id in self._symbols:
            return self._symbols[obj.file_id]
        symbols = None
        path = self.get_open_path(obj)
        if path is None:
            self._failures.add("binary", obj.path, FileNotFoundError("gone before it could be opened"))
        else:
            with self._failures.contain("binary", obj.path):
                symbols = open_elf_symbols(path, obj.path, self._roots[obj.file_id], self._data_names)
            if symbols is not None:
                self._tell_problems(obj, symbols)
                # The same binary seen through two mount namespaces is parsed once.
                shared = self._by_build_id.get(symbols.build_id) if symbols.build_id else None
                if shared is not None:
                    symbols.close()
                    symbols = shared
                elif symbols.build_id:
                    self._by_build_id[symbols.build_id] = symbols
                self._used[obj.file_id] = time.monotonic()
        self._symbols[obj.file_id] = symbols
        self._modules[obj.file_id] = Module(obj.path, symbols.build_id if symbols else "")
        return symbols

    def _tell_problems(self, obj: ObjectFile, symbols: ElfSymbols) -> None:
        """Parts of the binary left out as malformed (its lines, say) count as failures."""
        for problem in symbols.take_problems():
            self._failures.add("binary", obj.path, MalformedInput(problem))

    def num_binaries(self) -> int:
        """Binaries whose symbols are cached (or known unreadable)."""
        return len(self._symbols)

    def num_frames(self) -> int:
        return len(self._frames)

    def get_frame(self, obj: ObjectFile, file_offset: int) -> Frame:
        key = (obj.file_id, file_offset)
        frame = self._frames.get(key)
        if frame is None:
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
        return frame

    def drop_inflated(self) -> None:
        """Free the compressed debug sections inflated while naming frames: call when a
        batch of frames (a drain) is named, so each is inflated once a batch."""
        for symbols in {id(s): s for s in self._symbols.values() if s is not None}.values():
            symbols.drop_inflated()

    def close_idle(self, now: Optional[float] = None) -> None:
        """Close the symbols that no new frame asked for in IDLE_SYMBOLS_S (the binaries stay
        reachable: a new address in one reads them again). Binaries known unreadable stay so."""
        now = time.monotonic() if now is None else now
        idle = [file_id for file_id, used in self._used.items() if now - used > IDLE_SYMBOLS_S]
        closing = {id(s): s for s in (self._symbols.pop(file_id) for file_id in idle)}
        for file_id in idle:
            del self._used[file_id]
        for symbols in self._symbols.values():  # shared by build ID with a binary still in use
            closing.pop(id(symbols), None)
        for symbols in closing.values():
            if self._by_build_id.get(symbols.build_id) is symbols:
                del self._by_build_id[symbols.build_id]
            symbols.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for symbols in self._symbols.values():
            if symbols is not None:
                symbols.close()
