"""The DWARF line-number program of one compilation unit, run to its rows: sequences of
addresses, each with the file and line it belongs to.

pyelftools decodes the program's header (file names, opcode base, line base and
range); the program itself is run here, keeping only the registers a profiler needs
(address, file, line). pyelftools' own decoder keeps every register and copies the
state for every row, which is several times slower: big compilation units such as
CPython's unicodeobject.c take most of a second there.

The state machine is DWARF 2 to 5's (section 6.2 of the DWARF 5 standard), for
targets with one operation per instruction (op_index is always 0).
"""

from __future__ import annotations

from typing import List, Tuple

# Standard opcodes
_COPY, _ADVANCE_PC, _ADVANCE_LINE, _SET_FILE = 1, 2, 3, 4
_CONST_ADD_PC, _FIXED_ADVANCE_PC = 8, 9
# Extended opcodes (after a 0 byte and a length)
_END_SEQUENCE, _SET_ADDRESS = 1, 2



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
