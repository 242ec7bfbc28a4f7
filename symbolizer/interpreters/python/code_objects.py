"""CPython frames named from the code objects the BPF walker saw: qualname, file and the
line of the current instruction, read from the process's memory."""

from __future__ import annotations

import dataclasses
import sys
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from bpfprof.symbolizer.frames import Frame, FrameKind
from bpfprof.symbolizer.lru import LruCache
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory
from bpfprof.symbolizer.interpreters.python.layouts import PythonLayout
from bpfprof.symbolizer.interpreters.python.lines import line_for_offset
from bpfprof.symbolizer.interpreters.python.objects import read_str

# The eval loop: each call of it runs one group of Python frames.
EVAL_FUNCTIONS = frozenset({"_PyEval_EvalFrameDefault"})
TRUNCATED = Frame(FrameKind.PYTHON, "[more Python frames]")
_MAX_STRING = 4096          # characters kept of a qualname or file name (a longer one is cut)
_MAX_LINE_TABLE = 1 << 20
# Bytes the caches of all processes' code objects and frames hold at most, about.
MAX_CODE_BYTES = 32 << 20
MAX_FRAME_BYTES = 16 << 20
_ENTRY_BYTES = 400  # of a cache entry past its strings and line table: key, object, links
_UNREAD = object()


@dataclass(frozen=True)
class CodeInfo:
    qualname: str
    filename: str
    firstlineno: int
    linetable: bytes


def check_of(firstlineno: int, name_address: int) -> int:
    """The code-object hash the BPF walker takes (struct python_frame.check)."""
    return (firstlineno ^ (name_address >> 4) ^ (name_address >> 20)) & 0xFFFF


def _read_bytes(memory: ProcessMemory, layout: PythonLayout, address: int) -> bytes:
    size = memory.s64(address + layout.bytes_size)
    if not 0 <= size <= _MAX_LINE_TABLE:
        raise UnreadableMemory(f"not a bytes object at {address:#x}")
    return memory.read(address + layout.bytes_data, size)


def read_code(memory: ProcessMemory, layout: PythonLayout, address: int, check: int) -> Optional[CodeInfo]:
    """The code object at address if it is still the one the walker hashed, else None."""
    firstlineno = memory.s32(address + layout.code_firstlineno)
    name = memory.pointer(address + layout.code_name)
    if check_of(firstlineno, name) != check:
        return None
    qualname_address = memory.pointer(address + layout.code_qualname) if layout.code_qualname >= 0 else name
    return CodeInfo(
        qualname=read_str(memory, layout, qualname_address, _MAX_STRING),
        filename=read_str(memory, layout, memory.pointer(address + layout.code_filename), _MAX_STRING),
        firstlineno=firstlineno,
        linetable=_read_bytes(memory, layout, memory.pointer(address + layout.code_linetable)),
    )


def instruction_offset(layout: PythonLayout, instr: int) -> int:
    """The walker's instr value as a byte offset into the bytecode."""
    if layout.version >= (3, 11):
        return instr - layout.code_adaptive  # instruction address - code object address
    if layout.version == (3, 10):
        return instr * 2  # f_lasti counts code units
    return instr  # f_lasti is a byte offset


class _LineTables:
    """Line tables by content: each is held once however many code objects share it (a
    process may make hundreds share one of a megabyte), and let go with its last holder."""

    def __init__(self) -> None:
        self._held: Dict[bytes, List] = {}  # table -> [the table held, its holders]
        self.num_bytes = 0

    def intern(self, table: bytes) -> bytes:
        held = self._held.get(table)
        if held is None:
            held = self._held[table] = [table, 0]
            self.num_bytes += sys.getsizeof(table)
        held[1] += 1
        return held[0]

    def release(self, table: bytes) -> None:
        held = self._held[table]
        held[1] -= 1
        if not held[1]:
            del self._held[table]
            self.num_bytes -= sys.getsizeof(table)


def _code_cost(info: Optional[CodeInfo]) -> int:
    """Bytes of a code cache entry but its line table (counted once per table)."""
    if info is None:
        return _ENTRY_BYTES
    return _ENTRY_BYTES + sys.getsizeof(info.qualname) + sys.getsizeof(info.filename)


def _frame_cost(frame: Frame) -> int:
    """Bytes of a frame cache entry, its strings counted as its own: a frame keeps them
    alive after its code object has left the code cache."""
    return _ENTRY_BYTES + sys.getsizeof(frame.name) + sys.getsizeof(frame.file)


class PythonSymbolizer:
    """Frames for (process, code object, instruction), cached per process and code object.

    Code objects are best read as soon as the walker has seen them (`learn`, from the
    thread that hears of new stacks), while their process still runs; `get_frame` reads
    any it was not told of. Both caches are bounded by bytes and drop the least recently
    used first: a code object dropped is read again if it is seen again."""

    def __init__(self, max_code_bytes: int = MAX_CODE_BYTES, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._max_code_bytes = max_code_bytes
        self._max_frame_bytes = max_frame_bytes
        self._lock = threading.Lock()  # learn and get_frame run on two threads
        self._tables = _LineTables()
        # pid -> (code, check) -> the code object, None when it could not be read
        self._code: LruCache[Tuple[int, int], Optional[CodeInfo]] = LruCache(_code_cost, self._release)
        self._frames: LruCache[Tuple[int, int, int], Frame] = LruCache(_frame_cost)  # pid -> (code, check, instr)

    def _release(self, info: Optional[CodeInfo]) -> None:
        if info is not None:
            self._tables.release(info.linetable)

    def num_bytes(self) -> int:
        """Bytes held by both caches, about."""
        with self._lock:
            return self._code_bytes() + self._frames.total_cost

    def _code_bytes(self) -> int:
        return self._code.total_cost + self._tables.num_bytes

    def learn(self, memory: ProcessMemory, layout: PythonLayout, code: int, check: int) -> Optional[CodeInfo]:
        with self._lock:
            known = self._code.get(memory.pid, (code, check), _UNREAD)
        if known is not _UNREAD:
            return known
        try:
            info = read_code(memory, layout, code, check)
        except UnreadableMemory:
            info = None
        with self._lock:
            if info is not None:
                info = dataclasses.replace(info, linetable=self._tables.intern(info.linetable))
            self._code.put(memory.pid, (code, check), info)
            while self._code_bytes() > self._max_code_bytes and len(self._code) > 1:
                self._code.drop_oldest()
        return info

    def get_frame(self, memory: ProcessMemory, layout: PythonLayout, code: int, instr: int, check: int) -> Frame:
        with self._lock:
            frame = self._frames.get(memory.pid, (code, check, instr))
        if frame is not None:
            return frame
        info = self.learn(memory, layout, code, check)
        if info is None:
            # The process exited, or the code object was freed, before it could be read.
            frame = Frame(FrameKind.PYTHON, "[unknown Python code]")
        else:
            offset = instruction_offset(layout, instr)
            line = line_for_offset(layout.version, info.linetable, info.firstlineno, offset)
            frame = Frame(FrameKind.PYTHON, info.qualname, None, 0, info.filename, line, info.firstlineno)
        with self._lock:
            self._frames.put(memory.pid, (code, check, instr), frame)
            while self._frames.total_cost > self._max_frame_bytes and len(self._frames) > 1:
                self._frames.drop_oldest()
        return frame

    def forget(self, pid: int) -> None:
        """A process is gone: its code addresses may be reused by another."""
        with self._lock:
            self._code.forget(pid)
            self._frames.forget(pid)
