"""The DWARF line-number program of one compilation unit, run to its rows: sequences of
addresses, each with the file and line it belongs to.

The program is found here: the compilation unit's header and its top DIE are read only
as far as the DIE's DW_AT_stmt_list. (pyelftools parses the unit's whole abbreviation
table and the DIE through its struct library first, which took more than half the time
of reading a line table.) pyelftools decodes the program's header (file names, opcode
base, line base and range); the program itself is run here, keeping only the registers
a profiler needs (address, file, line). pyelftools' own decoder keeps every register and
copies the state for every row, which is several times slower: big compilation units
such as CPython's unicodeobject.c take most of a second there.

The state machine is DWARF 2 to 5's (section 6.2 of the DWARF 5 standard), for
targets with one operation per instruction (op_index is always 0).
"""

from __future__ import annotations

import functools
import struct
from typing import BinaryIO, Dict, List, NamedTuple, Optional, Tuple

from elftools.dwarf.structs import DWARFStructs

# Standard opcodes
_COPY, _ADVANCE_PC, _ADVANCE_LINE, _SET_FILE = 1, 2, 3, 4
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


def _read(stream: BinaryIO, offset: int, size: int) -> bytes:
    stream.seek(offset)
    return stream.read(size)


def _unit_extent(head: bytes, offset: int) -> Tuple[int, int]:
    """(offset size, end) of the unit at `offset` in .debug_info that starts with `head`."""
    (length,) = struct.unpack_from("<I", head)
    if length == 0xFFFFFFFF:
        return 8, offset + 12 + struct.unpack_from("<Q", head, 4)[0]
    return 4, offset + 4 + length


def _unit_header(info: BinaryIO, offset: int) -> Tuple[int, int, int, int, bytes]:
    """(version, offset size, address size, abbreviation table offset, the unit's bytes
    from its top DIE on) of the compilation unit at `offset` in .debug_info."""
    head = _read(info, offset, 4 + 8 + 2 + 2 + 8 + 16)
    offset_size, end = _unit_extent(head, offset)
    i = 12 if offset_size == 8 else 4
    offset_format = "<Q" if offset_size == 8 else "<I"
    (version,) = struct.unpack_from("<H", head, i)
    i += 2
    if version >= 5:
        unit_type, address_size = head[i], head[i + 1]
        (abbrev,) = struct.unpack_from(offset_format, head, i + 2)
        i += 2 + offset_size
        if unit_type in _UNIT_TYPES_WITH_ID:
            i += 8
        elif unit_type in _UNIT_TYPES_WITH_TYPE:
            i += 8 + offset_size
    else:
        (abbrev,) = struct.unpack_from(offset_format, head, i)
        address_size = head[i + offset_size]
        i += offset_size + 1
    return version, offset_size, address_size, abbrev, _read(info, offset + i, min(end - offset - i, _TOP_DIE_BYTES))


def _attribute_forms(abbrev: BinaryIO, offset: int, code: int) -> Optional[List[Tuple[int, int]]]:
    """(attribute, form) of abbreviation `code` in the table at `offset` of .debug_abbrev."""
    size = _ABBREV_BYTES
    while True:
        data = _read(abbrev, offset, size)
        try:
            return _find_abbreviation(data, code)
        except IndexError:  # the table goes on past what was read
            if len(data) < size:
                return None
            size *= 4


def _find_abbreviation(data: bytes, code: int) -> Optional[List[Tuple[int, int]]]:
    i = 0
    while True:
        entry, i = leb128(data, i)
        if entry == 0:
            return None
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
            return forms


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
            return int.from_bytes(die[i:i + size], "little") if size in (4, 8) else None
        i += size
    return None


@functools.lru_cache(maxsize=None)
def _structs(little_endian: bool, offset_size: int, address_size: int, version: int) -> DWARFStructs:
    return DWARFStructs(little_endian=little_endian, dwarf_format=offset_size * 8, address_size=address_size,
                        dwarf_version=version)


class ProgramPlace(NamedTuple):
    """Where a compilation unit's line program is in .debug_line, and how its unit is encoded."""
    offset: int
    offset_size: int
    address_size: int
    version: int


def program_place(dwarf, cu_offset: int) -> Optional[ProgramPlace]:
    """Where the line program of the compilation unit at `cu_offset` is, or None if it
    has none or its top DIE cannot be read."""
    try:
        version, offset_size, address_size, abbrev, die = _unit_header(dwarf.debug_info_sec.stream, cu_offset)
        code, i = leb128(die, 0)
        forms = _attribute_forms(dwarf.debug_abbrev_sec.stream, abbrev, code)
        offset = _stmt_list(die[i:], forms, offset_size, address_size, version) if forms is not None else None
    except (IndexError, ValueError, struct.error):
        return None
    return ProgramPlace(offset, offset_size, address_size, version) if offset is not None else None


def every_program_place(dwarf) -> Dict[int, ProgramPlace]:
    """program_place() of every compilation unit, by unit offset: what a line lookup needs
    of .debug_info, read in one pass."""
    places = {}
    info = dwarf.debug_info_sec
    offset = 0
    while offset < info.size:
        place = program_place(dwarf, offset)
        if place is not None:
            places[offset] = place
        try:
            offset = _unit_extent(_read(info.stream, offset, 12), offset)[1]
        except struct.error:
            break
    return places


def line_program(dwarf, place: Optional[ProgramPlace]):
    """pyelftools' LineProgram at `place` (its header decoded), or None for no place."""
    if place is None:
        return None
    structs = _structs(dwarf.config.little_endian, place.offset_size, place.address_size, place.version)
    return dwarf._parse_line_program_at_offset(place.offset, structs)  # what line_program_for_CU calls, with the offset


def leb128(data: bytes, i: int, signed: bool = False) -> Tuple[int, int]:
    """The LEB128 number at data[i] and the index after it."""
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return (value - (1 << shift) if signed and byte & 0x40 else value), i


def line_sequences(program: bytes, header) -> List[Tuple[List[int], List[int]]]:
    """The program's rows in the order it emits them, as sequences: (addresses, places),
    place = file index << 32 | line, and -1 for the row that ends the sequence. Two flat
    lists rather than a tuple per row: this is the hot loop of reading a line table.
    `header` is pyelftools' decoded line program header (minimum_instruction_length,
    line_base, line_range, opcode_base, standard_opcode_lengths)."""
    unit = header["minimum_instruction_length"]
    line_base, line_range = header["line_base"], header["line_range"]
    opcode_base = header["opcode_base"]
    operand_counts = header["standard_opcode_lengths"]
    const_add = (255 - opcode_base) // line_range * unit
    sequences: List[Tuple[List[int], List[int]]] = []
    addresses: List[int] = []
    places: List[int] = []
    add_address, add_place = addresses.append, places.append
    address, file, line = 0, 1, 1
    i, end = 0, len(program)
    while i < end:
        opcode = program[i]
        i += 1
        if opcode >= opcode_base:
            adjusted = opcode - opcode_base
            address += adjusted // line_range * unit
            line += line_base + adjusted % line_range
            add_address(address)
            add_place(file << 32 | line)
        elif opcode == 0:
            length, i = leb128(program, i)
            sub = program[i]
            if sub == _END_SEQUENCE:
                add_address(address)
                add_place(-1)
                sequences.append((addresses, places))
                addresses, places = [], []
                add_address, add_place = addresses.append, places.append
                address, file, line = 0, 1, 1
            elif sub == _SET_ADDRESS:
                address = int.from_bytes(program[i + 1:i + length], "little")
            i += length
        elif opcode == _COPY:
            add_address(address)
            add_place(file << 32 | line)
        elif opcode == _ADVANCE_PC:
            advance, i = leb128(program, i)
            address += advance * unit
        elif opcode == _ADVANCE_LINE:
            advance, i = leb128(program, i, signed=True)
            line += advance
        elif opcode == _SET_FILE:
            file, i = leb128(program, i)
        elif opcode == _CONST_ADD_PC:
            address += const_add
        elif opcode == _FIXED_ADVANCE_PC:
            address += int.from_bytes(program[i:i + 2], "little")
            i += 2
        else:  # any other standard opcode: skip its operands, all ULEB128
            for _ in range(operand_counts[opcode - 1]):
                _, i = leb128(program, i)
    if addresses:  # rows after the last end_sequence (malformed): kept
        sequences.append((addresses, places))
    return sequences
