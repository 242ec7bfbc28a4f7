"""A CPython process's threads and their Python frames, read from its memory as the BPF
walker reads them, and what that walker needs to know of the process (struct
python_process in bpf/common.h)."""

from __future__ import annotations

import os
import re
import struct
from typing import Dict, Iterator, List, Optional, Tuple

from bpfprof.bpf import define, enum_names
from bpfprof.symbolizer.errors import Unsupported
from bpfprof.symbolizer.interpreters.python.code_objects import check_of
from bpfprof.symbolizer.interpreters.python.layouts import (
    DEBUG_OFFSETS_COOKIE,
    DEBUG_OFFSETS_SIZE,
    PythonLayout,
    debug_offsets_free_threaded,
    layout_for,
    parse_debug_offsets,
)
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory

# The executable of a static build, or libpython: named python3.12, libpython3.12.so...
# The letters after the version are the ABI flags: t free-threaded (python3.13t,
# libpython3.14td.so), d debug, m pymalloc (<= 3.7: libpython3.6m.so).
INTERPRETER_NAME = re.compile(r"^(?:lib)?python(\d)\.(\d+)([a-z]*)")
# The data symbol whose address a process's `runtime` is, the first the interpreter has:
# _PyRuntime (3.7+), or 3.6's interp_head (static in pystate.c, so in .symtab only),
# which holds the head of the interpreter list itself.
RUNTIME_SYMBOLS = ("_PyRuntime", "interp_head")
FRAME_CHAINS = enum_names("python_frame_chain")
FRAME_ENTRY = define("PYTHON_FRAME_ENTRY")
FRAME_SHIM = define("PYTHON_FRAME_SHIM")
OWNED_BY_SHIM = define("PYTHON_OWNED_BY_SHIM")
STACK_DEPTH = define("PYTHON_STACK_DEPTH")
MAX_INTERPRETERS = 64
MAX_THREADS = 4096
_PTHREAD_SEARCH = 1024  # bytes of a pthread struct searched for the thread's tid

ThreadState = Tuple[int, int, int]  # (PyThreadState address, pthread_t, tid or 0)
RawFrame = Tuple[int, int, int, int]  # struct python_frame: code, instr, check, flags


def layout_of(memory: ProcessMemory, runtime: int, version_address: Optional[int],
              path: str) -> Optional[PythonLayout]:
    """From 3.13 on _PyRuntime starts with _Py_DebugOffsets; before, the table by version
    (Py_Version's, else the binary's name). Raises Unsupported for a free-threaded build."""
    match = INTERPRETER_NAME.match(os.path.basename(path))
    debug_offsets = None
    if memory.read(runtime, len(DEBUG_OFFSETS_COOKIE)) == DEBUG_OFFSETS_COOKIE:
        debug_offsets = memory.read(runtime, DEBUG_OFFSETS_SIZE)
    if is_free_threaded(match.group(3) if match else "", debug_offsets):
        # Its threads run bytecode from copies of their own and its objects are laid out
        # otherwise; reading it as a GIL build would name frames wrongly.
        raise Unsupported("a free-threaded build, whose Python frames are not read")
    if debug_offsets is not None:
        return parse_debug_offsets(debug_offsets)
    if version_address is not None:
        hex_version = memory.u32(version_address)
        return layout_for((hex_version >> 24, (hex_version >> 16) & 0xFF))
    return layout_for((int(match.group(1)), int(match.group(2)))) if match else None


def is_free_threaded(abi_flags: str, debug_offsets: Optional[bytes]) -> bool:
    """Whether an interpreter is a free-threaded build: its name's ABI flags say so (t), or
    its _Py_DebugOffsets do (every free-threaded build has them: they exist from 3.13 on)."""
    return "t" in abi_flags or (debug_offsets is not None and debug_offsets_free_threaded(debug_offsets))


def interpreters(memory: ProcessMemory, layout: PythonLayout, runtime: int) -> Iterator[int]:
    """The PyInterpreterState addresses of a process (`runtime` is the address of its
    `_PyRuntime`, or 3.6's `interp_head`), newest first, so the main interpreter last; at most MAX_INTERPRETERS
    (garbage can make the list circular). Each is read when asked for; a read that fails
    raises UnreadableMemory."""
    interp = memory.pointer(runtime + layout.runtime_interpreters_head)
    for _ in range(MAX_INTERPRETERS):
        if not interp:
            return
        yield interp
        interp = memory.pointer(interp + layout.interp_next)


def thread_states(memory: ProcessMemory, layout: PythonLayout, runtime: int) -> List[ThreadState]:
    """Every thread state of every interpreter, newest first; tids from 3.11's
    native_thread_id (0 before: see learn_pthread_tid_offset). A list that changes or
    ends under the walk gives what was read."""
    states: List[ThreadState] = []
    try:
        for interp in interpreters(memory, layout, runtime):
            tstate = memory.pointer(interp + layout.interp_threads_head)
            while tstate and len(states) < MAX_THREADS:
                tid = memory.u32(tstate + layout.tstate_native_thread_id) if layout.tstate_native_thread_id >= 0 else 0
                states.append((tstate, memory.pointer(tstate + layout.tstate_thread_id), tid))
                tstate = memory.pointer(tstate + layout.tstate_next)
    except UnreadableMemory:
        pass
    return states


def learn_pthread_tid_offset(memory: ProcessMemory, pid: int, idents: List[int]) -> Optional[int]:
    """Where the C library keeps a thread's tid in its pthread struct (<= 3.10 thread states
    hold only the pthread_t): the offset at which every struct holds a distinct tid of the
    process, the main thread's being the pid. The structs are read before the tasks are
    listed, so that a thread cloned in between is listed; a struct whose thread is not
    cloned yet holds 0 there."""
    structs = [memory.read(ident, _PTHREAD_SEARCH) for ident in idents]
    tasks = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    for offset in range(0, _PTHREAD_SEARCH, 4):
        tids = [struct.unpack_from("<i", data, offset)[0] for data in structs]
        cloned = [tid for tid in tids if tid]
        if pid in tids and set(cloned) <= tasks and len(set(cloned)) == len(cloned):
            return offset
    return None


def _s32(value: int) -> int:
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


def walk_frames(memory: ProcessMemory, layout: PythonLayout, tstate: int) -> List[RawFrame]:
    """A thread's Python frames, leaf first, as the BPF walker records them, up to one more
    than a stack holds (which tells it was truncated); for a thread whose frames stay put
    while they are read: one off the CPU."""
    frame = memory.pointer(tstate + layout.tstate_frame)
    if layout.cframe_current_frame >= 0 and frame:
        frame = memory.pointer(frame + layout.cframe_current_frame)
    objects = layout.version <= (3, 10)  # every frame object is an eval loop entry; f_lasti an int
    frames: List[RawFrame] = []
    while frame and len(frames) <= STACK_DEPTH:
        code = memory.pointer(frame + layout.frame_code) & ~3  # 3.14 tags f_executable's low bits
        if objects:
            instr = memory.s32(frame + layout.frame_instr)
        else:
            instr = _s32(memory.pointer(frame + layout.frame_instr) - code)
        owner = memory.read(frame + layout.frame_owner, 1)[0] if layout.frame_owner >= 0 else 0
        entry = memory.read(frame + layout.frame_is_entry, 1)[0] if layout.frame_is_entry >= 0 else 0
        check = check_of(memory.s32(code + layout.code_firstlineno), memory.pointer(code + layout.code_name))
        flags = (FRAME_SHIM if owner >= OWNED_BY_SHIM else 0) | (FRAME_ENTRY if objects or entry else 0)
        frames.append((code, instr, check, flags))
        frame = memory.pointer(frame + layout.frame_previous)
    return frames


def walker_fields(layout: PythonLayout, runtime: int, pthread_tid_offset: Optional[int]) -> Dict[str, int]:
    """struct python_process for one process."""
    if layout.version <= (3, 10):
        chain = "PYTHON_FRAME_OBJECTS"
    elif layout.cframe_current_frame >= 0:
        chain = "PYTHON_CFRAME"
    else:
        chain = "PYTHON_CURRENT_FRAME"
    return {
        "runtime": runtime,
        "runtime_interpreters_head": layout.runtime_interpreters_head,
        "interp_next": layout.interp_next,
        "interp_threads_head": layout.interp_threads_head,
        "tstate_next": layout.tstate_next,
        "tstate_thread_id": layout.tstate_thread_id,
        "tstate_native_thread_id": layout.tstate_native_thread_id,
        "pthread_tid": -1 if pthread_tid_offset is None else pthread_tid_offset,
        "frame_chain": FRAME_CHAINS[chain],
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
