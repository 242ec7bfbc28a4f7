"""The CPython layout table checked against the headers of each CPython that pyenv has
installed: a small C program per version prints offsetof()/sizeof() for every field of
PythonLayout, and the table must agree. For 3.13 the offsets come from `_Py_DebugOffsets`
instead, so its test reads the start of `_PyRuntime` out of the installed libpython and
compares what `parse_debug_offsets` makes of it with the same header measurements."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from conftest import skip_or_fail
from elftools.elf.elffile import ELFFile

from bpfprof.symbolizer.python_layouts import (
    DEBUG_OFFSETS_COOKIE,
    DEBUG_OFFSETS_SIZE,
    LAYOUTS,
    PythonLayout,
    layout_for,
    parse_debug_offsets,
)

TABLE_MINORS = (8, 9, 10, 11, 12)
DEBUG_OFFSETS_MINORS = (13,)
LAYOUT_FIELDS = [f.name for f in dataclasses.fields(PythonLayout) if f.name != "version"]
PT_LOAD = "PT_LOAD"


# ---------------------------------------------------------------------------------------
# Finding the installed interpreters


def pyenv_root() -> Optional[Path]:
    """PYENV_ROOT, else what `pyenv root` says, else ~/.pyenv; None if none of them exists."""
    candidates: List[str] = []
    if os.environ.get("PYENV_ROOT"):
        candidates.append(os.environ["PYENV_ROOT"])
    if shutil.which("pyenv"):
        result = subprocess.run(["pyenv", "root"], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(result.stdout.strip())
    candidates.append(os.path.expanduser("~/.pyenv"))
    for candidate in candidates:
        if (Path(candidate) / "versions").is_dir():
            return Path(candidate)
    return None


def installed_version(minor: int) -> Path:
    """The newest pyenv-installed 3.<minor>.<patch> (default build, not free-threaded)
    that ships its headers; skips the test when there is none."""
    root = pyenv_root()
    if root is None:
        skip_or_fail("pyenv is not installed (no PYENV_ROOT, `pyenv root` or ~/.pyenv)")
    pattern = re.compile(rf"3\.{minor}\.(\d+)")
    found = []
    for entry in (root / "versions").iterdir():
        match = pattern.fullmatch(entry.name)
        if match and (entry / "include" / f"python3.{minor}" / "Python.h").is_file():
            found.append((int(match.group(1)), entry))
    if not found:
        pytest.skip(f"CPython 3.{minor} with headers is not installed under {root}/versions")
    return max(found)[1]


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
        "runtime_interpreters_head": off("_PyRuntimeState", "interpreters.head"),
        "interp_next": off("PyInterpreterState", "next"),
        "interp_threads_head": off("PyInterpreterState", "tstate_head" if old_frames else "threads.head"),
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


def internal_headers(minor: int) -> List[str]:
    if minor == 8:
        return ["internal/pycore_pystate.h"]   # _PyRuntimeState and PyInterpreterState
    headers = ["internal/pycore_runtime.h", "internal/pycore_interp.h"]
    if minor >= 11:
        headers.append("internal/pycore_frame.h")
    return headers


def c_program(minor: int) -> str:
    lines = ["#define Py_BUILD_CORE 1", "#include <Python.h>"]
    if minor <= 10:                            # 3.8's Python.h leaves out code.h
        lines += ["#include <code.h>", "#include <frameobject.h>"]
    lines += [f'#include "{header}"' for header in internal_headers(minor)]
    lines += ["#include <stddef.h>", "#include <stdio.h>", "", "int main(void) {"]
    measures = {name: expr for name, expr in c_expressions(minor).items() if expr is not None}
    if minor >= 13:
        measures["sizeof_debug_offsets"] = "sizeof(_Py_DebugOffsets)"
    for name, expr in measures.items():
        lines.append(f'    printf("%s %ld\\n", "{name}", (long)({expr}));')
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def measure(tmp_path_factory):
    """measure(minor) -> {field: value} from 3.<minor>'s own headers, -1 where the field
    does not exist; compiled and run once per version."""
    cache: Dict[int, Dict[str, int]] = {}

    def run(minor: int) -> Dict[str, int]:
        if minor in cache:
            return cache[minor]
        prefix = installed_version(minor)
        if shutil.which("gcc") is None:
            skip_or_fail("gcc is not installed")
        include = prefix / "include" / f"python3.{minor}"
        work = tmp_path_factory.mktemp(f"layout3{minor}")
        source, binary = work / "layout.c", work / "layout"
        source.write_text(c_program(minor))
        compile_cmd = ["gcc", "-w", "-o", str(binary), "-I", str(include), "-I", str(include / "internal"),
                       str(source)]
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


@pytest.mark.parametrize("minor", TABLE_MINORS, ids=[f"3.{m}" for m in TABLE_MINORS])
def test_table_matches_headers(minor, measure):
    layout = LAYOUTS[(3, minor)]
    assert layout.version == (3, minor)
    measured = measure(minor)
    table = {name: getattr(layout, name) for name in LAYOUT_FIELDS}
    mismatches = {name: (table[name], measured[name]) for name in LAYOUT_FIELDS if table[name] != measured[name]}
    assert not mismatches, f"3.{minor} (table, headers): {mismatches}"


@pytest.mark.parametrize("minor", DEBUG_OFFSETS_MINORS, ids=[f"3.{m}" for m in DEBUG_OFFSETS_MINORS])
def test_debug_offsets_match_headers(minor, measure):
    measured = measure(minor)
    assert measured["sizeof_debug_offsets"] <= DEBUG_OFFSETS_SIZE
    data = runtime_bytes(installed_version(minor), minor)
    layout = parse_debug_offsets(data)
    assert layout.version == (3, minor)
    parsed = {name: getattr(layout, name) for name in LAYOUT_FIELDS}
    mismatches = {name: (parsed[name], measured[name]) for name in LAYOUT_FIELDS if parsed[name] != measured[name]}
    assert not mismatches, f"3.{minor} (debug offsets, headers): {mismatches}"


def test_every_field_is_measured():
    for minor in TABLE_MINORS + DEBUG_OFFSETS_MINORS:
        assert set(c_expressions(minor)) == set(LAYOUT_FIELDS)


def test_table_versions():
    assert sorted(LAYOUTS) == [(3, m) for m in TABLE_MINORS]
    for minor in TABLE_MINORS:
        assert layout_for((3, minor)) is LAYOUTS[(3, minor)]
    for version in ((2, 7), (3, 7), (3, 13), (3, 14), (4, 0)):
        assert layout_for(version) is None


def fake_debug_offsets(version_hex: int, cookie: bytes = DEBUG_OFFSETS_COOKIE) -> bytes:
    return cookie + struct.pack("<Q", version_hex) + bytes(DEBUG_OFFSETS_SIZE - 16)


def test_debug_offsets_rejects_a_wrong_cookie():
    with pytest.raises(ValueError, match="cookie"):
        parse_debug_offsets(fake_debug_offsets(0x030D00F0, cookie=b"notdebug"))


def test_debug_offsets_rejects_versions_before_3_13():
    with pytest.raises(ValueError, match="3.12"):
        parse_debug_offsets(fake_debug_offsets(0x030C01F0))


def test_debug_offsets_rejects_short_data():
    with pytest.raises(ValueError):
        parse_debug_offsets(fake_debug_offsets(0x030D00F0)[:100])


def test_debug_offsets_rejects_unknown_minor_versions():
    with pytest.raises(ValueError, match="3.99"):
        parse_debug_offsets(fake_debug_offsets(0x036300F0))


def test_debug_offsets_rejects_offsets_outside_their_structures():
    with pytest.raises(ValueError, match="size"):
        parse_debug_offsets(fake_debug_offsets(0x030D00F0))     # every member zero
