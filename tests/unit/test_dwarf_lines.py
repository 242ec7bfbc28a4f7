"""Our line-program runner against pyelftools' full decoder, row for row (an
end-of-sequence row by its address alone), on DWARF that
gcc writes here (versions 4 and 5) and on a CPython shared library; and the line
program we find for each compilation unit, its code and file names, against the one
pyelftools finds; and made-up programs that name or hold too much, and units whose
lengths do not fit their section."""

import io
import os
import struct
import subprocess
import time
import tracemalloc
from types import SimpleNamespace

import pytest
from elftools.elf.elffile import ELFFile

from bpfprof.symbolizer.errors import TooLarge
from bpfprof.symbolizer.native.dwarf_lines import (MAX_ABBREV_BYTES, MAX_PATH, MAX_PROGRAM_BYTES, AbbreviationTables,
                                                  ProgramPlace, every_program_place, leb128, line_program,
                                                  line_sequences, program_place)
from bpfprof.symbolizer.native.elf import open_elf_symbols
from conftest import FIXTURES, PYENV_VERSIONS, skip_or_fail
from test_elf import chain_line_numbers, compressed, file_offset, symbol_addresses


def abbreviations(dwarf):
    return AbbreviationTables(dwarf.debug_abbrev_sec.stream)


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
            program = line_program(dwarf, program_place(dwarf, cu.cu_offset, abbreviations(dwarf)))
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
            assert places.get(cu.cu_offset) == program_place(dwarf, cu.cu_offset, abbreviations(dwarf))
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


def with_units_after(binary, tail: bytes, name: str):
    """A copy of the binary whose .debug_info ends in `tail`, where a unit's header is looked for."""
    with open(binary, "rb") as f:
        info = ELFFile(f).get_section_by_name(".debug_info").data()
    contents = binary.with_name(binary.name + f"_{name}.debug_info")
    contents.write_bytes(info + tail)
    copy = binary.with_name(binary.name + f"_{name}")
    subprocess.run(["objcopy", f"--update-section=.debug_info={contents}", str(binary), str(copy)], check=True)
    return copy


@pytest.fixture(scope="module")
def two_units(tmp_path_factory):
    """chain.c and a second unit, in one binary."""
    directory = tmp_path_factory.mktemp("two_units")
    second = directory / "second.c"
    second.write_text("int second_unit(int x) { return x * 3 + 1; }\n")
    binary = directory / "two_units"
    subprocess.run(["gcc", "-O1", "-g", "-o", str(binary), str(FIXTURES / "chain.c"), str(second)], check=True)
    return binary


# After the units gcc wrote: a megabyte of units of length 0, or one unit that claims
# more than the section holds.
TAILS = {"zero_length": bytes(1 << 20), "past_the_end": struct.pack("<I", 0xFFFFFFF0) + bytes(1 << 20),
         "past_the_end_64": struct.pack("<IQ", 0xFFFFFFFF, 1 << 62) + bytes(1 << 20)}


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("edit", [None, compressed], ids=["in-place", "compressed"])
def test_units_that_do_not_fit_their_section_leave_the_other_units_lines(two_units, tail, edit):
    """A unit's length too small for its header, or reaching past its section, ends the
    walk of .debug_info quickly and within a little memory (a length taken as it was read
    made reads of the whole rest of the section for each unit: quadratic in time when
    compressed). The lines of the units before it are still found."""
    binary = with_units_after(two_units, TAILS[tail], tail)
    if edit:
        binary = edit(binary)
    addresses, starts = symbol_addresses(binary), chain_line_numbers()
    tracemalloc.start()
    began = time.perf_counter()
    try:
        symbols = open_elf_symbols(str(binary))
        found = {name: symbols.get_function(file_offset(binary, addresses[name]) + 1)
                 for name in ("chain_a", "second_unit")}
        elapsed = time.perf_counter() - began
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    symbols.close()
    assert starts["chain_a"] <= found["chain_a"].line <= starts["chain_a"] + 12
    assert found["second_unit"].file.endswith("second.c") and found["second_unit"].line == 1
    assert elapsed < 3  # under 0.1 s here; minutes before units were checked
    assert peak < (3 << 20) + (1 << 20) * (edit is not None)  # an inflated copy of .debug_info at most


def with_first_unit_length(binary, length: int):
    """A copy of the binary whose first compilation unit claims `length` bytes."""
    data = bytearray(binary.read_bytes())
    with open(binary, "rb") as f:
        offset = ELFFile(f).get_section_by_name(".debug_info")["sh_offset"]
    struct.pack_into("<I", data, offset, length)
    copy = binary.with_name(binary.name + f"_first_unit_{length:x}")
    copy.write_bytes(data)
    return copy


@pytest.mark.parametrize("length", [0, 3, 0xFFFFFFF0])
@pytest.mark.parametrize("edit", [None, compressed], ids=["in-place", "compressed"])
def test_a_first_unit_that_does_not_fit_leaves_the_names(two_units, length, edit):
    binary = with_first_unit_length(two_units, length)
    if edit:
        binary = edit(binary)
    addresses = symbol_addresses(binary)
    began = time.perf_counter()
    symbols = open_elf_symbols(str(binary))
    found = [symbols.get_function(file_offset(binary, addresses[name]) + 1) for name in ("chain_a", "second_unit")]
    assert time.perf_counter() - began < 3
    symbols.close()
    assert [info.name for info in found] == ["chain_a", "second_unit"]
    assert found[0].line == 0  # in the first unit


def units_on_one_table(count, table):
    """DWARF of `count` version 4 units, each a top DIE of abbreviation code 0x7f from the
    table at offset 0 of .debug_abbrev, with a 4-byte value after it (DW_AT_stmt_list)."""
    unit = struct.pack("<IHIB", 12, 4, 0, 8) + b"\x7f" + struct.pack("<I", 0)
    info, abbrev = unit * count, table
    return SimpleNamespace(debug_info_sec=SimpleNamespace(stream=io.BytesIO(info), size=len(info)),
                           debug_abbrev_sec=SimpleNamespace(stream=io.BytesIO(abbrev), size=len(abbrev)))


def abbreviation(code, *pairs):
    """One table entry: code, DW_TAG_compile_unit, no children, (attribute, form) pairs."""
    return bytes([code, 0x11, 0, *(b for pair in pairs for b in pair), 0, 0])


def test_units_sharing_an_abbreviation_are_looked_up_once():
    """A hundred thousand units on one table: its entry is found once, not per unit."""
    dwarf = units_on_one_table(100_000, abbreviation(1, (0x03, 0x08)) * 20_000 + abbreviation(0x7f, (0x10, 0x06))
                               + b"\0")
    started = time.monotonic()
    places = every_program_place(dwarf)
    assert len(places) == 100_000 and time.monotonic() - started < 10  # a hang guard: 1 s here


def test_searching_abbreviation_tables_is_bounded():
    """A table longer than MAX_ABBREV_BYTES that never holds the unit's code: TooLarge,
    having parsed no more than that, however many units ask."""
    table = abbreviation(1, (0x03, 0x08)) * (MAX_ABBREV_BYTES // 7 + 1) + b"\0"
    with pytest.raises(TooLarge):
        every_program_place(units_on_one_table(1000, table))
    tables = AbbreviationTables(io.BytesIO(table))
    assert tables.get_forms(0, 1) == [(0x03, 0x08)]  # the first entry: 7 bytes parsed
    with pytest.raises(TooLarge):
        tables.get_forms(0, 0x7f)
    short = AbbreviationTables(io.BytesIO(abbreviation(1, (0x03, 0x08)) * 100))  # ends without a terminator
    assert short.get_forms(0, 0x7f) is None
