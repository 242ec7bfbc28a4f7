"""Source lines of Python instructions, decoded from a code object's raw line table.

The profiler copies a code object's line table and `co_firstlineno` out of another
process, so nothing here may touch a live interpreter: these are pure functions over
bytes. Three table formats exist:

* CPython 3.6 to 3.9, `co_lnotab`: pairs of bytes (address increment, unsigned;
  line increment, signed). The line of an instruction is `co_firstlineno` plus the
  line increments of every pair whose running address is at or before it. The table
  does not know where the bytecode ends, so its last range is open-ended.
* CPython 3.10, `co_linetable`: pairs of bytes (length of a range in bytes, unsigned;
  line change, signed). Each pair covers the next [start, start + length) bytes;
  a line change of -128 marks the range as having no line and leaves the running line
  as it was.
* CPython 3.11 and later, the location table: variable-length entries, each starting
  with a byte 1ccccLLL that covers LLL + 1 code units (2 bytes each). The code cccc
  says how the line moves: 0-9 keep it (short forms with columns), 10-12 add 0, 1 or
  2 (one-line forms), 13 and 14 add a signed varint that follows the first byte
  (13: no columns, 14: long form), 15 means the range has no location at all.

Offsets are always in bytes from the start of the bytecode, whatever the version:
3.6-3.9's f_lasti already is one, 3.10's f_lasti counts code units and must be doubled,
and 3.11+ offsets are measured in the code units after co_code_adaptive.
"""

from __future__ import annotations

import re

from typing import Iterator, List, Tuple

CODE_UNIT = 2  # bytes per instruction word (opcode + argument), 3.6 onwards

# End of the last range of a 3.6-3.9 table: past any real bytecode offset.
OPEN_END = 1 << 62

# Location table (3.11+) codes that are not short forms.
_ONE_LINE_FIRST, _ONE_LINE_LAST = 10, 12
_NO_COLUMNS = 13
_LONG_FORM = 14
_NO_LOCATION = 15

LineRange = Tuple[int, int, int]  # (start offset, end offset, line); line 0 = no line


def line_table(version: Tuple[int, int], linetable: bytes, firstlineno: int) -> List[LineRange]:
    """The whole table as ascending, contiguous (start, end, line) byte ranges, each
    covering [start, end); line is 0 where the table gives the instructions no line.
    Zero-length ranges are left out."""
    return [r for r in _ranges(version, linetable, firstlineno) if r[0] < r[1]]


def line_for_offset(version: Tuple[int, int], linetable: bytes, firstlineno: int, offset: int) -> int:
    """The line being executed at `offset`, the byte offset of the instruction within
    the code's bytecode (co_code for <=3.10, the code units after co_code_adaptive for
    3.11+; for 3.10 pass f_lasti * 2). Returns 0 when the table says the instruction
    has no line (or does not reach that far), and firstlineno when offset is before
    the first instruction (e.g. negative)."""
    if offset < 0:
        return firstlineno
    for start, end, line in _ranges(version, linetable, firstlineno):  # decoded only as far as the offset
        if start <= offset < end:
            return line
    return 0


def _ranges(version: Tuple[int, int], linetable: bytes, firstlineno: int) -> Iterator[LineRange]:
    version = tuple(version[:2])
    if version < (3, 6):
        raise ValueError(f"no line table decoder for Python {version[0]}.{version[1]}")
    if version < (3, 10):
        return _lnotab_ranges(linetable, firstlineno)
    if version < (3, 11):
        return _linetable_310_ranges(linetable, firstlineno)
    return _location_ranges(linetable, firstlineno)


def _lnotab_ranges(lnotab: bytes, firstlineno: int) -> Iterator[LineRange]:
    # A pair moves the address first, then the line: the bytes the address skips over
    # still belong to the line before the pair's increment. An odd trailing byte (a
    # torn read) is ignored.
    address, line = 0, firstlineno
    for address_step, line_step in zip(lnotab[0::2], lnotab[1::2]):
        if address_step:
            yield address, address + address_step, line
            address += address_step
        line += _signed_byte(line_step)
    yield address, OPEN_END, line


def _linetable_310_ranges(linetable: bytes, firstlineno: int) -> Iterator[LineRange]:
    end, line = 0, firstlineno
    for length, line_change in zip(linetable[0::2], linetable[1::2]):
        start, end = end, end + length
        line_change = _signed_byte(line_change)
        if line_change == -128:
            yield start, end, 0
        else:
            line += line_change
            yield start, end, line


def _location_ranges(table: bytes, firstlineno: int) -> Iterator[LineRange]:
    end, line = 0, firstlineno
    pos = 0
    while pos < len(table):
        first = table[pos]
        code = (first >> 3) & 15
        start, end = end, end + ((first & 7) + 1) * CODE_UNIT
        if code == _NO_LOCATION:
            yield start, end, 0
        else:
            if code in (_NO_COLUMNS, _LONG_FORM):
                line += _signed_varint(table, pos + 1)
            elif _ONE_LINE_FIRST <= code <= _ONE_LINE_LAST:
                line += code - _ONE_LINE_FIRST
            yield start, end, line
        # The rest of the entry (varints, column bytes) never has the top bit set,
        # so the next entry starts at the next byte that does (found at C speed: an
        # entry may be made as long as the table).
        following = _ENTRY_START.search(table, pos + 1)
        pos = following.start() if following else len(table)


def _signed_byte(value: int) -> int:
    return value - 256 if value >= 128 else value


_VARINT_BYTES = 6  # read of a line table's varint: 36 bits, more than any line number takes
_ENTRY_START = re.compile(rb"[\x80-\xff]")


def _signed_varint(data: bytes, pos: int) -> int:
    # Varint: 6 bits a byte, least significant first, 0x40 set on all but the last.
    # Signed: the lowest bit of the decoded value is the sign, the rest the magnitude.
    # Bytes past _VARINT_BYTES are not read: the caller skips to the next entry.
    value = 0
    for shift, byte in enumerate(data[pos:pos + _VARINT_BYTES]):
        if byte & 0x80:  # the next entry
            break
        value |= (byte & 0x3F) << (6 * shift)
        if not byte & 0x40:
            break
    return -(value >> 1) if value & 1 else value >> 1
