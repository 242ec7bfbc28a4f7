"""CPython frames named from the code objects the BPF walker saw: qualname, file and the
line of the current instruction, read from the process's memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from bpfprof.symbolizer.frames import Frame, FrameKind
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory
from bpfprof.symbolizer.interpreters.python.layouts import PythonLayout
from bpfprof.symbolizer.interpreters.python.lines import line_for_offset
from bpfprof.symbolizer.interpreters.python.objects import read_str

# The eval loop: each call of it runs one group of Python frames.
EVAL_FUNCTIONS = frozenset({"_PyEval_EvalFrameDefault"})
TRUNCATED = Frame(FrameKind.PYTHON, "[more Python frames]")
_MAX_STRING = 4096          # characters kept of a qualname or file name (a longer one is cut)
_MAX_LINE_TABLE = 1 << 20


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


class PythonSymbolizer:
    """Frames for (process, code object, instruction), cached per process and code object.

    Code objects are best read as soon as the walker has seen them (`learn`, from the
    thread that hears of new stacks), while their process still runs; `get_frame` reads
    any it was not told of. Each cache entry is set whole, so the two may run at once."""

    def __init__(self) -> None:
        self._code: Dict[int, Dict[Tuple[int, int], Optional[CodeInfo]]] = {}
        self._frames: Dict[int, Dict[Tuple[int, int, int], Frame]] = {}

    def learn(self, memory: ProcessMemory, layout: PythonLayout, code: int, check: int) -> Optional[CodeInfo]:
        codes = self._code.setdefault(memory.pid, {})
        if (code, check) not in codes:
            try:
                codes[(code, check)] = read_code(memory, layout, code, check)
            except UnreadableMemory:
                codes[(code, check)] = None
        return codes[(code, check)]

    def get_frame(self, memory: ProcessMemory, layout: PythonLayout, code: int, instr: int, check: int) -> Frame:
        frames = self._frames.setdefault(memory.pid, {})
        frame = frames.get((code, check, instr))
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
        frames[(code, check, instr)] = frame
        return frame

    def forget(self, pid: int) -> None:
        """A process is gone: its code addresses may be reused by another."""
        self._code.pop(pid, None)
        self._frames.pop(pid, None)
