"""Our line-program runner against pyelftools' full decoder, row for row (an
end-of-sequence row by its address alone), on DWARF that
gcc writes here (versions 4 and 5) and on a CPython shared library; and the line
program we find for each compilation unit, its code and file names, against the one
pyelftools finds; and made-up programs that name or hold too much."""

import io
import os
import struct
from types import SimpleNamespace

import pytest
from elftools.elf.elffile import ELFFile

from bpfprof.symbolizer.errors import TooLarge
from bpfprof.symbolizer.native.dwarf_lines import (MAX_PATH, MAX_PROGRAM_BYTES, ProgramPlace, every_program_place,
                                                  leb128, line_program, line_sequences, program_place)
from conftest import PYENV_VERSIONS, skip_or_fail


def rows_both_ways(path, limit=None):
    with open(path, "rb") as f:
        dwarf = ELFFile(f).get_dwarf_info(relocate_dwarf_sections=False)
        for n, cu in enumerate(dwarf.iter_CUs()):
            if limit is not None and n >= limit:
                break
            # A row of line 0 in file 0 names no line, as the end of a sequence does.
            expected = [(e.state.address, None, None) if e.state.end_sequence or (e.state.file, e.state.line) == (0, 0)
                        else (e.state.address, e.state.file, e.state.line)
                        for e in dwarf.line_program_for_CU(cu).get_entries() if e.state is not None]
            program = line_program(dwarf, program_place(dwarf, cu.cu_offset))
            ours = [(address, None, None) if place == 0 else (address, place >> 32, place & 0xFFFFFFFF)
                    for addresses, places in line_sequences(program)
                    for address, place in zip(addresses, places)]
            yield ours, expected


@pytest.mark.parametrize("version", ["-gdwarf-4", "-gdwarf-5"])
def test_rows_match_pyelftools_for_gcc_output(build_c, version):
    binary = build_c("chain", version)
    compared = 0
    for ours, theirs in rows_both_ways(binary):
        assert ours == theirs
        compared += len(ours)
    assert compared > 10


def test_rows_match_pyelftools_for_libpython():
    libraries = sorted(PYENV_VERSIONS.glob("3.12.*/lib/libpython3.12.so.1.0"))
    if not libraries:
        skip_or_fail(f"no CPython 3.12 shared library under {PYENV_VERSIONS}")
    compared = 0
    for ours, theirs in rows_both_ways(libraries[-1], limit=40):
        assert ours == theirs
        compared += len(ours)
    assert compared > 10000


def file_names(header):
    """A pyelftools line program header's file names by file number, joined to their
    directories: file 0 is the first entry from version 5 on, and no entry before."""
    version, directories = header["version"], [d.decode() for d in header["include_directory"]]
    names = [] if version >= 5 else [""]
    for entry in header["file_entry"]:
        name = entry.name.decode()
        d = entry.dir_index if version >= 5 else entry.dir_index - 1
        names.append(name if name.startswith("/") or not 0 <= d < len(directories)
                     else os.path.join(directories[d], name))
    return names


def programs_both_ways(path):
    """(ours, pyelftools') line program of every compilation unit, as (code, file names)."""
    with open(path, "rb") as f:
        dwarf = ELFFile(f).get_dwarf_info(relocate_dwarf_sections=False)
        places = every_program_place(dwarf)
        for cu in dwarf.iter_CUs():
            assert places.get(cu.cu_offset) == program_place(dwarf, cu.cu_offset)
            ours, theirs = line_program(dwarf, places.get(cu.cu_offset)), dwarf.line_program_for_CU(cu)
            if theirs is not None:
                theirs.stream.seek(theirs.program_start_offset)
                code = theirs.stream.read(theirs.program_end_offset - theirs.program_start_offset)
                theirs = (code, file_names(theirs.header))
            yield (ours.code, ours.file_names) if ours is not None else None, theirs


@pytest.mark.parametrize("flags", [("-gdwarf-4",), ("-gdwarf-5",), ("-gdwarf-2", "-gstrict-dwarf"), ("-gsplit-dwarf",)],
                         ids=["dwarf-4", "dwarf-5", "dwarf-2", "split-dwarf-skeleton"])
def test_line_programs_are_found_as_pyelftools_finds_them(build_c, flags):
    pairs = list(programs_both_ways(build_c("chain", *flags)))
    assert pairs and all(ours == theirs and ours is not None for ours, theirs in pairs)


def test_line_programs_of_every_unit_of_libpython_are_found_as_pyelftools_finds_them():
    libraries = sorted(PYENV_VERSIONS.glob("3.13.*/lib/libpython3.13.so.1.0"))
    if not libraries:
        skip_or_fail(f"no CPython 3.13 shared library under {PYENV_VERSIONS}")
    pairs = list(programs_both_ways(libraries[-1]))
    assert len(pairs) > 100
    assert [ours for ours, _ in pairs] == [theirs for _, theirs in pairs]


def test_a_leb128_of_a_megabyte_is_read_in_one_pass():
    """Bits past a 64-bit number's are dropped, so a hostile file's megabyte-long number is
    read in linear time, and its end is still found."""
    data = b"\xff" * (1 << 20) + b"\x01" + b"\x05"
    value, after = leb128(data, 0)
    assert value < 1 << 70 and after == (1 << 20) + 1
    assert leb128(data, after) == (5, len(data))
    assert leb128(b"\x7f", 0, signed=True) == (-1, 1)


def hostile_program(directory: bytes, files: int) -> SimpleNamespace:
    """A version 4 line program whose header names one directory and `files` files in it,
    as the DWARFInfo that line_program reads it from."""
    names = b"".join(b"f%d\0\x01\0\0" % i for i in range(files))  # in directory 1, no time, no length
    header = bytes([1, 1, 1, -5 & 0xFF, 14, 13]) + bytes(12) + directory + b"\0\0" + names + b"\0"
    body = struct.pack("<H", 4) + struct.pack("<I", len(header)) + header + b"\x01"  # one copy opcode
    section = SimpleNamespace(stream=io.BytesIO(struct.pack("<I", len(body)) + body))
    return SimpleNamespace(debug_line_sec=section)


def test_file_names_of_a_line_program_are_bounded():
    """Ten thousand files in a directory of a megabyte would make ten gigabytes of paths:
    each is cut, and a header naming too much in all is too large."""
    small = line_program(hostile_program(b"/src", 3), ProgramPlace(0, 4, 8, 4))
    assert small.file_names == ["", "/src/f0", "/src/f1", "/src/f2"]
    cut = line_program(hostile_program(b"/" + b"d" * 10_000, 1), ProgramPlace(0, 4, 8, 4))
    assert [len(name) for name in cut.file_names] == [0, MAX_PATH]
    with pytest.raises(TooLarge):
        line_program(hostile_program(b"/" + b"d" * (1 << 20), 10_000), ProgramPlace(0, 4, 8, 4))


def test_a_line_program_over_its_cap_is_too_large():
    dwarf = hostile_program(b"/src", 1)
    dwarf.debug_line_sec.stream = io.BytesIO(struct.pack("<I", MAX_PROGRAM_BYTES + 1) + bytes(64))
    with pytest.raises(TooLarge):
        line_program(dwarf, ProgramPlace(0, 4, 8, 4))
