"""The CPython layout table checked against the headers of each CPython that pyenv has
installed: a small C program per version prints offsetof()/sizeof() for every field of
PythonLayout and of its ObjectLayout, and the tables must agree. For 3.13+ the offsets
come from `_Py_DebugOffsets` instead (and, for ObjectLayout, from the members it does not
carry in OBJECT_LAYOUTS), so its test reads the start of `_PyRuntime` out of the installed
libpython and compares what `parse_debug_offsets` makes of it with the same header
measurements.
3.14 and 3.15 are those of the Debian sid chroot (scripts/sid-python): their headers and
the `_PyRuntime` of their static executables. Synthetic `_PyRuntime` prefixes, written
out here member by member, test how the parser takes a struct it knows and one of a
minor version newer than any it knows."""

from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from conftest import SID_MINORS, SID_ROOT, include_dir, pyenv_python, skip_or_fail
from elftools.elf.elffile import ELFFile

from bpfprof.symbolizer.errors import MalformedInput
from bpfprof.symbolizer.interpreters.python.layouts import (
    DEBUG_OFFSETS_COOKIE,
    DEBUG_OFFSETS_SIZE,
    LAYOUTS,
    OBJECT_LAYOUTS,
    ObjectLayout,
    PythonLayout,
    _CHECKED,
    _DEBUG_OFFSETS_LAYOUTS,
    _OPTIONAL,
    layout_for,
    parse_debug_offsets,
)

TABLE_MINORS = (6, 7, 8, 9, 10, 11, 12)
DEBUG_OFFSETS_MINORS = (13, 14, 15)
LAYOUT_FIELDS = [f.name for f in dataclasses.fields(PythonLayout) if f.name not in ("version", "objects")]
# ObjectLayout's offsets; instance_dict and long_tagged, no numbers, are checked by the
# live processes of test_python_thread_names.py.
OBJECT_FIELDS = [f.name for f in dataclasses.fields(ObjectLayout) if f.name not in ("instance_dict", "long_tagged")]
PT_LOAD = "PT_LOAD"


# ---------------------------------------------------------------------------------------
# Finding the installed interpreters


def installed_version(minor: int) -> Path:
    """The prefix of 3.<minor>, which must ship its headers: the newest pyenv-installed
    one, or the sid chroot's /usr."""
    if minor in SID_MINORS:
        prefix = SID_ROOT / "usr"
        if not (prefix / "bin" / f"python3.{minor}").is_file():
            skip_or_fail(f"no python3.{minor} in {SID_ROOT} (scripts/sid-python builds it)")
    else:
        prefix = Path(pyenv_python(minor)).parent.parent
    if not (include_dir(prefix, minor) / "Python.h").is_file():
        skip_or_fail(f"CPython 3.{minor} under {prefix} has no headers")
    return prefix


# ---------------------------------------------------------------------------------------
# Measuring the layout with the C compiler


def c_expressions(minor: int) -> Dict[str, Optional[str]]:
    """For each PythonLayout field, the C expression that measures it on 3.<minor>,
    or None where the field has no counterpart (the table then holds -1)."""
    old_frames = minor <= 10                     # PyFrameObject holds the frame state
    frame = "PyFrameObject" if old_frames else "_PyInterpreterFrame"
    tstate_frame = "frame" if old_frames else ("cframe" if minor <= 12 else "current_frame")
    frame_code = "f_code" if minor <= 12 else "f_executable"
    frame_instr = "f_lasti" if old_frames else ("prev_instr" if minor <= 12 else "instr_ptr")

    def off(struct_name: str, member: str) -> str:
        return f"offsetof({struct_name}, {member})"

    return {
        # 3.6 has no _PyRuntime: the walk starts at interp_head, which holds the head itself.
        "runtime_interpreters_head": "0" if minor == 6 else off("_PyRuntimeState", "interpreters.head"),
        "interp_next": off("PyInterpreterState", "next"),
        "interp_threads_head": off("PyInterpreterState", "tstate_head" if old_frames else "threads.head"),
        "interp_modules": off("PyInterpreterState", "modules" if minor <= 11 else "imports.modules"),
        "tstate_next": off("PyThreadState", "next"),
        "tstate_interp": off("PyThreadState", "interp"),
        "tstate_thread_id": off("PyThreadState", "thread_id"),
        "tstate_native_thread_id": None if old_frames else off("PyThreadState", "native_thread_id"),
        "tstate_frame": off("PyThreadState", tstate_frame),
        "cframe_current_frame": off("_PyCFrame", "current_frame") if minor in (11, 12) else None,
        "frame_previous": off(frame, "f_back" if old_frames else "previous"),
        "frame_code": off(frame, frame_code),
        "frame_instr": off(frame, frame_instr),
        "frame_owner": None if old_frames else off(frame, "owner"),
        "frame_is_entry": off(frame, "is_entry") if minor == 11 else None,
        "code_filename": off("PyCodeObject", "co_filename"),
        "code_name": off("PyCodeObject", "co_name"),
        "code_qualname": None if old_frames else off("PyCodeObject", "co_qualname"),
        "code_firstlineno": off("PyCodeObject", "co_firstlineno"),
        "code_linetable": off("PyCodeObject", "co_lnotab" if minor <= 9 else "co_linetable"),
        "code_adaptive": None if old_frames else off("PyCodeObject", "co_code_adaptive"),
        "unicode_state": off("PyASCIIObject", "state"),
        "unicode_length": off("PyASCIIObject", "length"),
        "unicode_ascii_data": "sizeof(PyASCIIObject)",
        "unicode_compact_data": "sizeof(PyCompactUnicodeObject)",
        "bytes_size": off("PyVarObject", "ob_size"),
        "bytes_data": off("PyBytesObject", "ob_sval"),
    }


def object_c_expressions(minor: int) -> Dict[str, Optional[str]]:
    """For each ObjectLayout offset, the C expression that measures it on 3.<minor>, or
    None where the field does not exist or no installed header has it (3.8-3.10 dict
    keys, 3.8/3.9 module objects: those the live processes of test_python_thread_names.py
    check)."""
    new_dicts = minor >= 11
    obj = "((PyObject *)&an_object)"
    managed_dict = {
        11: f"(char *)_PyObject_ManagedDictPointer({obj}) - (char *){obj}",
        12: f"(char *)_PyObject_DictOrValuesPointer({obj}) - (char *){obj}",
    }
    managed_values = {11: f"(char *)_PyObject_ValuesPointer({obj}) - (char *){obj}"}
    if minor >= 13:
        managed_dict[minor] = "MANAGED_DICT_OFFSET"
        managed_values[minor] = f"(char *)_PyObject_InlineValues({obj}) - (char *){obj}"
    return {
        "object_type": "offsetof(PyObject, ob_type)",
        "module_dict": "offsetof(PyModuleObject, md_dict)" if minor >= 10 else None,
        "type_flags": "offsetof(PyTypeObject, tp_flags)",
        "type_dictoffset": "offsetof(PyTypeObject, tp_dictoffset)",
        "heaptype_cached_keys": "offsetof(PyHeapTypeObject, ht_cached_keys)",
        "dict_keys": "offsetof(PyDictObject, ma_keys)",
        "dict_values": "offsetof(PyDictObject, ma_values)",
        "keys_size": "offsetof(PyDictKeysObject, dk_log2_size)" if new_dicts else None,
        "keys_log2_index_bytes": "offsetof(PyDictKeysObject, dk_log2_index_bytes)" if new_dicts else None,
        "keys_kind": "offsetof(PyDictKeysObject, dk_kind)" if new_dicts else None,
        "keys_nentries": "offsetof(PyDictKeysObject, dk_nentries)" if new_dicts else None,
        "keys_indices": "offsetof(PyDictKeysObject, dk_indices)" if new_dicts else None,
        "values_items": "offsetof(PyDictValues, values)" if new_dicts else None,
        "values_capacity": "offsetof(PyDictValues, capacity)" if minor >= 13 else None,
        "values_valid": "offsetof(PyDictValues, valid)" if minor >= 13 else None,
        "managed_dict": managed_dict.get(minor),
        "managed_values": managed_values.get(minor),
        "long_size": ("offsetof(PyLongObject, long_value.lv_tag)" if minor >= 12 else
                      "offsetof(PyVarObject, ob_size)"),
        "long_digits": ("offsetof(PyLongObject, long_value.ob_digit)" if minor >= 12 else
                        "offsetof(PyLongObject, ob_digit)"),
    }


def internal_headers(minor: int) -> List[str]:
    if minor == 6:
        return []                              # PyInterpreterState is in pystate.h; no _PyRuntimeState
    if minor == 7:
        return ["internal/pystate.h"]          # _PyRuntimeState
    if minor == 8:
        return ["internal/pycore_pystate.h"]   # _PyRuntimeState and PyInterpreterState
    headers = ["internal/pycore_runtime.h", "internal/pycore_interp.h"]
    if minor >= 10:
        headers.append("internal/pycore_moduleobject.h")
    if minor >= 11:
        headers += ["internal/pycore_frame.h", "internal/pycore_dict.h", "internal/pycore_object.h"]
    return headers


def c_program(minor: int) -> str:
    lines = ["#define Py_BUILD_CORE 1", "#include <Python.h>"]
    if minor <= 10:                            # 3.8's Python.h leaves out code.h
        lines += ["#include <code.h>", "#include <frameobject.h>", "#include <longintrepr.h>"]
    lines += [f'#include "{header}"' for header in internal_headers(minor)]
    # From 3.14 _PyObject_InlineValues reads the object's type's tp_basicsize.
    lines += ["#include <stddef.h>", "#include <stdio.h>", "", "static PyTypeObject a_type;",
              "static PyObject an_object;", "", "int main(void) {", "    a_type.tp_basicsize = sizeof(PyObject);",
              "    an_object.ob_type = &a_type;"]
    measures = {name: expr for name, expr in c_expressions(minor).items() if expr is not None}
    measures.update({f"objects.{name}": expr for name, expr in object_c_expressions(minor).items()
                     if expr is not None})
    if minor >= 13:
        measures["sizeof_debug_offsets"] = "sizeof(_Py_DebugOffsets)"
    for name, expr in measures.items():
        lines.append(f'    printf("%s %ld\\n", "{name}", (long)({expr}));')
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def measure(tmp_path_factory):
    """measure(minor) -> {field: value} from 3.<minor>'s own headers, -1 where the field
    does not exist; ObjectLayout's as "objects.field", only those the headers have;
    compiled and run once per version."""
    cache: Dict[int, Dict[str, int]] = {}

    def run(minor: int) -> Dict[str, int]:
        if minor in cache:
            return cache[minor]
        prefix = installed_version(minor)
        if shutil.which("gcc") is None:
            skip_or_fail("gcc is not installed")
        include = include_dir(prefix, minor)
        work = tmp_path_factory.mktemp(f"layout3{minor}")
        source, binary = work / "layout.c", work / "layout"
        source.write_text(c_program(minor))
        # NDEBUG: the inline helpers of object_c_expressions assert on the object's type otherwise.
        # -idirafter: Debian's pyconfig.h is under the prefix's include/<multiarch>/, found
        # after the compiler's own headers.
        compile_cmd = ["gcc", "-w", "-DNDEBUG", "-o", str(binary), "-I", str(include),
                       "-I", str(include / "internal"), "-idirafter", str(prefix / "include"), str(source)]
        result = subprocess.run(compile_cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"compiling against 3.{minor} headers failed:\n{result.stderr}"
        output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
        values = {name: -1 for name in LAYOUT_FIELDS}
        for line in output.splitlines():
            name, value = line.split()
            values[name] = int(value)
        cache[minor] = values
        return values

    return run


# ---------------------------------------------------------------------------------------
# Reading _PyRuntime out of a shared library


def runtime_head(binary: Path, size: int) -> Optional[bytes]:
    """The first `size` bytes of the initialised `_PyRuntime` in an ELF file, found through
    .symtab or .dynsym and the PT_LOAD segment that holds it; None without the symbol."""
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        symbol = None
        for section_name in (".symtab", ".dynsym"):
            section = elf.get_section_by_name(section_name)
            if section is not None:
                found = section.get_symbol_by_name("_PyRuntime")
                if found:
                    symbol = found[0]
                    break
        if symbol is None:
            return None
        vaddr = symbol["st_value"]
        for segment in elf.iter_segments():
            header = segment.header
            if header.p_type == PT_LOAD and header.p_vaddr <= vaddr < header.p_vaddr + header.p_filesz:
                f.seek(vaddr - header.p_vaddr + header.p_offset)
                available = header.p_vaddr + header.p_filesz - vaddr
                return f.read(min(size, available, symbol["st_size"] or size))
    raise AssertionError(f"_PyRuntime at {vaddr:#x} lies in no file-backed PT_LOAD segment of {binary}")


def runtime_bytes(prefix: Path, minor: int) -> bytes:
    candidates = sorted((prefix / "lib").glob(f"libpython3.{minor}.so*"))
    candidates.append(prefix / "bin" / f"python3.{minor}")        # a build without --enable-shared
    for candidate in candidates:
        if candidate.is_file() and not candidate.is_symlink():
            data = runtime_head(candidate, DEBUG_OFFSETS_SIZE)
            if data is not None:
                return data
    raise AssertionError(f"no _PyRuntime symbol in {[str(c) for c in candidates]}")


# ---------------------------------------------------------------------------------------
# The tests


def mismatches(layout: PythonLayout, measured: Dict[str, int]) -> Dict[str, Tuple[int, int]]:
    """(layout's, headers') of each field where the two differ."""
    values = {name: getattr(layout, name) for name in LAYOUT_FIELDS}
    values.update({f"objects.{name}": getattr(layout.objects, name) for name in OBJECT_FIELDS})
    return {name: (values[name], value) for name, value in measured.items()
            if name in values and values[name] != value}


@pytest.mark.parametrize("minor", TABLE_MINORS, ids=[f"3.{m}" for m in TABLE_MINORS])
def test_table_matches_headers(minor, measure):
    layout = LAYOUTS[(3, minor)]
    assert layout.version == (3, minor)
    found = mismatches(layout, measure(minor))
    assert not found, f"3.{minor} (table, headers): {found}"


@pytest.mark.parametrize("minor", DEBUG_OFFSETS_MINORS, ids=[f"3.{m}" for m in DEBUG_OFFSETS_MINORS])
def test_debug_offsets_match_headers(minor, measure):
    measured = measure(minor)
    assert measured["sizeof_debug_offsets"] <= DEBUG_OFFSETS_SIZE
    data = runtime_bytes(installed_version(minor), minor)
    layout = parse_debug_offsets(data)
    assert layout.version == (3, minor)
    found = mismatches(layout, measured)
    assert not found, f"3.{minor} (debug offsets and object table, headers): {found}"


def test_every_field_is_measured():
    for minor in TABLE_MINORS + DEBUG_OFFSETS_MINORS:
        assert set(c_expressions(minor)) == set(LAYOUT_FIELDS)
        assert set(object_c_expressions(minor)) == set(OBJECT_FIELDS)


def test_table_versions():
    assert sorted(LAYOUTS) == [(3, m) for m in TABLE_MINORS]
    for minor in TABLE_MINORS:
        assert layout_for((3, minor)) is LAYOUTS[(3, minor)]
        assert LAYOUTS[(3, minor)].objects is OBJECT_LAYOUTS[(3, minor)]
    for version in ((2, 7), (3, 5), (3, 13), (3, 14), (4, 0)):
        assert layout_for(version) is None
    assert sorted(OBJECT_LAYOUTS) == [(3, m) for m in TABLE_MINORS + DEBUG_OFFSETS_MINORS]


def fake_debug_offsets(version_hex: int, cookie: bytes = DEBUG_OFFSETS_COOKIE) -> bytes:
    return cookie + struct.pack("<Q", version_hex) + bytes(DEBUG_OFFSETS_SIZE - 16)


def test_debug_offsets_rejects_a_wrong_cookie():
    with pytest.raises(MalformedInput, match="cookie"):
        parse_debug_offsets(fake_debug_offsets(0x030D00F0, cookie=b"notdebug"))


def test_debug_offsets_rejects_versions_before_3_13():
    with pytest.raises(MalformedInput, match="3.12"):
        parse_debug_offsets(fake_debug_offsets(0x030C01F0))


def test_debug_offsets_rejects_short_data():
    with pytest.raises(MalformedInput):
        parse_debug_offsets(fake_debug_offsets(0x030D00F0)[:100])


def test_debug_offsets_rejects_unknown_minor_versions():
    with pytest.raises(MalformedInput, match="3.99"):
        parse_debug_offsets(fake_debug_offsets(0x036300F0))


def test_debug_offsets_rejects_offsets_outside_their_structures():
    with pytest.raises(MalformedInput, match="size"):
        parse_debug_offsets(fake_debug_offsets(0x030D00F0))     # every member zero


# ---------------------------------------------------------------------------------------
# Synthetic starts of _PyRuntime: 3.14, 3.15, and minor versions newer than any known

# _Py_DebugOffsets of 3.14 after its 24-byte header, group by group in the order of
# include/python3.14/internal/pycore_debug_offsets.h, written out here independently of
# the parser's own list. The values are those of Debian's 3.14.10 (x86-64, GIL build),
# which test_debug_offsets_match_headers checks the parser against with that build's headers.
DEBUG_OFFSETS_3_14_10 = (
    ("runtime_state", (("size", 316616), ("finalizing", 784), ("interpreters_head", 808))),
    ("interpreter_state", (("size", 225864), ("id", 7280), ("next", 7272), ("threads_head", 7344),
                           ("threads_main", 7360), ("gc", 7408), ("imports_modules", 7688), ("sysdict", 7672),
                           ("builtins", 7680), ("ceval_gil", 16), ("gil_runtime_state", 7784),
                           ("gil_runtime_state_enabled", 0), ("gil_runtime_state_locked", 7800),
                           ("gil_runtime_state_holder", 7792), ("code_object_generation", 7992),
                           ("tlbc_generation", 0))),
    ("thread_state", (("size", 832), ("prev", 0), ("next", 8), ("interp", 16), ("current_frame", 72),
                      ("thread_id", 152), ("native_thread_id", 160), ("datastack_chunk", 232), ("status", 32))),
    ("interpreter_frame", (("size", 88), ("previous", 8), ("executable", 0), ("instr_ptr", 56),
                           ("localsplus", 80), ("owner", 74), ("stackpointer", 64), ("tlbc_index", 0))),
    ("code_object", (("size", 216), ("filename", 112), ("name", 120), ("qualname", 128), ("linetable", 136),
                     ("firstlineno", 68), ("argcount", 52), ("localsplusnames", 96), ("localspluskinds", 104),
                     ("co_code_adaptive", 208), ("co_tlbc", 0))),
    ("pyobject", (("size", 16), ("ob_type", 8))),
    ("type_object", (("size", 416), ("tp_name", 24), ("tp_repr", 88), ("tp_flags", 168))),
    ("tuple_object", (("size", 40), ("ob_item", 32), ("ob_size", 16))),
    ("list_object", (("size", 40), ("ob_item", 24), ("ob_size", 16))),
    ("set_object", (("size", 200), ("used", 24), ("table", 40), ("mask", 32))),
    ("dict_object", (("size", 48), ("ma_keys", 32), ("ma_values", 40))),
    ("float_object", (("size", 24), ("ob_fval", 16))),
    ("long_object", (("size", 32), ("lv_tag", 16), ("ob_digit", 24))),
    ("bytes_object", (("size", 40), ("ob_size", 16), ("ob_sval", 32))),
    ("unicode_object", (("size", 64), ("state", 32), ("length", 16), ("asciiobject_size", 40))),
    ("gc", (("size", 264), ("collecting", 192))),
    ("gen_object", (("size", 160), ("gi_name", 24), ("gi_iframe", 72), ("gi_frame_state", 67))),
    ("llist_node", (("next", 0), ("prev", 8))),
    ("debugger_support", (("eval_breaker", 24), ("remote_debugger_support", 304),
                          ("remote_debugging_enabled", 8076), ("debugger_pending_call", 0),
                          ("debugger_script_path", 4), ("debugger_script_path_size", 512))),
)
SIZEOF_DEBUG_OFFSETS_3_14 = 760   # sizeof(_Py_DebugOffsets) compiled against 3.14.10's headers

# What parse_debug_offsets must make of it: offsetof()/sizeof() as measured with gcc
# against the same 3.14.10 headers (c_program(14)).
LAYOUT_3_14_10 = PythonLayout(
    version=(3, 14),
    runtime_interpreters_head=808,
    interp_next=7272, interp_threads_head=7344, interp_modules=7688,
    tstate_next=8, tstate_interp=16, tstate_thread_id=152, tstate_native_thread_id=160,
    tstate_frame=72, cframe_current_frame=-1,
    frame_previous=8, frame_code=0, frame_instr=56, frame_owner=74, frame_is_entry=-1,
    code_filename=112, code_name=120, code_qualname=128, code_firstlineno=68,
    code_linetable=136, code_adaptive=208,
    unicode_state=32, unicode_length=16, unicode_ascii_data=40, unicode_compact_data=56,
    bytes_size=16, bytes_data=32,
    objects=dataclasses.replace(OBJECT_LAYOUTS[(3, 14)], object_type=8, type_flags=168, dict_keys=32,
                                dict_values=40, long_size=16, long_digits=24),
)

# The same for Debian's 3.15.2, from include/python3.15/internal/pycore_debug_offsets.h;
# the groups whose members and values are those of 3.14.10 are taken from above.
SHARED_3_14 = dict(DEBUG_OFFSETS_3_14_10)
DEBUG_OFFSETS_3_15_2 = (
    ("runtime_state", (("size", 346568), ("finalizing", 912), ("interpreters_head", 936))),
    ("interpreter_state", (("size", 226240), ("id", 7272), ("next", 7264), ("threads_head", 7336),
                           ("threads_main", 7352), ("gc", 7400), ("imports_modules", 7592), ("sysdict", 7576),
                           ("builtins", 7584), ("ceval_gil", 16), ("gil_runtime_state", 7736),
                           ("gil_runtime_state_enabled", 0), ("gil_runtime_state_locked", 7752),
                           ("gil_runtime_state_holder", 7744), ("code_object_generation", 7944),
                           ("tlbc_generation", 0))),
    ("thread_state", (("size", 888), ("prev", 0), ("next", 8), ("interp", 16), ("current_frame", 72),
                      ("base_frame", 80), ("last_profiled_frame", 88), ("last_profiled_frame_seq", 96),
                      ("thread_id", 176), ("native_thread_id", 184), ("datastack_chunk", 256), ("status", 32),
                      ("holds_gil", 36), ("gil_requested", 40), ("current_exception", 136), ("exc_state", 288))),
    ("err_stackitem", (("exc_value", 0),)),
    ("interpreter_frame", (("size", 88), ("previous", 8), ("executable", 0), ("instr_ptr", 56),
                           ("localsplus", 80), ("owner", 74), ("stackpointer", 64), ("tlbc_index", 0))),
    ("code_object", (("size", 216), ("filename", 112), ("name", 120), ("qualname", 128), ("linetable", 136),
                     ("firstlineno", 68), ("argcount", 52), ("localsplusnames", 96), ("localspluskinds", 104),
                     ("co_code_adaptive", 208), ("co_tlbc", 0))),
    ("pyobject", (("size", 16), ("ob_type", 8))),
    ("type_object", (("size", 424), ("tp_name", 24), ("tp_repr", 88), ("tp_flags", 168), ("tp_basicsize", 32),
                     ("tp_dictoffset", 288))),
    ("heap_type_object", (("size", 944), ("ht_cached_keys", 888))),
    ("tuple_object", SHARED_3_14["tuple_object"]),
    ("list_object", SHARED_3_14["list_object"]),
    ("set_object", SHARED_3_14["set_object"]),
    ("dict_object", SHARED_3_14["dict_object"]),
    ("float_object", SHARED_3_14["float_object"]),
    ("long_object", SHARED_3_14["long_object"]),
    ("bytes_object", SHARED_3_14["bytes_object"]),
    ("unicode_object", (("size", 64), ("state", 32), ("length", 16), ("asciiobject_size", 40),
                        ("compactunicodeobject_size", 56))),
    ("gc", (("size", 176), ("collecting", 112), ("frame", 120), ("generation_stats_size", 1120),
            ("generation_stats", 104))),
    ("gen_object", SHARED_3_14["gen_object"]),
    ("llist_node", SHARED_3_14["llist_node"]),
    ("debugger_support", (("eval_breaker", 24), ("remote_debugger_support", 344),
                          ("remote_debugging_enabled", 8028), ("debugger_pending_call", 0),
                          ("debugger_script_path", 4), ("debugger_script_path_size", 512))),
)

LAYOUT_3_15_2 = dataclasses.replace(
    LAYOUT_3_14_10, version=(3, 15), runtime_interpreters_head=936,
    interp_next=7264, interp_threads_head=7336, interp_modules=7592, tstate_thread_id=176, tstate_native_thread_id=184,
    objects=dataclasses.replace(LAYOUT_3_14_10.objects, heaptype_cached_keys=888),
)

MEMBER_LISTS = {(3, 14): DEBUG_OFFSETS_3_14_10, (3, 15): DEBUG_OFFSETS_3_15_2}


def synthetic_runtime(groups, version_hex: int, size: int = DEBUG_OFFSETS_SIZE) -> bytes:
    """The first `size` bytes of a `_PyRuntime` whose debug offsets hold `groups`: cookie,
    version, free_threaded = 0, the members, then bytes that belong to _PyRuntimeState
    proper (not zero, so that a parser reading past the struct would notice)."""
    values = [value for _, members in groups for _, value in members]
    data = DEBUG_OFFSETS_COOKIE + struct.pack("<QQ", version_hex, 0) + struct.pack(f"<{len(values)}Q", *values)
    return (data + b"\xa5" * max(size, DEBUG_OFFSETS_SIZE))[:size]


def synthetic_runtime_3_14(version_hex: int = 0x030E0AF0, size: int = DEBUG_OFFSETS_SIZE) -> bytes:
    return synthetic_runtime(DEBUG_OFFSETS_3_14_10, version_hex, size)


def test_debug_offsets_3_15_synthetic():
    assert parse_debug_offsets(synthetic_runtime(DEBUG_OFFSETS_3_15_2, 0x030F02F0)) == LAYOUT_3_15_2


def test_debug_offsets_3_14_synthetic():
    assert parse_debug_offsets(synthetic_runtime_3_14()) == LAYOUT_3_14_10


@pytest.mark.parametrize("version_hex", [0x030E00F0, 0x030E00C1, 0x030E0AF0, 0x030E14F0],
                         ids=["3.14.0", "3.14.0rc1", "3.14.10", "3.14.20"])
def test_debug_offsets_3_14_every_release(version_hex):
    # One struct for the whole 3.14 series: checked identical in 3.14.0 and 3.14.10.
    assert parse_debug_offsets(synthetic_runtime_3_14(version_hex)) == LAYOUT_3_14_10


@pytest.mark.parametrize("version", sorted(MEMBER_LISTS), ids=["3.14", "3.15"])
def test_debug_offsets_member_order(version):
    # Members PythonLayout does not take move no field when swapped, so the order of
    # every member is compared as well: it decides where later structs' members are.
    names = [(group, tuple(name for name, _ in members)) for group, members in MEMBER_LISTS[version]]
    assert [(group, tuple(members)) for group, members in _DEBUG_OFFSETS_LAYOUTS[version]] == names


def test_debug_offsets_3_14_is_its_size():
    assert len(synthetic_runtime_3_14(size=2 * DEBUG_OFFSETS_SIZE).rstrip(b"\xa5")) == SIZEOF_DEBUG_OFFSETS_3_14


def test_debug_offsets_3_14_exactly_its_size():
    assert parse_debug_offsets(synthetic_runtime_3_14(size=SIZEOF_DEBUG_OFFSETS_3_14)) == LAYOUT_3_14_10
    with pytest.raises(MalformedInput, match="3.14's struct takes 760 bytes, got 759"):
        parse_debug_offsets(synthetic_runtime_3_14(size=SIZEOF_DEBUG_OFFSETS_3_14 - 1))


@pytest.mark.parametrize("version_hex, text", [(0x030E00A7, "3.14.0a7"), (0x030E00B2, "3.14.0b2"),
                                               (0x030D00B4, "3.13.0b4")])
def test_debug_offsets_rejects_alphas_and_betas(version_hex, text):
    data = synthetic_runtime_3_14(version_hex) if version_hex >> 16 == 0x030E else fake_debug_offsets(version_hex)
    with pytest.raises(MalformedInput, match=f"CPython {text} is an alpha or beta") as raised:
        parse_debug_offsets(data)
    assert "\n" not in str(raised.value)


def test_debug_offsets_unknown_future_version_message():
    with pytest.raises(MalformedInput) as raised:
        parse_debug_offsets(fake_debug_offsets(0x036300F0))     # 3.99.0
    message = str(raised.value)
    assert "\n" not in message
    assert "CPython 3.99 " in message and "0x36300f0" in message
    assert "known: 3.13, 3.14, 3.15" in message


@pytest.mark.parametrize("data", [fake_debug_offsets(0x030D00F0), synthetic_runtime_3_14()], ids=["3.13", "3.14"])
def test_debug_offsets_refuses_free_threaded_builds(data):
    data = bytearray(data)
    struct.pack_into("<Q", data, 16, 1)  # free_threaded
    with pytest.raises(MalformedInput, match="free-threaded"):
        parse_debug_offsets(bytes(data))


def test_debug_offsets_claiming_huge_structures_are_refused():
    """The struct is the process's to write: a structure that claims to be exabytes large
    cannot carry an offset past what any real one has (nor past the walker's s32 fields)."""
    names = [f"{group}.{name}" for group, members in DEBUG_OFFSETS_3_14_10 for name, _ in members]
    data = bytearray(synthetic_runtime_3_14())
    for member, value in (("unicode_object.size", 1 << 62), ("unicode_object.asciiobject_size", 1 << 40)):
        struct.pack_into("<Q", data, 24 + 8 * names.index(member), value)
    with pytest.raises(MalformedInput, match="asciiobject_size"):
        parse_debug_offsets(bytes(data))


# A minor version newer than any known is read with the newest member list (3.15's), and
# taken only if every member read passes its checks.

FUTURE_HEX = 0x031000F0     # 3.16.0


def inserted(groups, group: str, after: Optional[str], *members: Tuple[str, int]):
    """`groups` with `members` put into `group` after member `after` (at the end for None);
    a group not there yet is appended at the end of the struct."""
    if group not in [name for name, _ in groups]:
        return (*groups, (group, members))
    result = []
    for name, old in groups:
        if name == group:
            at = len(old) if after is None else [m for m, _ in old].index(after) + 1
            old = (*old[:at], *members, *old[at:])
        result.append((name, old))
    return tuple(result)


def test_a_future_version_that_adds_after_what_is_read_is_read_as_the_newest():
    groups = inserted(DEBUG_OFFSETS_3_15_2, "gc", "collecting", ("visited_space", 128))
    groups = inserted(groups, "jit_state", None, ("size", 96), ("executors", 8))
    layout = parse_debug_offsets(synthetic_runtime(groups, FUTURE_HEX))
    # No object table for 3.16: its other object offsets are nowhere to be read.
    assert layout == dataclasses.replace(LAYOUT_3_15_2, version=(3, 16), objects=None)


def test_a_future_version_that_moves_what_is_read_is_refused_naming_each_offset():
    """A member inserted in thread_state before thread_id (as 3.15 did to 3.14's list)
    shifts everything after it: the message names every offset that fails."""
    groups = inserted(DEBUG_OFFSETS_3_15_2, "thread_state", "current_frame", ("entry_frame", 104))
    with pytest.raises(MalformedInput) as raised:
        parse_debug_offsets(synthetic_runtime(groups, FUTURE_HEX))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("_Py_DebugOffsets of CPython 3.16 (PY_VERSION_HEX 0x31000f0) do not read as "
                              "3.15's, the newest known (known: 3.13, 3.14, 3.15): ")
    assert message.endswith("; 3.16 needs a member list of its own")
    for problem in ("pyobject.size = 0, not 16", "pyobject.ob_type = 16, not 8",
                    "code_object.firstlineno = 136 is not below the structure's size 0",
                    "interpreter_frame.owner = 80 is not below the structure's size 0"):
        assert problem in message


@pytest.mark.parametrize("member, value, problem", [
    ("thread_state.current_frame", 76, "thread_state.current_frame = 76 is not 8-byte aligned"),
    ("code_object.firstlineno", 70, "code_object.firstlineno = 70 is not 4-byte aligned"),
    ("code_object.qualname", 216, "code_object.qualname = 216 is not below the structure's size 216"),
    ("bytes_object.ob_size", 24, "bytes_object.ob_size = 24, not 16"),
    ("unicode_object.compactunicodeobject_size", 64,
     "unicode_object.compactunicodeobject_size = 64 is not below the structure's size 64"),
])
def test_each_check_of_a_known_version(member, value, problem):
    group, name = member.split(".")
    groups = tuple((g, tuple((m, value if (g, m) == (group, name) else v) for m, v in members))
                   for g, members in DEBUG_OFFSETS_3_15_2)
    with pytest.raises(MalformedInput) as raised:
        parse_debug_offsets(synthetic_runtime(groups, 0x030F02F0))
    assert str(raised.value) == f"_Py_DebugOffsets of CPython 3.15: {problem}"


@pytest.mark.parametrize("version", sorted(_DEBUG_OFFSETS_LAYOUTS), ids=lambda v: f"{v[0]}.{v[1]}")
def test_every_member_list_holds_every_member_read(version):
    names = {f"{group}.{member}" for group, members in _DEBUG_OFFSETS_LAYOUTS[version] for member in members}
    assert set(_CHECKED) - set(_OPTIONAL) <= names
