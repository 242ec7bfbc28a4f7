"""Where things are inside a running CPython, for reading its stacks from another process.

A profiler that walks a Python process's interpreter state from the outside follows
pointers: `_PyRuntime` (3.6: `interp_head`) -> interpreters -> thread states -> frames ->
code objects -> str and bytes objects. The byte offsets it needs depend on the CPython
minor version.

* 3.6 to 3.12: kept here as data, one `PythonLayout` per minor version (`LAYOUTS`),
  measured from each version's headers (tests/unit/test_python_layouts.py recompiles them).
* 3.13 and later: `_PyRuntime` opens with `_Py_DebugOffsets`, a table of offsets that
  CPython itself fills in for out-of-process tools. `parse_debug_offsets` decodes it from
  the first `DEBUG_OFFSETS_SIZE` bytes of `_PyRuntime` read out of the target; it is the
  only reader of that struct. What is kept here per minor version is only the order of
  the struct's members (its own layout changes between minor versions); a later minor
  version is read with the newest order, and checked.

Reading thread names takes more: sys.modules, module, type, dict, int and instance
attribute offsets. A layout's `objects` holds them (an `ObjectLayout`, from the table
`OBJECT_LAYOUTS`, 3.6 to 3.15); it is None for a version without an entry there.

All numbers are for x86-64 Linux release builds (no Py_DEBUG, no Py_TRACE_REFS).
A field that does not exist in a version holds -1 (`ABSENT`).

How the frame fields are meant to be read:

* <= 3.10: `tstate_frame` points at the current `PyFrameObject`; `frame_previous` is its
  `f_back`; `frame_instr` is the int `f_lasti`, a byte offset into the bytecode in 3.6 to
  3.9 but a count of 2-byte code units in 3.10.
* 3.11 and 3.12: `tstate_frame` points at a `_PyCFrame`, whose `cframe_current_frame` points
  at the `_PyInterpreterFrame`; `frame_instr` is a `_Py_CODEUNIT *` into the code object's
  `co_code_adaptive` (at `code_adaptive` inside the code object). In 3.11 `frame_is_entry`
  flags the first frame of each C-level call of the evaluation loop; in 3.12 that job falls
  to entry shim frames, whose `frame_owner` is 3 (FRAME_OWNED_BY_CSTACK).
* 3.13+: `tstate_frame` is `current_frame` and points at the `_PyInterpreterFrame`
  directly; `frame_code` is `f_executable` (a code object, or something else for frames
  that do not run Python code, so check its type); `frame_instr` is `instr_ptr`.
  Entry shim frames still have `frame_owner` 3 (FRAME_OWNED_BY_CSTACK), as in 3.12.
* 3.14: as 3.13, except that `f_executable` is a `_PyStackRef`, a tagged pointer whose
  low bits (mask 3 in default builds) must be cleared before it is followed, and that
  the owner enum gained FRAME_OWNED_BY_INTERPRETER = 3 (the entry shim frames now use
  it, so their owner is still 3) with FRAME_OWNED_BY_CSTACK moved to 4.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from bpfprof.symbolizer.errors import MalformedInput

ABSENT = -1

# How an instance keeps its attributes (ObjectLayout.instance_dict).
DICT_POINTER = "dict pointer"          # <= 3.10: a dict at obj + type->tp_dictoffset
VALUES_OR_DICT = "values or dict"      # 3.11: two pointers in front of the object
TAGGED_DICT_OR_VALUES = "tagged"       # 3.12: one pointer in front, low bit 1 = values
INLINE_VALUES = "inline values"        # 3.13: values inside the object, dict in front
INLINE_VALUES_AFTER_SLOTS = "inline values after slots"  # 3.14+: as 3.13, values at obj + tp_basicsize

TYPE_BASICSIZE = 32  # offsetof(PyTypeObject, tp_basicsize), the same in every version


@dataclass(frozen=True)
class ObjectLayout:
    """Byte offsets (and how instance attributes and ints are kept) for reading dicts,
    modules, ints and instance attributes of one CPython minor version. ABSENT (-1) where
    a field does not exist."""

    object_type: int             # offsetof(PyObject, ob_type)
    module_dict: int             # offsetof(PyModuleObject, md_dict)
    type_flags: int              # offsetof(PyTypeObject, tp_flags), an unsigned long
    type_dictoffset: int         # offsetof(PyTypeObject, tp_dictoffset)
    heaptype_cached_keys: int    # offsetof(PyHeapTypeObject, ht_cached_keys)
    dict_keys: int               # offsetof(PyDictObject, ma_keys)
    dict_values: int             # offsetof(PyDictObject, ma_values)
    keys_size: int               # dk_size (Py_ssize_t, <= 3.10) / dk_log2_size (uint8_t, 3.11+)
    keys_log2_index_bytes: int   # dk_log2_index_bytes (uint8_t, 3.11+)
    keys_kind: int               # dk_kind (uint8_t, 3.11+)
    keys_nentries: int           # dk_nentries
    keys_indices: int            # dk_indices: the hash table, followed by the entries
    values_items: int            # offsetof(PyDictValues, values); 0 where ma_values is a PyObject **
    values_capacity: int         # offsetof(PyDictValues, capacity) (uint8_t, 3.13+)
    values_valid: int            # offsetof(PyDictValues, valid) (uint8_t, 3.13+)
    instance_dict: str           # one of the four ways above
    managed_dict: int            # 3.11+: where the (tagged) dict pointer is, from the object
    managed_values: int          # 3.11: the values pointer; 3.13+: the inline values, from the object
                                 # (3.14+: of a type without __slots__; else after them, at tp_basicsize)
    long_size: int               # ob_size (<= 3.11) / long_value.lv_tag (3.12+)
    long_digits: int             # ob_digit / long_value.ob_digit; 30-bit digits in uint32
    long_tagged: bool            # lv_tag: digit count << 3 | sign (0 +, 1 zero, 2 -)


# 3.6 and 3.7: object.h (PyTypeObject, PyHeapTypeObject), dictobject.h (PyDictObject),
# longintrepr.h. The compact dict keys (Objects/dict-common.h) and PyModuleObject
# (Objects/moduleobject.c) are in no installed header: checked against the DWARF of
# libpython3.6m.so and libpython3.7m.so.
_OBJECTS_3_6 = ObjectLayout(
    object_type=8, module_dict=16,
    type_flags=168, type_dictoffset=288, heaptype_cached_keys=856,
    dict_keys=32, dict_values=40,
    keys_size=8, keys_log2_index_bytes=ABSENT, keys_kind=ABSENT, keys_nentries=32, keys_indices=40,
    values_items=0, values_capacity=ABSENT, values_valid=ABSENT,
    instance_dict=DICT_POINTER, managed_dict=ABSENT, managed_values=ABSENT,
    long_size=16, long_digits=24, long_tagged=False,
)

OBJECT_LAYOUTS: Dict[Tuple[int, int], ObjectLayout] = {
    (3, 6): _OBJECTS_3_6,
    (3, 7): _OBJECTS_3_6,
    # 3.8: cpython/object.h (PyTypeObject, PyHeapTypeObject), cpython/dictobject.h
    # (PyDictObject), longintrepr.h. Not in any installed header, so taken from the sources
    # and checked against the DWARF of libpython3.8.so: Objects/dict-common.h
    # (PyDictKeysObject: dk_size, dk_lookup, dk_usable, dk_nentries, dk_indices) and
    # Objects/moduleobject.c (PyModuleObject).
    (3, 8): ObjectLayout(
        object_type=8, module_dict=16,
        type_flags=168, type_dictoffset=288, heaptype_cached_keys=872,
        dict_keys=32, dict_values=40,
        keys_size=8, keys_log2_index_bytes=ABSENT, keys_kind=ABSENT, keys_nentries=32, keys_indices=40,
        values_items=0, values_capacity=ABSENT, values_valid=ABSENT,
        instance_dict=DICT_POINTER, managed_dict=ABSENT, managed_values=ABSENT,
        long_size=16, long_digits=24, long_tagged=False,
    ),
    # 3.9: PyHeapTypeObject loses a slot. Dict keys and module objects as in 3.8
    # (Objects/dict-common.h, Objects/moduleobject.c).
    (3, 9): ObjectLayout(
        object_type=8, module_dict=16,
        type_flags=168, type_dictoffset=288, heaptype_cached_keys=864,
        dict_keys=32, dict_values=40,
        keys_size=8, keys_log2_index_bytes=ABSENT, keys_kind=ABSENT, keys_nentries=32, keys_indices=40,
        values_items=0, values_capacity=ABSENT, values_valid=ABSENT,
        instance_dict=DICT_POINTER, managed_dict=ABSENT, managed_values=ABSENT,
        long_size=16, long_digits=24, long_tagged=False,
    ),
    # 3.10: internal/pycore_moduleobject.h (now installed), cpython/object.h,
    # cpython/dictobject.h, longintrepr.h; dict keys still from Objects/dict-common.h
    # (checked against the DWARF of libpython3.10.so).
    (3, 10): ObjectLayout(
        object_type=8, module_dict=16,
        type_flags=168, type_dictoffset=288, heaptype_cached_keys=872,
        dict_keys=32, dict_values=40,
        keys_size=8, keys_log2_index_bytes=ABSENT, keys_kind=ABSENT, keys_nentries=32, keys_indices=40,
        values_items=0, values_capacity=ABSENT, values_valid=ABSENT,
        instance_dict=DICT_POINTER, managed_dict=ABSENT, managed_values=ABSENT,
        long_size=16, long_digits=24, long_tagged=False,
    ),
    # 3.11: internal/pycore_dict.h (PyDictKeysObject with dk_log2_size and dk_kind,
    # PyDictValues), internal/pycore_object.h (_PyObject_ValuesPointer = obj - 4 pointers,
    # _PyObject_ManagedDictPointer = obj - 3), internal/pycore_moduleobject.h,
    # cpython/object.h, cpython/longintrepr.h.
    (3, 11): ObjectLayout(
        object_type=8, module_dict=16,
        type_flags=168, type_dictoffset=288, heaptype_cached_keys=872,
        dict_keys=32, dict_values=40,
        keys_size=8, keys_log2_index_bytes=9, keys_kind=10, keys_nentries=24, keys_indices=32,
        values_items=0, values_capacity=ABSENT, values_valid=ABSENT,
        instance_dict=VALUES_OR_DICT, managed_dict=-24, managed_values=-32,
        long_size=16, long_digits=24, long_tagged=False,
    ),
    # 3.12: internal/pycore_object.h (_PyObject_DictOrValuesPointer = obj - 3 pointers, a
    # PyDictOrValues whose low bit set means values - 1), internal/pycore_dict.h,
    # cpython/longintrepr.h (_PyLongValue: lv_tag, ob_digit; _PyLong_NON_SIZE_BITS 3).
    (3, 12): ObjectLayout(
        object_type=8, module_dict=16,
        type_flags=168, type_dictoffset=288, heaptype_cached_keys=880,
        dict_keys=32, dict_values=40,
        keys_size=8, keys_log2_index_bytes=9, keys_kind=10, keys_nentries=24, keys_indices=32,
        values_items=0, values_capacity=ABSENT, values_valid=ABSENT,
        instance_dict=TAGGED_DICT_OR_VALUES, managed_dict=-24, managed_values=ABSENT,
        long_size=16, long_digits=24, long_tagged=True,
    ),
    # 3.13: the members that _Py_DebugOffsets carries (_DEBUG_OFFSETS_OBJECTS: ob_type,
    # tp_flags, ma_keys, ma_values, lv_tag, ob_digit) are left ABSENT here, and
    # parse_debug_offsets fills them in; so use a PythonLayout's `objects`, not this entry.
    # The rest: internal/pycore_dict.h (PyDictValues gains capacity/size/embedded/valid
    # bytes before values[]), internal/pycore_object.h (MANAGED_DICT_OFFSET = -3 pointers;
    # _PyObject_InlineValues = obj + sizeof(PyObject)), internal/pycore_moduleobject.h,
    # cpython/object.h.
    (3, 13): ObjectLayout(
        object_type=ABSENT, module_dict=16,
        type_flags=ABSENT, type_dictoffset=288, heaptype_cached_keys=880,
        dict_keys=ABSENT, dict_values=ABSENT,
        keys_size=8, keys_log2_index_bytes=9, keys_kind=10, keys_nentries=24, keys_indices=32,
        values_items=8, values_capacity=0, values_valid=3,
        instance_dict=INLINE_VALUES, managed_dict=-24, managed_values=16,
        long_size=ABSENT, long_digits=ABSENT, long_tagged=True,
    ),
}

# 3.14: as 3.13 (the same headers, measured against Debian's 3.14.10), except that the
# inline values follow the slots of a type that has __slots__ (internal/pycore_object.h:
# _PyObject_InlineValues = obj + tp_basicsize).
OBJECT_LAYOUTS[(3, 14)] = replace(OBJECT_LAYOUTS[(3, 13)], instance_dict=INLINE_VALUES_AFTER_SLOTS)
# 3.15: as 3.14, except that PyHeapTypeObject grows a slot before ht_cached_keys
# (measured against Debian's 3.15.2).
OBJECT_LAYOUTS[(3, 15)] = replace(OBJECT_LAYOUTS[(3, 14)], heaptype_cached_keys=888)


@dataclass(frozen=True)
class PythonLayout:
    """Byte offsets (and a few sizes) inside one CPython minor version's structures."""

    version: Tuple[int, int]                 # (3, 11)
    # _PyRuntimeState
    runtime_interpreters_head: int           # offsetof(_PyRuntimeState, interpreters.head); 3.6: 0
    # PyInterpreterState
    interp_next: int                         # interp->next
    interp_threads_head: int                 # tstate_head (<=3.10) / threads.head (3.11+)
    interp_modules: int                      # sys.modules: modules (<=3.11) / imports.modules (3.12+)
    # PyThreadState
    tstate_next: int
    tstate_interp: int
    tstate_thread_id: int                    # pthread_t thread_id
    tstate_native_thread_id: int             # -1 where the field does not exist (<=3.10)
    tstate_frame: int                        # <=3.10: frame (PyFrameObject*); 3.11-3.12: cframe (_PyCFrame*); 3.13+: current_frame
    cframe_current_frame: int                # 3.11-3.12: offsetof(_PyCFrame, current_frame); -1 otherwise
    # frames: PyFrameObject (<=3.10) / _PyInterpreterFrame (3.11+)
    frame_previous: int                      # f_back (<=3.10) / previous
    frame_code: int                          # f_code (<=3.12) / f_executable (3.13+)
    frame_instr: int                         # f_lasti (int, <=3.10) / prev_instr (3.11-3.12) / instr_ptr (3.13+)
    frame_owner: int                         # _PyInterpreterFrame.owner (char, 3.11+); -1 before
    frame_is_entry: int                      # 3.11 only: _PyInterpreterFrame.is_entry (bool); -1 otherwise
    # PyCodeObject
    code_filename: int
    code_name: int
    code_qualname: int                       # -1 before 3.11
    code_firstlineno: int                    # int
    code_linetable: int                      # co_lnotab (3.8, 3.9) / co_linetable (3.10+); a bytes object
    code_adaptive: int                       # 3.11+: offsetof(PyCodeObject, co_code_adaptive); -1 before
    # str and bytes objects
    unicode_state: int                       # offsetof(PyASCIIObject, state)
    unicode_length: int                      # offsetof(PyASCIIObject, length)
    unicode_ascii_data: int                  # sizeof(PyASCIIObject): where compact ASCII data starts
    unicode_compact_data: int                # sizeof(PyCompactUnicodeObject): where compact non-ASCII data starts
    bytes_size: int                          # offsetof(PyVarObject, ob_size)
    bytes_data: int                          # offsetof(PyBytesObject, ob_sval)
    # dicts, modules, ints and instance attributes; None where OBJECT_LAYOUTS has no entry
    objects: Optional[ObjectLayout]


LAYOUTS: Dict[Tuple[int, int], PythonLayout] = {
    # 3.6: pystate.h (PyInterpreterState, PyThreadState), frameobject.h, code.h,
    # unicodeobject.h, bytesobject.h. There is no _PyRuntime: the interpreters hang from
    # pystate.c's static `interp_head` (in .symtab), whose address stands in for the
    # runtime's, so the head is at offset 0.
    (3, 6): PythonLayout(
        version=(3, 6),
        runtime_interpreters_head=0,
        interp_next=0, interp_threads_head=8, interp_modules=16,
        tstate_next=8, tstate_interp=16, tstate_thread_id=152, tstate_native_thread_id=ABSENT,
        tstate_frame=24, cframe_current_frame=ABSENT,
        frame_previous=24, frame_code=32, frame_instr=120, frame_owner=ABSENT, frame_is_entry=ABSENT,
        code_filename=96, code_name=104, code_qualname=ABSENT, code_firstlineno=36,
        code_linetable=112, code_adaptive=ABSENT,
        unicode_state=32, unicode_length=16, unicode_ascii_data=48, unicode_compact_data=72,
        bytes_size=16, bytes_data=32,
        objects=OBJECT_LAYOUTS[(3, 6)],
    ),
    # 3.7: internal/pystate.h (_PyRuntimeState), pystate.h (PyInterpreterState,
    # PyThreadState), frameobject.h, code.h, unicodeobject.h, bytesobject.h.
    (3, 7): PythonLayout(
        version=(3, 7),
        runtime_interpreters_head=24,
        interp_next=0, interp_threads_head=8, interp_modules=40,
        tstate_next=8, tstate_interp=16, tstate_thread_id=176, tstate_native_thread_id=ABSENT,
        tstate_frame=24, cframe_current_frame=ABSENT,
        frame_previous=24, frame_code=32, frame_instr=104, frame_owner=ABSENT, frame_is_entry=ABSENT,
        code_filename=96, code_name=104, code_qualname=ABSENT, code_firstlineno=36,
        code_linetable=112, code_adaptive=ABSENT,
        unicode_state=32, unicode_length=16, unicode_ascii_data=48, unicode_compact_data=72,
        bytes_size=16, bytes_data=32,
        objects=OBJECT_LAYOUTS[(3, 7)],
    ),
    # 3.8: internal/pycore_pystate.h (_PyRuntimeState, PyInterpreterState),
    # cpython/pystate.h (PyThreadState), frameobject.h, code.h,
    # cpython/unicodeobject.h (PyASCIIObject still carries wstr), bytesobject.h.
    (3, 8): PythonLayout(
        version=(3, 8),
        runtime_interpreters_head=32,
        interp_next=0, interp_threads_head=8, interp_modules=56,
        tstate_next=8, tstate_interp=16, tstate_thread_id=176, tstate_native_thread_id=ABSENT,
        tstate_frame=24, cframe_current_frame=ABSENT,
        frame_previous=24, frame_code=32, frame_instr=104, frame_owner=ABSENT, frame_is_entry=ABSENT,
        code_filename=104, code_name=112, code_qualname=ABSENT, code_firstlineno=40,
        code_linetable=120, code_adaptive=ABSENT,
        unicode_state=32, unicode_length=16, unicode_ascii_data=48, unicode_compact_data=72,
        bytes_size=16, bytes_data=32,
        objects=OBJECT_LAYOUTS[(3, 8)],
    ),
    # 3.9: internal/pycore_runtime.h, internal/pycore_interp.h, cpython/pystate.h,
    # cpython/frameobject.h, cpython/code.h, cpython/unicodeobject.h, cpython/bytesobject.h.
    (3, 9): PythonLayout(
        version=(3, 9),
        runtime_interpreters_head=32,
        interp_next=0, interp_threads_head=8, interp_modules=856,
        tstate_next=8, tstate_interp=16, tstate_thread_id=176, tstate_native_thread_id=ABSENT,
        tstate_frame=24, cframe_current_frame=ABSENT,
        frame_previous=24, frame_code=32, frame_instr=104, frame_owner=ABSENT, frame_is_entry=ABSENT,
        code_filename=104, code_name=112, code_qualname=ABSENT, code_firstlineno=40,
        code_linetable=120, code_adaptive=ABSENT,
        unicode_state=32, unicode_length=16, unicode_ascii_data=48, unicode_compact_data=72,
        bytes_size=16, bytes_data=32,
        objects=OBJECT_LAYOUTS[(3, 9)],
    ),
    # 3.10: the same headers as 3.9; co_lnotab gives way to co_linetable (PEP 626) and
    # f_lasti moves up a slot (and counts code units rather than bytes).
    (3, 10): PythonLayout(
        version=(3, 10),
        runtime_interpreters_head=32,
        interp_next=0, interp_threads_head=8, interp_modules=856,
        tstate_next=8, tstate_interp=16, tstate_thread_id=176, tstate_native_thread_id=ABSENT,
        tstate_frame=24, cframe_current_frame=ABSENT,
        frame_previous=24, frame_code=32, frame_instr=96, frame_owner=ABSENT, frame_is_entry=ABSENT,
        code_filename=104, code_name=112, code_qualname=ABSENT, code_firstlineno=40,
        code_linetable=120, code_adaptive=ABSENT,
        unicode_state=32, unicode_length=16, unicode_ascii_data=48, unicode_compact_data=72,
        bytes_size=16, bytes_data=32,
        objects=OBJECT_LAYOUTS[(3, 10)],
    ),
    # 3.11: internal/pycore_runtime.h, internal/pycore_interp.h (threads.head, modules),
    # cpython/pystate.h (PyThreadState, _PyCFrame), internal/pycore_frame.h
    # (_PyInterpreterFrame), cpython/code.h, cpython/unicodeobject.h, cpython/bytesobject.h.
    (3, 11): PythonLayout(
        version=(3, 11),
        runtime_interpreters_head=40,
        interp_next=0, interp_threads_head=16, interp_modules=888,
        tstate_next=8, tstate_interp=16, tstate_thread_id=152, tstate_native_thread_id=160,
        tstate_frame=56, cframe_current_frame=8,
        frame_previous=48, frame_code=32, frame_instr=56, frame_owner=69, frame_is_entry=68,
        code_filename=112, code_name=120, code_qualname=128, code_firstlineno=72,
        code_linetable=136, code_adaptive=184,
        unicode_state=32, unicode_length=16, unicode_ascii_data=48, unicode_compact_data=72,
        bytes_size=16, bytes_data=32,
        objects=OBJECT_LAYOUTS[(3, 11)],
    ),
    # 3.12: the same headers as 3.11 and internal/pycore_import.h (imports.modules);
    # _PyInterpreterFrame reordered (f_code first, no is_entry), and
    # PyASCIIObject/PyCompactUnicodeObject lose their wstr members.
    (3, 12): PythonLayout(
        version=(3, 12),
        runtime_interpreters_head=40,
        interp_next=0, interp_threads_head=72, interp_modules=944,
        tstate_next=8, tstate_interp=16, tstate_thread_id=136, tstate_native_thread_id=144,
        tstate_frame=56, cframe_current_frame=0,
        frame_previous=8, frame_code=0, frame_instr=56, frame_owner=70, frame_is_entry=ABSENT,
        code_filename=112, code_name=120, code_qualname=128, code_firstlineno=68,
        code_linetable=136, code_adaptive=192,
        unicode_state=32, unicode_length=16, unicode_ascii_data=40, unicode_compact_data=56,
        bytes_size=16, bytes_data=32,
        objects=OBJECT_LAYOUTS[(3, 12)],
    ),
}


def layout_for(version: Tuple[int, int]) -> Optional[PythonLayout]:
    """The tabled layout of a CPython (major, minor), or None (3.13+ use parse_debug_offsets)."""
    return LAYOUTS.get(tuple(version))


# ---------------------------------------------------------------------------------------
# _Py_DebugOffsets (3.13+)

DEBUG_OFFSETS_COOKIE = b"xdebugpy"
# How many bytes from the start of _PyRuntime a caller should read and hand to
# parse_debug_offsets. 3.13's struct takes 584, 3.14's 760 and 3.15's 888; the rest is room for
# later, longer ones.
DEBUG_OFFSETS_SIZE = 1024
_FREE_THREADED_AT = 16  # every version's struct opens with cookie, version and uint64 free_threaded


def debug_offsets_free_threaded(data: bytes) -> bool:
    """Whether the start of a 3.13+ `_PyRuntime` (at least 24 bytes of its
    `_Py_DebugOffsets`) says the build is free-threaded (Py_GIL_DISABLED)."""
    return len(data) >= _FREE_THREADED_AT + 8 and struct.unpack_from("<Q", data, _FREE_THREADED_AT)[0] != 0

# The struct opens with char cookie[8], uint64 version (PY_VERSION_HEX) and uint64
# free_threaded (the same three in 3.13 to 3.15); then come nested structs made only of
# uint64 members, so each member's position follows from the order below. The struct is
# not kept compatible between minor versions (3.15 inserts members where 3.14 had
# others), so each minor version has its own list; a newer one is read with the newest
# list and taken only if every member read passes its checks (parse_debug_offsets).
# Within a minor version it only holds still from the first release candidate on: alphas
# and betas added and moved members, so those are refused (a pre-release is only safe to
# read with headers of that very build).
_DEBUG_OFFSETS_HEADER = 24
_DebugOffsetsLayout = Sequence[Tuple[str, Sequence[str]]]

# From include/python3.13/internal/pycore_runtime.h (3.13.0).
_DEBUG_OFFSETS_3_13: _DebugOffsetsLayout = (
    ("runtime_state", ("size", "finalizing", "interpreters_head")),
    ("interpreter_state", ("size", "id", "next", "threads_head", "gc", "imports_modules", "sysdict",
                           "builtins", "ceval_gil", "gil_runtime_state", "gil_runtime_state_enabled",
                           "gil_runtime_state_locked", "gil_runtime_state_holder")),
    ("thread_state", ("size", "prev", "next", "interp", "current_frame", "thread_id",
                      "native_thread_id", "datastack_chunk", "status")),
    ("interpreter_frame", ("size", "previous", "executable", "instr_ptr", "localsplus", "owner")),
    ("code_object", ("size", "filename", "name", "qualname", "linetable", "firstlineno", "argcount",
                     "localsplusnames", "localspluskinds", "co_code_adaptive")),
    ("pyobject", ("size", "ob_type")),
    ("type_object", ("size", "tp_name", "tp_repr", "tp_flags")),
    ("tuple_object", ("size", "ob_item", "ob_size")),
    ("list_object", ("size", "ob_item", "ob_size")),
    ("dict_object", ("size", "ma_keys", "ma_values")),
    ("float_object", ("size", "ob_fval")),
    ("long_object", ("size", "lv_tag", "ob_digit")),
    ("bytes_object", ("size", "ob_size", "ob_sval")),
    ("unicode_object", ("size", "state", "length", "asciiobject_size")),
    ("gc", ("size", "collecting")),
)

# From include/python3.14/internal/pycore_debug_offsets.h: the same header and, after
# it, 3.13's groups with members appended (interpreter_state: threads_main after
# threads_head, then code_object_generation and tlbc_generation at the end;
# interpreter_frame: stackpointer, tlbc_index; code_object: co_tlbc), a set_object
# group between list_object and dict_object, and gen_object, llist_node and
# debugger_support after gc. llist_node and debugger_support have no size member.
# Checked to be identical in 3.14.0 and 3.14.10 (the values differ between patch
# releases, e.g. PyInterpreterState grew, but not the struct that carries them).
# Kept in runs, three of which 3.15's list repeats.
_FIRST_GROUPS_3_14: _DebugOffsetsLayout = (
    ("runtime_state", ("size", "finalizing", "interpreters_head")),
    ("interpreter_state", ("size", "id", "next", "threads_head", "threads_main", "gc", "imports_modules",
                           "sysdict", "builtins", "ceval_gil", "gil_runtime_state", "gil_runtime_state_enabled",
                           "gil_runtime_state_locked", "gil_runtime_state_holder", "code_object_generation",
                           "tlbc_generation")),
)
_OBJECT_GROUPS_3_14: _DebugOffsetsLayout = (
    ("tuple_object", ("size", "ob_item", "ob_size")),
    ("list_object", ("size", "ob_item", "ob_size")),
    ("set_object", ("size", "used", "table", "mask")),
    ("dict_object", ("size", "ma_keys", "ma_values")),
    ("float_object", ("size", "ob_fval")),
    ("long_object", ("size", "lv_tag", "ob_digit")),
    ("bytes_object", ("size", "ob_size", "ob_sval")),
)
_LAST_GROUPS_3_14: _DebugOffsetsLayout = (
    ("gen_object", ("size", "gi_name", "gi_iframe", "gi_frame_state")),
    ("llist_node", ("next", "prev")),
    ("debugger_support", ("eval_breaker", "remote_debugger_support", "remote_debugging_enabled",
                          "debugger_pending_call", "debugger_script_path", "debugger_script_path_size")),
)
_DEBUG_OFFSETS_3_14: _DebugOffsetsLayout = (
    *_FIRST_GROUPS_3_14,
    ("thread_state", ("size", "prev", "next", "interp", "current_frame", "thread_id",
                      "native_thread_id", "datastack_chunk", "status")),
    ("interpreter_frame", ("size", "previous", "executable", "instr_ptr", "localsplus", "owner",
                           "stackpointer", "tlbc_index")),
    ("code_object", ("size", "filename", "name", "qualname", "linetable", "firstlineno", "argcount",
                     "localsplusnames", "localspluskinds", "co_code_adaptive", "co_tlbc")),
    ("pyobject", ("size", "ob_type")),
    ("type_object", ("size", "tp_name", "tp_repr", "tp_flags")),
    *_OBJECT_GROUPS_3_14,
    ("unicode_object", ("size", "state", "length", "asciiobject_size")),
    ("gc", ("size", "collecting")),
    *_LAST_GROUPS_3_14,
)

# From include/python3.15/internal/pycore_debug_offsets.h (3.15.2). 3.14's list is no
# longer a prefix of it: thread_state gains base_frame, last_profiled_frame and
# last_profiled_frame_seq between current_frame and thread_id, and holds_gil,
# gil_requested, current_exception and exc_state at its end; an err_stackitem group
# (exc_value, no size) comes before interpreter_frame; type_object gains tp_basicsize and
# tp_dictoffset, followed by a heap_type_object group (size, ht_cached_keys);
# unicode_object gains compactunicodeobject_size, gc frame, generation_stats_size and
# generation_stats.
_DEBUG_OFFSETS_3_15: _DebugOffsetsLayout = (
    *_FIRST_GROUPS_3_14,
    ("thread_state", ("size", "prev", "next", "interp", "current_frame", "base_frame", "last_profiled_frame",
                      "last_profiled_frame_seq", "thread_id", "native_thread_id", "datastack_chunk", "status",
                      "holds_gil", "gil_requested", "current_exception", "exc_state")),
    ("err_stackitem", ("exc_value",)),
    ("interpreter_frame", ("size", "previous", "executable", "instr_ptr", "localsplus", "owner",
                           "stackpointer", "tlbc_index")),
    ("code_object", ("size", "filename", "name", "qualname", "linetable", "firstlineno", "argcount",
                     "localsplusnames", "localspluskinds", "co_code_adaptive", "co_tlbc")),
    ("pyobject", ("size", "ob_type")),
    ("type_object", ("size", "tp_name", "tp_repr", "tp_flags", "tp_basicsize", "tp_dictoffset")),
    ("heap_type_object", ("size", "ht_cached_keys")),
    *_OBJECT_GROUPS_3_14,
    ("unicode_object", ("size", "state", "length", "asciiobject_size", "compactunicodeobject_size")),
    ("gc", ("size", "collecting", "frame", "generation_stats_size", "generation_stats")),
    *_LAST_GROUPS_3_14,
)

_DEBUG_OFFSETS_LAYOUTS: Dict[Tuple[int, int], _DebugOffsetsLayout] = {
    (3, 13): _DEBUG_OFFSETS_3_13,
    (3, 14): _DEBUG_OFFSETS_3_14,
    (3, 15): _DEBUG_OFFSETS_3_15,
}

# PY_VERSION_HEX's release level (bits 4-7): 0xA alpha, 0xB beta, 0xC candidate, 0xF final.
_RELEASE_CANDIDATE = 0xC
_RELEASE_NAMES = {0xA: "a", 0xB: "b", 0xC: "rc"}


def _version_text(version_hex: int) -> str:
    """PY_VERSION_HEX as CPython writes the version: 3.14.0, 3.14.0b2, 3.14.0rc1."""
    major, minor, micro = version_hex >> 24, (version_hex >> 16) & 0xFF, (version_hex >> 8) & 0xFF
    level, serial = (version_hex >> 4) & 0xF, version_hex & 0xF
    text = f"{major}.{minor}.{micro}"
    if level in _RELEASE_NAMES:
        text += f"{_RELEASE_NAMES[level]}{serial}"
    return text

# The members of the debug offsets that PythonLayout takes: field -> "struct.member".
_FROM_DEBUG_OFFSETS = {
    "runtime_interpreters_head": "runtime_state.interpreters_head",
    "interp_next": "interpreter_state.next",
    "interp_threads_head": "interpreter_state.threads_head",
    "interp_modules": "interpreter_state.imports_modules",
    "tstate_next": "thread_state.next",
    "tstate_interp": "thread_state.interp",
    "tstate_thread_id": "thread_state.thread_id",
    "tstate_native_thread_id": "thread_state.native_thread_id",
    "tstate_frame": "thread_state.current_frame",
    "frame_previous": "interpreter_frame.previous",
    "frame_code": "interpreter_frame.executable",
    "frame_instr": "interpreter_frame.instr_ptr",
    "frame_owner": "interpreter_frame.owner",
    "code_filename": "code_object.filename",
    "code_name": "code_object.name",
    "code_qualname": "code_object.qualname",
    "code_firstlineno": "code_object.firstlineno",
    "code_linetable": "code_object.linetable",
    "code_adaptive": "code_object.co_code_adaptive",
    "unicode_state": "unicode_object.state",
    "unicode_length": "unicode_object.length",
    "unicode_ascii_data": "unicode_object.asciiobject_size",
    "bytes_size": "bytes_object.ob_size",
    "bytes_data": "bytes_object.ob_sval",
}

# The members of the debug offsets that ObjectLayout takes: field -> "struct.member".
# They replace the ABSENT placeholders of the version's OBJECT_LAYOUTS entry, which
# supplies the rest.
_DEBUG_OFFSETS_OBJECTS = {
    "object_type": "pyobject.ob_type",
    "type_flags": "type_object.tp_flags",
    "dict_keys": "dict_object.ma_keys",
    "dict_values": "dict_object.ma_values",
    "long_size": "long_object.lv_tag",
    "long_digits": "long_object.ob_digit",
}

# sizeof(PyCompactUnicodeObject), which the debug offsets carry from 3.15 on
# (unicode_object.compactunicodeobject_size). Before, it follows from asciiobject_size:
# since 3.12 the struct is a PyASCIIObject followed by Py_ssize_t utf8_length and
# char *utf8 and nothing else (3.13's and 3.14's cpython/unicodeobject.h), two 8-byte
# members more.
_COMPACT_UNICODE_SIZE = "unicode_object.compactunicodeobject_size"
_COMPACT_UNICODE_EXTRA = 16


def _positions(layout: _DebugOffsetsLayout) -> Tuple[Dict[str, int], int]:
    """Byte position of each "struct.member" inside _Py_DebugOffsets, and its total size."""
    positions: Dict[str, int] = {}
    at = _DEBUG_OFFSETS_HEADER
    for group, members in layout:
        for member in members:
            positions[f"{group}.{member}"] = at
            at += 8
    return positions, at


_MAX_STRUCT = 1 << 24  # bytes: _PyRuntimeState and PyInterpreterState, the largest, take a few hundred KiB

# The alignment of what a member locates, where it is not 8 (pointers, longs, Py_ssize_t):
# an offset that breaks it was read from the wrong place.
_ALIGNMENT = {
    "interpreter_frame.owner": 1,       # char
    "code_object.firstlineno": 4,       # int
    "unicode_object.state": 4,          # a struct of unsigned int bit fields
    "long_object.ob_digit": 4,          # digit[], uint32_t
    "bytes_object.ob_sval": 1,          # char[]
    "gen_object.gi_frame_state": 1,     # int8_t
}

# Groups that carry no size of their own: the size of their structure.
_SIZES = {
    "llist_node": 16,                   # struct llist_node: next, prev
}

# Members whose values every default (GIL) build has: each object opens with PyObject
# (ob_refcnt, ob_type) and each variable-size one with PyVarObject (then ob_size), as the
# stable ABI fixes. A member list read at positions other than CPython's cannot give them
# all, so they show whether the groups up to bytes_object are where the list puts them.
_ABI_VALUES = {
    "pyobject.size": 16,
    "pyobject.ob_type": 8,
    "tuple_object.ob_size": 16,
    "list_object.ob_size": 16,
    "bytes_object.ob_size": 16,
}

# Every member read and checked: those PythonLayout and ObjectLayout take, and the above;
# the optional ones only where the version's list has them.
_OPTIONAL = (_COMPACT_UNICODE_SIZE,)
_CHECKED = (*_FROM_DEBUG_OFFSETS.values(), *_DEBUG_OFFSETS_OBJECTS.values(), *_ABI_VALUES, *_OPTIONAL)


def offset_problem(name: str, value: int, size: int, alignment: int = 8) -> Optional[str]:
    """What is wrong with `value`, read as the offset of a member `name` inside a structure
    of `size` bytes (no structure is larger than _MAX_STRUCT: the size is the process's
    to write), in a phrase; None when nothing is."""
    if not value < min(size, _MAX_STRUCT):
        return f"{name} = {value} is not below the structure's size {min(size, _MAX_STRUCT)}"
    if value % alignment:
        return f"{name} = {value} is not {alignment}-byte aligned"
    return None


def _problems(member: Callable[[str], int], has: Callable[[str], bool], names: Sequence[str] = _CHECKED) -> List[str]:
    """What is wrong with the members `names`, one phrase each: an offset_problem, or an
    ABI member with another value. For asciiobject_size and compactunicodeobject_size,
    sizes themselves, "inside" holds as well: PyUnicodeObject is larger."""
    problems = []
    for name in dict.fromkeys(names):
        if name in _OPTIONAL and not has(name):
            continue
        group = name.split(".")[0]
        value = member(name)
        if name in _ABI_VALUES:
            if value != _ABI_VALUES[name]:
                problems.append(f"{name} = {value}, not {_ABI_VALUES[name]}")
            continue
        size = _SIZES[group] if group in _SIZES else member(f"{group}.size")
        problem = offset_problem(name, value, size, _ALIGNMENT.get(name, 8))
        if problem:
            problems.append(problem)
    return problems


def _read_members(data: bytes) -> Tuple[int, Tuple[int, int], Tuple[int, int], Dict[str, int], Callable[[str], int]]:
    """PY_VERSION_HEX, the version, the version whose member list reads it, the positions
    of that list's members and a reader of them, of the _Py_DebugOffsets at the start of
    `data`. Raises MalformedInput as parse_debug_offsets says."""
    data = bytes(data)
    if len(data) < 16:
        raise MalformedInput(f"_Py_DebugOffsets: got {len(data)} bytes, need at least 16 for cookie and version")
    cookie = data[:8]
    if cookie != DEBUG_OFFSETS_COOKIE:
        raise MalformedInput(f"_Py_DebugOffsets: cookie is {cookie!r}, expected {DEBUG_OFFSETS_COOKIE!r} "
                         "(not the start of _PyRuntime of a CPython 3.13+)")
    (version_hex,) = struct.unpack_from("<Q", data, 8)
    version = (version_hex >> 24, (version_hex >> 16) & 0xFF)
    version_text = f"{version[0]}.{version[1]}"
    if version < (3, 13):
        raise MalformedInput(f"_Py_DebugOffsets: version field says CPython {version_text} "
                         f"(PY_VERSION_HEX {version_hex:#x}); debug offsets exist from 3.13 on")
    if (version_hex >> 4) & 0xF < _RELEASE_CANDIDATE:
        raise MalformedInput(f"_Py_DebugOffsets: CPython {_version_text(version_hex)} is an alpha or beta, "
                         f"whose struct may differ from {version_text}'s releases (read from {version_text}.0rc1 on)")
    (free_threaded,) = struct.unpack_from("<Q", data, 16)
    if free_threaded:
        # Threads run bytecode from copies of their own (tlbc), not co_code_adaptive.
        raise MalformedInput(f"_Py_DebugOffsets: CPython {version_text} is a free-threaded build, not read yet")
    read_as = version if version in _DEBUG_OFFSETS_LAYOUTS else max(_DEBUG_OFFSETS_LAYOUTS)
    positions, size = _positions(_DEBUG_OFFSETS_LAYOUTS[read_as])
    if len(data) < size:
        raise MalformedInput(f"_Py_DebugOffsets: CPython {read_as[0]}.{read_as[1]}'s struct takes {size} bytes, "
                             f"got {len(data)}")

    def member(name: str) -> int:
        return struct.unpack_from("<Q", data, positions[name])[0]

    return version_hex, version, read_as, positions, member


def _refusal(version_hex: int, version: Tuple[int, int], read_as: Tuple[int, int], problems: List[str]) -> str:
    """The message that refuses debug offsets with problems."""
    version_text = f"{version[0]}.{version[1]}"
    if read_as != version:
        known = ", ".join(f"{v[0]}.{v[1]}" for v in sorted(_DEBUG_OFFSETS_LAYOUTS))
        return (f"_Py_DebugOffsets of CPython {version_text} (PY_VERSION_HEX {version_hex:#x}) "
                f"do not read as {read_as[0]}.{read_as[1]}'s, the newest known (known: {known}): "
                f"{'; '.join(problems)}; {version_text} needs a member list of its own")
    return f"_Py_DebugOffsets of CPython {version_text}: {'; '.join(problems)}"


def debug_offsets_members(data: bytes, names: Sequence[str]) -> Tuple[Tuple[int, int], Dict[str, int]]:
    """The CPython version and the members `names` ("group.member") of the
    _Py_DebugOffsets at the start of `data` (from _PyRuntime, as for parse_debug_offsets),
    each checked as that checks its own. Raises MalformedInput as parse_debug_offsets
    does, also when the version's member list has no such member."""
    version_hex, version, read_as, positions, member = _read_members(data)
    missing = [name for name in names if name not in positions]
    if missing:
        raise MalformedInput(f"_Py_DebugOffsets of CPython {version[0]}.{version[1]} have no {', '.join(missing)}")
    problems = _problems(member, positions.__contains__, names)
    if problems:
        raise MalformedInput(_refusal(version_hex, version, read_as, problems))
    return version, {name: member(name) for name in names}


def parse_debug_offsets(data: bytes) -> PythonLayout:
    """Build the PythonLayout of a 3.13+ CPython from the start of its `_PyRuntime`
    (at least DEBUG_OFFSETS_SIZE bytes are best; fewer will do if they cover the struct).
    Its `objects` takes the members the struct carries and the rest from OBJECT_LAYOUTS,
    or is None for a version without an entry there.

    A minor version newer than any here is read with the newest member list, and taken
    if every member read passes the checks of `_problems`: right when that version only
    added members after the last one read (groups appended at the end, members to gc and
    later groups), refused, naming each offset that fails, when it moved them.

    Raises MalformedInput when the bytes are not debug offsets (wrong cookie), come from a
    version before 3.13, from an alpha or beta, from a free-threaded build, or hold
    offsets that cannot be right, naming each."""
    version_hex, version, read_as, positions, member = _read_members(data)
    problems = _problems(member, positions.__contains__)
    if problems:
        raise MalformedInput(_refusal(version_hex, version, read_as, problems))
    objects = OBJECT_LAYOUTS.get(version)
    return PythonLayout(
        version=version,
        cframe_current_frame=ABSENT,      # no _PyCFrame from 3.13 on
        frame_is_entry=ABSENT,            # entry frames are marked by owner instead
        unicode_compact_data=(member(_COMPACT_UNICODE_SIZE) if _COMPACT_UNICODE_SIZE in positions else
                              member("unicode_object.asciiobject_size") + _COMPACT_UNICODE_EXTRA),
        objects=None if objects is None else replace(
            objects, **{field: member(name) for field, name in _DEBUG_OFFSETS_OBJECTS.items()}),
        **{field: member(name) for field, name in _FROM_DEBUG_OFFSETS.items()},
    )
