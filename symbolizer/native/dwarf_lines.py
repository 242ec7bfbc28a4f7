"""The DWARF line-number program of one compilation unit, run to its rows: sequences of
addresses, each with the file and line it belongs to.

The program is found here: the compilation unit's header and its top DIE are read only
as far as the DIE's DW_AT_stmt_list, and the program's header only for what running it
needs and its file names. (pyelftools parses the unit's whole abbreviation table, the
DIE and the header through its struct library, which took more than half the time of
reading a line table.) The program is run keeping only the registers a profiler needs
(address, file, line). pyelftools' own decoder keeps every register and copies the
state for every row, which is several times slower: big compilation units such as
CPython's unicodeobject.c take most of a second there.

The state machine is DWARF 2 to 5's (section 6.2 of the DWARF 5 standard), for
targets with one operation per instruction (op_index is always 0).
"""

from __future__ import annotations

import os
import struct
import sys
from typing import BinaryIO, Dict, List, NamedTuple, Optional, Tuple

from bpfprof.symbolizer.errors import TooLarge

# Standard opcodes
_COPY, _ADVANCE_PC, _ADVANCE_LINE, _SET_FILE, _SET_COLUMN, _NEGATE_STMT = 1, 2, 3, 4, 5, 6
_CONST_ADD_PC, _FIXED_ADVANCE_PC = 8, 9
# Extended opcodes (after a 0 byte and a length)
_END_SEQUENCE, _SET_ADDRESS = 1, 2

_DW_AT_STMT_LIST = 0x10
_UNIT_TYPES_WITH_ID = (4, 5)       # DW_UT_skeleton, DW_UT_split_compile: an 8-byte id follows
_UNIT_TYPES_WITH_TYPE = (2, 6)     # DW_UT_type, DW_UT_split_type: a signature and an offset
# How to step over an attribute value, by form (DWARF 5, 7.5.6; GNU extensions last):
# a size in bytes, or "address", "offset", "leb", "string", a block's length prefix.
_FORMS = {
    0x01: "address", 0x03: "block2", 0x04: "block4", 0x05: 2, 0x06: 4, 0x07: 8, 0x08: "string",
    0x09: "block", 0x0a: "block1", 0x0b: 1, 0x0c: 1, 0x0d: "leb", 0x0e: "offset", 0x0f: "leb",
    0x10: "offset", 0x11: 1, 0x12: 2, 0x13: 4, 0x14: 8, 0x15: "leb", 0x16: "indirect", 0x17: "offset",
    0x18: "block", 0x19: 0, 0x1a: "leb", 0x1b: "leb", 0x1c: 4, 0x1d: "offset", 0x1e: 16, 0x1f: "offset",
    0x20: 8, 0x21: 0, 0x22: "leb", 0x23: "leb", 0x24: 8, 0x25: 1, 0x26: 2, 0x27: 3, 0x28: 4, 0x29: 1,
    0x2a: 2, 0x2b: 3, 0x2c: 4,
    0x1f01: "leb", 0x1f02: "leb", 0x1f20: "offset", 0x1f21: "offset",
}
_TOP_DIE_BYTES = 1 << 16  # read of a unit to find its top DIE's attributes
_ABBREV_BYTES = 1 << 16   # read of an abbreviation table at a time
# Parsed in all to find the abbreviations of a file's top DIEs: each is most often the
# first of its unit's table (libpython3.13's .debug_abbrev, a table per unit, has 315 KB).
MAX_ABBREV_BYTES = 1 << 20


def _read(stream: BinaryIO, offset: int, size: int) -> bytes:
    stream.seek(offset)
    return stream.read(size)


def _unit_extent(head: bytes, offset: int) -> Tuple[int, int, int]:
    """(offset size, start, end) of the unit at `offset` of .debug_info or .debug_line that
    starts with `head`: its bytes after the unit length are start to end."""
    (length,) = struct.unpack_from("<I", head)
    if length == 0xFFFFFFFF:
        return 8, offset + 12, offset + 12 + struct.unpack_from("<Q", head, 4)[0]
    return 4, offset + 4, offset + 4 + length


def _checked_unit_extent(info, offset: int) -> Tuple[int, int, int]:
    """_unit_extent() of the compilation unit at `offset` in .debug_info, which must hold
    at least a version 2 to 4 header (version, abbreviation offset, address size) and end
    within the section."""
    offset_size, start, end = _unit_extent(_read(info.stream, offset, 12), offset)
    if end - start < 2 + offset_size + 1 or end > info.size:
        raise ValueError(f"a compilation unit of {end - start} bytes at {offset:#x} of .debug_info "
                         f"({info.size} bytes)")
    return offset_size, start, end


def _unit_header(info, offset: int) -> Tuple[int, int, int, int, bytes]:
    """(version, offset size, address size, abbreviation table offset, the unit's bytes
    from its top DIE on) of the compilation unit at `offset` in .debug_info."""
    offset_size, i, end = _checked_unit_extent(info, offset)
    head = _read(info.stream, i, 2 + 8 + 2 + 8 + 16)
    offset_format = "<Q" if offset_size == 8 else "<I"
    (version,) = struct.unpack_from("<H", head)
    if version >= 5:
        unit_type, address_size = head[2], head[3]
        (abbrev,) = struct.unpack_from(offset_format, head, 4)
        i += 4 + offset_size
        if unit_type in _UNIT_TYPES_WITH_ID:
            i += 8
        elif unit_type in _UNIT_TYPES_WITH_TYPE:
            i += 8 + offset_size
    else:
        (abbrev,) = struct.unpack_from(offset_format, head, 2)
        address_size = head[2 + offset_size]
        i += 2 + offset_size + 1
    if i > end:
        raise ValueError(f"a compilation unit at {offset:#x} of .debug_info too short for its header")
    return version, offset_size, address_size, abbrev, _read(info.stream, i, min(end - i, _TOP_DIE_BYTES))


class AbbreviationTables:
    """Abbreviations of one .debug_abbrev as units ask for them, each (table, code) found
    once: a hostile file points thousands of units at one long table. All the searches
    together parse at most MAX_ABBREV_BYTES; past that TooLarge is raised."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._found: Dict[Tuple[int, int], Optional[List[Tuple[int, int]]]] = {}
        self._budget = MAX_ABBREV_BYTES

    def get_forms(self, offset: int, code: int) -> Optional[List[Tuple[int, int]]]:
        """(attribute, form) of abbreviation `code` in the table at `offset`; None if the
        table has no such code."""
        if (offset, code) not in self._found:
            self._found[(offset, code)] = self._search(offset, code)
        return self._found[(offset, code)]

    def _search(self, offset: int, code: int) -> Optional[List[Tuple[int, int]]]:
        size = _ABBREV_BYTES
        while True:
            want = min(size, self._budget)
            data = _read(self._stream, offset, want)
            try:
                forms, parsed = _find_abbreviation(data, code)
            except IndexError:  # the table goes on past what was read
                self._budget -= len(data)
                if len(data) < want:
                    return None  # the section ends within the table
                if want < size or self._budget <= 0:
                    raise TooLarge(f"abbreviation tables searched past {MAX_ABBREV_BYTES} bytes") from None
                size *= 4
                continue
            self._budget -= parsed
            return forms


def _find_abbreviation(data: bytes, code: int) -> Tuple[Optional[List[Tuple[int, int]]], int]:
    """(attribute, form) of abbreviation `code` in the table at the start of data (None if
    the table ends without it), and the bytes parsed to tell."""
    i = 0
    while True:
        entry, i = leb128(data, i)
        if entry == 0:
            return None, i
        _, i = leb128(data, i)  # tag
        i += 1  # children or not
        forms = []
        while True:
            attribute, i = leb128(data, i)
            form, i = leb128(data, i)
            if attribute == 0 and form == 0:
                break
            if form == 0x21:  # implicit_const: the value is here, not in the DIE
                _, i = leb128(data, i, signed=True)
            forms.append((attribute, form))
        if entry == code:
            return forms, i


def _stmt_list(die: bytes, forms: List[Tuple[int, int]], offset_size: int, address_size: int,
               version: int) -> Optional[int]:
    """The value of DW_AT_stmt_list among the DIE's attributes, stepping over the ones
    before it; None when it has none or a form not known here comes first."""
    i = 0
    for attribute, form in forms:
        while form == 0x16:  # indirect: the form is in the DIE
            form, i = leb128(die, i)
        how = _FORMS.get(form)
        if how == "address" or (form == 0x10 and version == 2):  # a DWARF 2 ref_addr is address-sized
            size = address_size
        elif how == "offset":
            size = offset_size
        elif isinstance(how, int):
            size = how
        elif how == "leb":
            _, i = leb128(die, i)
            continue
        elif how == "string":
            i = die.index(b"\0", i) + 1
            continue
        elif how == "block":
            size, i = leb128(die, i)
        elif how in ("block1", "block2", "block4"):
            width = int(how[-1])
            size = int.from_bytes(die[i:i + width], "little")
            i += width
        else:
            return None
        if attribute == _DW_AT_STMT_LIST:
            value = die[i:i + size]
            return int.from_bytes(value, "little") if size in (4, 8) and len(value) == size else None
        i += size
    return None


class ProgramPlace(NamedTuple):
    """Where a compilation unit's line program is in .debug_line, and how its unit is encoded."""
    offset: int
    offset_size: int
    address_size: int
    version: int


def program_place(dwarf, cu_offset: int, abbreviations: AbbreviationTables) -> Optional[ProgramPlace]:
    """Where the line program of the compilation unit at `cu_offset` is, or None if it
    has none or its top DIE cannot be read. `abbreviations` are dwarf's."""
    try:
        version, offset_size, address_size, abbrev, die = _unit_header(dwarf.debug_info_sec, cu_offset)
        code, i = leb128(die, 0)
        forms = abbreviations.get_forms(abbrev, code)
        offset = _stmt_list(die[i:], forms, offset_size, address_size, version) if forms is not None else None
    except (IndexError, ValueError, struct.error):
        return None
    return ProgramPlace(offset, offset_size, address_size, version) if offset is not None else None


def every_program_place(dwarf) -> Dict[int, ProgramPlace]:
    """program_place() of every compilation unit, by unit offset: what a line lookup needs
    of .debug_info, read in one pass. The walk stops at a unit too short for its header or
    ending past the section (the units after it cannot be found), so each step advances by
    a header at least: at most a unit for every 11 bytes of the section."""
    places = {}
    info = dwarf.debug_info_sec
    abbreviations = AbbreviationTables(dwarf.debug_abbrev_sec.stream)
    offset = 0
    while offset < info.size:
        try:
            end = _checked_unit_extent(info, offset)[2]
        except (ValueError, struct.error):
            break
        place = program_place(dwarf, offset, abbreviations)
        if place is not None:
            places[offset] = place
        offset = end
    return places


class LineProgram(NamedTuple):
    """What running a line program needs of its header, and the program itself."""
    min_instruction_length: int
    line_base: int
    line_range: int
    opcode_base: int
    operand_counts: bytes  # of the standard opcodes 1 .. opcode_base - 1
    file_names: List[str]  # by the program's file number; "" where none is named
    code: bytes


_DW_LNCT_PATH, _DW_LNCT_DIRECTORY_INDEX = 1, 2
_STRING_FORMS = {0x0e: "debug_str_sec", 0x1f: "debug_line_str_sec"}  # DW_FORM_strp, DW_FORM_line_strp
_FIXED_FORMS = {0x0b: 1, 0x05: 2, 0x06: 4, 0x07: 8, 0x1e: 16}  # data1, data2, data4, data8, data16
_ENTRY_BYTES = sys.getsizeof({0: 0})  # of a version 5 header's directory or file entry, held while it is read
_STRING_BYTES = 256  # read at a time for a string in .debug_str or .debug_line_str
# Bounds on one line program. The largest here (docker's, libasan's, libpython's) are under
# 600 KB with a few hundred files; every row takes at least a byte of the program.
MAX_PROGRAM_BYTES = 2 << 20
MAX_PATH = 4096  # characters of a directory or file name kept (a longer one is cut)
MAX_NAMES_BYTES = 4 << 20  # of the directory and file names of one program, in all


class _NamesBudget:
    """What a program's header may name in all, counted as the memory its names and
    entries take (so that many empty names count too); past it, the program is too large."""

    def __init__(self) -> None:
        self.left = MAX_NAMES_BYTES

    def take(self, name: str) -> str:
        self.spend(sys.getsizeof(name))
        return name

    def spend(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise TooLarge(f"a line program names more than {MAX_NAMES_BYTES} bytes of files and directories")


def line_program(dwarf, place: Optional[ProgramPlace]) -> Optional[LineProgram]:
    """The line program at `place` in .debug_line, its header decoded (DWARF 2 to 5,
    section 6.2.4), or None for no place."""
    if place is None:
        return None
    stream = dwarf.debug_line_sec.stream
    offset_size, start, end = _unit_extent(_read(stream, place.offset, 12), place.offset)
    if end - start > MAX_PROGRAM_BYTES:
        raise TooLarge(f"a line program of {end - start} bytes (at most {MAX_PROGRAM_BYTES} are read)")
    data = _read(stream, start, end - start)
    if len(data) < end - start:
        raise ValueError(f"a line program of {end - start} bytes at {place.offset:#x} goes past .debug_line")
    (version,) = struct.unpack_from("<H", data)
    i = 4 if version >= 5 else 2  # a version 5 header names address and segment selector sizes
    header_length = int.from_bytes(data[i:i + offset_size], "little")
    i += offset_size
    code_start = i + header_length
    unit = data[i]
    i += 3 if version >= 4 else 2  # maximum operations per instruction (4 on), default_is_stmt
    line_base, line_range, opcode_base = struct.unpack_from("<bBB", data, i)
    i += 3
    if opcode_base == 0 or line_range == 0 or code_start > len(data):
        raise ValueError("malformed line program header")
    operand_counts = data[i:i + opcode_base - 1]
    i += opcode_base - 1
    budget = _NamesBudget()
    if version >= 5:
        entries, i = _entries(dwarf, data, i, offset_size, budget)
        directories = [str(d.get(_DW_LNCT_PATH, "")) for d in entries]
        files, _ = _entries(dwarf, data, i, offset_size, budget)
        names = [budget.take(_join(directories, f.get(_DW_LNCT_PATH, ""), f.get(_DW_LNCT_DIRECTORY_INDEX, 0)))
                 for f in files]
    else:
        directories, i = _strings_until_empty(data, i, budget)
        names = [""]  # file 0 is not one of a version 2 to 4 program's
        while data[i]:
            name_end = data.index(b"\0", i)
            name = budget.take(data[i:min(name_end, i + MAX_PATH)].decode(errors="replace"))
            directory, i = leb128(data, name_end + 1)
            _, i = leb128(data, i)  # modification time
            _, i = leb128(data, i)  # length
            names.append(budget.take(_join(directories, name, directory - 1)))  # directory 0 is the unit's own
    if len(operand_counts) != opcode_base - 1:
        raise ValueError("a line program header cut short")
    return LineProgram(unit, line_base, line_range, opcode_base, operand_counts, names, data[code_start:])


def _join(directories: List[str], name: str, directory: int) -> str:
    if name.startswith("/") or not 0 <= directory < len(directories):
        return name[:MAX_PATH]
    return os.path.join(directories[directory], name)[:MAX_PATH]


def _strings_until_empty(data: bytes, i: int, budget: _NamesBudget) -> Tuple[List[str], int]:
    strings = []
    while data[i]:
        end = data.index(b"\0", i)
        strings.append(budget.take(data[i:min(end, i + MAX_PATH)].decode(errors="replace")))
        i = end + 1
    return strings, i + 1


def _entries(dwarf, data: bytes, i: int, offset_size: int, budget: _NamesBudget
             ) -> Tuple[List[Dict[int, object]], int]:
    """A version 5 header's directory or file name entries, each as content type -> value
    (strings decoded, numbers as numbers), and the index after them."""
    formats = []
    count = data[i]
    i += 1
    for _ in range(count):
        content, i = leb128(data, i)
        form, i = leb128(data, i)
        formats.append((content, form))
    count, i = leb128(data, i)
    if count > len(data) - i or (count and not formats):  # each entry of some contents takes a byte at least
        raise ValueError(f"a line program header claims {count} entries of {len(formats)} contents")
    budget.spend(count * _ENTRY_BYTES)
    entries = []
    for _ in range(count):
        entry: Dict[int, object] = {}
        for content, form in formats:
            if form == 0x08:  # DW_FORM_string
                end = data.index(b"\0", i)
                entry[content] = budget.take(data[i:min(end, i + MAX_PATH)].decode(errors="replace"))
                i = end + 1
            elif form in _STRING_FORMS:
                entry[content] = budget.take(_string_at(getattr(dwarf, _STRING_FORMS[form]),
                                                        int.from_bytes(data[i:i + offset_size], "little")))
                i += offset_size
            elif form == 0x0f:  # DW_FORM_udata
                entry[content], i = leb128(data, i)
            elif form in _FIXED_FORMS:
                entry[content] = int.from_bytes(data[i:i + _FIXED_FORMS[form]], "little")
                i += _FIXED_FORMS[form]
            elif form == 0x09:  # DW_FORM_block
                size, i = leb128(data, i)
                i += size
            else:
                raise ValueError(f"line program header entry in form {form:#x}")
        entries.append(entry)
    return entries, i


def _string_at(section, offset: int) -> str:
    """The string at offset in a string section, cut at MAX_PATH bytes."""
    if section is None:
        raise ValueError("a line program names a string section the file does not have")
    size = _STRING_BYTES
    while True:
        data = _read(section.stream, offset, size)
        end = data.find(b"\0")
        if end >= 0 or len(data) >= MAX_PATH:
            return data[:end if end >= 0 else MAX_PATH].decode(errors="replace")
        if len(data) < size:
            raise ValueError("unterminated string")
        size *= 4


_LEB128_BITS = 70  # kept of a LEB128 number: ten bytes, more than any 64-bit value takes


def leb128(data: bytes, i: int, signed: bool = False) -> Tuple[int, int]:
    """The LEB128 number at data[i] and the index after it. Bits past _LEB128_BITS are
    dropped, so that a number of any length (a file may hold a megabyte of one) is read in
    time linear in its length."""
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        if shift < _LEB128_BITS:
            value |= (byte & 0x7F) << shift
            shift += 7
        if byte < 0x80:
            return (value - (1 << shift) if signed and byte & 0x40 else value), i


def line_sequences(program: LineProgram) -> List[Tuple[List[int], List[int]]]:
    """The program's rows in the order it emits them, as sequences: (addresses, places),
    place = file number << 32 | line, and 0 for the row that ends the sequence (as for a
    row of line 0 in file 0, no line is named). Two flat
    lists rather than a tuple per row: this is the hot loop of reading a line table, so
    the special opcodes' steps are looked up, the opcodes are tested most common first
    (in gcc's output: special, set_column, negate_stmt, copy, advance_line) and their
    operands read in place."""
    unit, line_range, opcode_base = program.min_instruction_length, program.line_range, program.opcode_base
    operand_counts = program.operand_counts
    address_steps = [0] * 256
    line_steps = [0] * 256
    for opcode in range(opcode_base, 256):
        address_steps[opcode] = (opcode - opcode_base) // line_range * unit
        line_steps[opcode] = program.line_base + (opcode - opcode_base) % line_range
    const_add = address_steps[255]
    code = program.code
    sequences: List[Tuple[List[int], List[int]]] = []
    addresses: List[int] = []
    places: List[int] = []
    add_address, add_place = addresses.append, places.append
    address, file, line = 0, 1 << 32, 1  # file: its number << 32
    i, end = 0, len(code)
    while i < end:
        opcode = code[i]
        i += 1
        if opcode >= opcode_base:
            address += address_steps[opcode]
            line += line_steps[opcode]
            add_address(address)
            add_place(file | line)
        elif opcode == _SET_COLUMN:  # as common as the special opcodes in gcc's output: its operand skipped
            while code[i] >= 0x80:
                i += 1
            i += 1
        elif opcode == _NEGATE_STMT:
            pass
        elif opcode == _COPY:
            add_address(address)
            add_place(file | line)
        elif opcode == _ADVANCE_LINE:
            advance = code[i]
            if advance < 0x80:
                i += 1
                line += advance - 0x80 if advance & 0x40 else advance
            else:
                advance, i = leb128(code, i, signed=True)
                line += advance
        elif opcode == _SET_FILE:
            number, i = leb128(code, i)
            file = number << 32
        elif opcode == 0:
            length, i = leb128(code, i)
            sub = code[i]
            if sub == _END_SEQUENCE:
                add_address(address)
                add_place(0)
                sequences.append((addresses, places))
                addresses, places = [], []
                add_address, add_place = addresses.append, places.append
                address, file, line = 0, 1 << 32, 1
            elif sub == _SET_ADDRESS:
                address = int.from_bytes(code[i + 1:i + length], "little")
            i += length
        elif opcode == _CONST_ADD_PC:
            address += const_add
        elif opcode == _ADVANCE_PC:
            advance, i = leb128(code, i)
            address += advance * unit
        elif opcode == _FIXED_ADVANCE_PC:
            address += int.from_bytes(code[i:i + 2], "little")
            i += 2
        else:  # any other standard opcode: skip its operands, all ULEB128
            for _ in range(operand_counts[opcode - 1]):
                _, i = leb128(code, i)
    if addresses:  # rows after the last end_sequence (malformed): kept
        sequences.append((addresses, places))
    return sequences
