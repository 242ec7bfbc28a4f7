"""Function names and source lines for file offsets in an ELF binary, read with pyelftools.

Symbols come from `.symtab` and `.dynsym`, of the binary and of its separate debug file
(found by build ID or `.gnu_debuglink`); lines from DWARF line tables, parsed one
compilation unit at a time and only when a frame falls in it.
"""

from __future__ import annotations

import bisect
import operator
import os
import re
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass
from itertools import chain, compress, repeat
from typing import BinaryIO, Dict, FrozenSet, Iterable, List, Optional, Tuple

from elftools.common.exceptions import ELFError
from elftools.dwarf.dwarfinfo import DebugSectionDescriptor, DWARFInfo, DwarfConfig
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile

from bpfprof.symbolizer.native.content_identity import (ContentIdentity, content_identity, read_section_headers,
                                                         read_section_names)
from bpfprof.symbolizer.native.demangle import demangle
from bpfprof.symbolizer.native.dwarf_lines import (AbbreviationTables, LineProgram, every_program_place, line_program,
                                                   line_sequences, program_place)
from bpfprof.symbolizer.errors import MalformedInput, SymbolizerError, TooLarge
from bpfprof.symbolizer.packed_names import PackedNames
from bpfprof.symbolizer.safe_open import open_in_root

STT_OBJECT = 1
STT_FUNC = 2
STT_GNU_IFUNC = 10
NT_GNU_BUILD_ID = 3
STB_GLOBAL = 1
STB_WEAK = 2
DEBUG_ROOT = "/usr/lib/debug"
_SHT_NULL, _SHT_PROGBITS, _SHT_NOBITS = 0, 1, 8
# What DWARF that is not as it should be raises, in pyelftools or here (a line past
# what an unsigned table holds: OverflowError; pyelftools asserts on .debug_aranges'
# sizes and does not implement its segmented form: AssertionError, NotImplementedError).
_MALFORMED_DWARF = (ELFError, ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error,
                    AssertionError, NotImplementedError)
_UNUSABLE_DWARF = (*_MALFORMED_DWARF, TooLarge)  # and what claims more than is read
_BUILD_ID = re.compile(r"[0-9a-f]{2,128}")  # as hex: what a cache or debug file name may hold
# Bounds on one binary's symbols (see _SymbolBudget for the real binaries they hold).
MAX_NAME_LENGTH = 4096  # bytes of a symbol's name kept: a longer one is cut, and ends in CUT_MARK
CUT_MARK = b"[...]"
MAX_FUNCTION_SYMBOLS = 1 << 19
MAX_NAME_BYTES = 32 << 20
MAX_SYMBOL_TABLE_BYTES = 32 << 20  # of each of .symtab and .dynsym
MAX_STRING_TABLE_BYTES = 64 << 20
Symbol = Tuple[int, int, bytes, int]  # (start, size, name, binding) of a function


@dataclass(frozen=True)
class FunctionInfo:
    name: str
    file: str = ""
    line: int = 0


class _Symbols:
    """Function symbols sorted by start address; one name per address."""

    def __init__(self, entries: List[Symbol]) -> None:
        # entries: (start, size, name, binding). At one address keep the most public name:
        # global before weak before local, then the one with fewest leading underscores.
        best: Dict[int, Symbol] = {}
        for entry in entries:
            start, size, name, binding = entry
            current = best.get(start)
            if current is None:
                best[start] = entry
            elif _preference(entry) < _preference(current):
                best[start] = (start, max(size, current[1]), name, binding)
            elif size > current[1]:
                best[start] = (start, size, current[2], current[3])
        ordered = sorted(best.values())
        del best
        # Addresses as machine words (a whole-system agent holds symbols of every binary).
        self.starts = array("Q", (e[0] for e in ordered))
        self.names = PackedNames([e[2] for e in ordered])
        # A symbol without a size reaches to the next one.
        self.ends = array("Q", (
            e[0] + e[1] if e[1] else (ordered[i + 1][0] if i + 1 < len(ordered) else e[0] + 1)
            for i, e in enumerate(ordered)
        ))

    def num_bytes(self) -> int:
        return self.names.num_bytes() + 8 * (len(self.starts) + len(self.ends))

    def find(self, vaddr: int) -> Optional[str]:
        i = bisect.bisect_right(self.starts, vaddr) - 1
        if i >= 0 and vaddr < self.ends[i]:
            return self.names[i]
        return None


def _preference(entry: Symbol) -> Tuple[int, int, int]:
    _, _, name, binding = entry
    rank = {STB_GLOBAL: 0, STB_WEAK: 1}.get(binding, 2)
    return rank, len(name) - len(name.lstrip(b"_")), len(name)


class _SymbolBudget:
    """What one binary's symbol tables (its own and its debug file's) may add up to: past
    it, symbols are left out, once said in problems. Far above what real binaries hold:
    the largest here (Rust's libLLVM and librustc_driver) have 186k function symbols,
    21 MB of names, a 6 MB symbol table, a 20 MB string table and names of 1222 bytes."""

    def __init__(self) -> None:
        self.symbols = MAX_FUNCTION_SYMBOLS
        self.name_bytes = MAX_NAME_BYTES
        self.exceeded = ""  # what was over, once it was

    def take(self, name: bytes) -> bool:
        """Whether a function symbol with this name fits."""
        if self.symbols <= 0 or len(name) > self.name_bytes:
            over = (f"{MAX_FUNCTION_SYMBOLS} function symbols" if self.symbols <= 0
                    else f"{MAX_NAME_BYTES} bytes of names")
            self.exceeded = self.exceeded or f"symbols past the first {over} left out"
            return False
        self.symbols -= 1
        self.name_bytes -= len(name)
        return True


def _name_at(strings: bytes, offset: int) -> bytes:
    """The name at offset in a string table, cut at MAX_NAME_LENGTH bytes (and marked so);
    its version (after @) left out."""
    limit = offset + MAX_NAME_LENGTH
    end = strings.find(b"\0", offset, limit)
    if end >= 0 or limit >= len(strings):
        name = strings[offset:end if end >= 0 else limit]
    else:
        name = strings[offset:limit] + CUT_MARK
    return name.split(b"@", 1)[0]


def _read_symbols(elf: ELFFile, data_names: FrozenSet[str], budget: _SymbolBudget, problems: List[SymbolizerError],
                  tables: Tuple[str, ...] = (".symtab", ".dynsym")) -> Tuple[List[Symbol], Dict[str, int]]:
    """(address, size, name, binding) of every defined function in these symbol tables
    that fits in the budget, and the addresses of the data objects named in data_names.
    A table over its size cap is left out, said in problems."""
    entries: List[Symbol] = []
    data: Dict[str, int] = {}
    wanted = {name.encode(): name for name in data_names}
    for section_name in tables:
        section = elf.get_section_by_name(section_name)
        if section is None or section["sh_type"] == "SHT_NOBITS" or section["sh_entsize"] == 0:
            continue
        try:
            table = read_section(elf, elf.stream.fileno(), section, MAX_SYMBOL_TABLE_BYTES)
            strings = read_section(elf, elf.stream.fileno(), elf.get_section(section["sh_link"]),
                                   MAX_STRING_TABLE_BYTES)
        except TooLarge as e:
            problems.append(TooLarge(f"{section_name} left out: {e}"))
            continue
        order = "<" if elf.little_endian else ">"
        if elf.elfclass == 64:
            layout = struct.Struct(order + "IBBHQQ")  # name, info, other, shndx, value, size
            rows = ((n, i, x, v, s) for n, i, _, x, v, s in layout.iter_unpack(table[: len(table) // 24 * 24]))
        else:
            layout = struct.Struct(order + "IIIBBH")  # name, value, size, info, other, shndx
            rows = ((n, i, x, v, s) for n, v, s, i, _, x in layout.iter_unpack(table[: len(table) // 16 * 16]))
        for name_offset, info, shndx, value, size in rows:
            kind = info & 0xF
            if shndx == 0 or value == 0 or kind not in (STT_FUNC, STT_GNU_IFUNC, STT_OBJECT):
                continue
            name = _name_at(strings, name_offset)
            if kind != STT_OBJECT:
                if not budget.take(name):
                    break
                entries.append((value, size, name, info >> 4))
            elif name in wanted:
                data[wanted[name]] = value
    return entries, data


def read_build_id(elf: ELFFile) -> str:
    """The GNU build ID in lowercase hex, "" without one. A note of that type with another
    owner is someone else's (its description is raw bytes), and is not taken for one.
    Notes are read from the section's bytes, each size checked against what is left of it."""
    order = "<" if elf.little_endian else ">"
    for section in elf.iter_sections():
        if section["sh_type"] != "SHT_NOTE":
            continue
        data = section.data()
        at = 0
        while at + 12 <= len(data):
            name_size, description_size, kind = struct.unpack_from(order + "III", data, at)
            description_at = at + 12 + _align4(name_size)
            at = description_at + _align4(description_size)
            if at > len(data):
                break
            name = data[description_at - _align4(name_size):description_at].split(b"\0", 1)[0]
            description = data[description_at:description_at + description_size].hex()
            if kind == NT_GNU_BUILD_ID and name == b"GNU" and _BUILD_ID.fullmatch(description):
                return description
    return ""


def _align4(size: int) -> int:
    return (size + 3) & ~3


def _has_lines(elf: ELFFile) -> bool:
    """Whether the file has the DWARF sections that lines are read from."""
    sections = [elf.get_section_by_name(name) for name in (".debug_line", ".debug_info", ".debug_abbrev")]
    return all(section is not None and section["sh_type"] != "SHT_NOBITS" for section in sections)


def _lines(elf: ELFFile, stream: BinaryIO, problems: List[SymbolizerError]) -> Optional["_Lines"]:
    """The file's line tables, or None when it has none or they cannot be read (said in
    problems): its symbols name its functions all the same."""
    if not _has_lines(elf):
        return None
    try:
        return _Lines(elf, stream, problems)
    except _UNUSABLE_DWARF as e:
        problems.append(_dwarf_problem(e))
        return None


def _dwarf_problem(error: Exception) -> SymbolizerError:
    kind = TooLarge if isinstance(error, TooLarge) else MalformedInput
    return kind(f"DWARF line tables left out: {type(error).__name__}: {error}")


def _debug_link(elf: ELFFile) -> Optional[Tuple[str, int]]:
    section = elf.get_section_by_name(".gnu_debuglink")
    if section is None:
        return None
    data = section.data()
    end = data.find(b"\0")
    crc_at = (end + 4) & ~3
    if end <= 0 or crc_at + 4 > len(data):
        return None
    order = "<" if elf.little_endian else ">"
    return data[:end].decode(errors="replace"), struct.unpack_from(order + "I", data, crc_at)[0]


def _crc32(fd: int, size: int) -> int:
    """The CRC-32 of the file's first `size` bytes (its size when opened: it may grow)."""
    crc = 0
    for offset in range(0, size, 1 << 20):
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
    return crc


def _open_debug_file(root: str, path: str, follow_last: bool = False) -> Optional[int]:
    """A descriptor of a candidate debug file in the root; None if there is no usable one."""
    try:
        return open_in_root(root, path, MAX_DEBUG_FILE, follow_last)
    except (OSError, SymbolizerError):
        return None


def _find_debug_file(elf: ELFFile, path: str, root: str, build_id: str) -> Optional[int]:
    """A descriptor of the binary's separate debug file, looked for as GDB does, inside
    the process's root: by build ID, then by .gnu_debuglink next to the binary, in its
    .debug/ and under /usr/lib/debug (where the link's CRC must match)."""
    if build_id:
        # Fedora's and others' .build-id entries link to the debug file.
        fd = _open_debug_file(root, f"{DEBUG_ROOT}/.build-id/{build_id[:2]}/{build_id[2:]}.debug", True)
        if fd is not None:
            return fd
    link = _debug_link(elf)
    if link is None or not path.startswith("/"):
        return None
    name, crc = link
    directory = os.path.dirname(path)
    for candidate in (f"{directory}/{name}", f"{directory}/.debug/{name}", f"{DEBUG_ROOT}{directory}/{name}"):
        if candidate == path:
            continue
        fd = _open_debug_file(root, candidate)
        if fd is None:
            continue
        try:
            if _crc32(fd, os.fstat(fd).st_size) == crc:
                return fd
        except OSError:
            pass
        os.close(fd)
    return None


class _Window:
    """A section of a file as a read-only stream: pyelftools reads DWARF through it
    straight from the page cache, with no copy of the section in the heap. Read with
    pread, which lets go of the GIL while the disk is read: a page fault in a mapping of
    the file held it, and with a binary's debug sections out of the page cache the first
    lines named in a drain kept the event thread waiting for up to a second (short-lived
    threads ended before their names were read)."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        self._fd, self._start, self._size, self._pos = fd, start, size, 0

    def seek(self, pos: int, whence: int = 0) -> int:
        pos = pos if whence == 0 else (self._pos + pos if whence == 1 else self._size + pos)
        if pos < 0:
            raise ValueError(f"a seek to {pos}, before the start of a section")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes, and never past the window; n of -1 (or None) reads to its end."""
        if n is not None and n < -1:
            raise ValueError(f"a read of {n} bytes")
        end = self._size if n is None or n == -1 else min(self._size, self._pos + n)
        data = self._read(self._start + self._pos, end - self._pos) if end > self._pos else b""
        self._pos = max(self._pos, end)
        return data

    def _read(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)


class _Inflated(_Window):
    """A zlib-compressed section (SHF_COMPRESSED) of a file as a read-only stream:
    inflated when read, and dropped again by forget() once a line table is built from it.
    Debug files are often compressed; libc's holds 8.5 MB of DWARF in 3, and a whole-system
    agent that kept it inflated would hold those 8.5 MB for good."""

    def __init__(self, fd: int, start: int, size: int, inflated_size: int) -> None:
        super().__init__(fd, 0, inflated_size)
        self._compressed_start, self._compressed_size = start, size
        self._data: Optional[bytes] = None

    def _read(self, offset: int, size: int) -> bytes:
        if self._data is None:
            compressed = os.pread(self._fd, self._compressed_size, self._compressed_start)
            inflate = zlib.decompressobj()
            try:
                self._data = inflate.decompress(compressed, self._size)
            except zlib.error as e:
                raise ValueError(f"a compressed section does not inflate: {e}") from None
            if inflate.unconsumed_tail:
                raise ValueError("a compressed section inflates to more than it claims")
        return self._data[offset:offset + size]

    def forget(self) -> None:
        self._data = None


ELFCOMPRESS_ZLIB = 1
# Bytes a compressed debug section may inflate to. The largest here: 14.5 MB (docker's
# .debug_loc), 12 MB (its .debug_info), 5.5 MB (libc's .debug_info in its debug file).
MAX_INFLATED = 64 << 20
MAX_DEBUG_FILE = 2 << 30  # bytes of a separate debug file (a debug link's CRC reads all of it)


def _section_stream(elf: ELFFile, fd: int, section) -> _Window:
    """A stream of a debug section's contents, read in place or inflated when read.
    Raises TooLarge for a compressed section that claims more than MAX_INFLATED bytes."""
    offset, size = section["sh_offset"], section["sh_size"]
    if not section.compressed:
        return _Window(fd, offset, size)
    if section.data_size > MAX_INFLATED:
        raise TooLarge(f"section {section.name} claims {section.data_size} bytes inflated "
                       f"(at most {MAX_INFLATED} are inflated)")
    header_size = 24 if elf.elfclass == 64 else 12  # Elf64_Chdr, Elf32_Chdr
    kind = struct.unpack("<I" if elf.little_endian else ">I", os.pread(fd, 4, offset))[0]
    if kind != ELFCOMPRESS_ZLIB:
        raise ELFError(f"section {section.name} has compression type {kind}, not zlib")
    return _Inflated(fd, offset + header_size, size - header_size, section.data_size)


def read_section(elf: ELFFile, fd: int, section, limit: int) -> bytes:
    """A section's contents, inflated if it is compressed. Raises TooLarge, before
    anything is read, for one that holds or claims more than limit bytes."""
    size = max(section["sh_size"], section.data_size)  # data_size: what a compressed one claims inflated
    if size > limit:
        raise TooLarge(f"section {section.name} of {size} bytes (at most {limit} are read)")
    return _section_stream(elf, fd, section).read()


# What line lookups read: CU headers and top DIEs, aranges, line programs and the
# strings they name. Location lists, ranges (but for CUs without aranges), frames and
# the rest are never looked at, so never loaded.
_LINE_SECTIONS = {
    "debug_info_sec": ".debug_info", "debug_aranges_sec": ".debug_aranges", "debug_abbrev_sec": ".debug_abbrev",
    "debug_str_sec": ".debug_str", "debug_line_sec": ".debug_line", "debug_line_str_sec": ".debug_line_str",
    "debug_str_offsets_sec": ".debug_str_offsets", "debug_addr_sec": ".debug_addr",
    "debug_ranges_sec": ".debug_ranges", "debug_rnglists_sec": ".debug_rnglists",
}
# What symbols and lines are read from, for content_identity (the string tables come with their symbol tables).
SYMBOL_SECTIONS = (".symtab", ".dynsym") + tuple(_LINE_SECTIONS.values())
_UNUSED_SECTIONS = ("debug_frame_sec", "eh_frame_sec", "debug_loc_sec", "debug_pubtypes_sec", "debug_pubnames_sec",
                    "debug_loclists_sec", "debug_sup_sec", "gnu_debugaltlink_sec", "debug_types_sec")


def _dwarf_info(elf: ELFFile, stream: BinaryIO) -> Tuple[DWARFInfo, List[_Inflated]]:
    """DWARFInfo for line lookups, reading only the sections that line lookups read,
    straight from the file; with the compressed sections among them (inflated with a
    cap). pyelftools' own get_dwarf_info is never used: it reads every DWARF section
    into the heap and inflates each to whatever size it claims. Strings in a
    supplementary file (.gnu_debugaltlink, .debug_sup) stay unread, as they would with
    it (it opens no other file here); GNU's older .zdebug_* sections are not read."""
    sections = dict.fromkeys(_UNUSED_SECTIONS)
    for key, name in _LINE_SECTIONS.items():
        section = elf.get_section_by_name(name)
        if section is None or section["sh_type"] == "SHT_NOBITS":
            sections[key] = None
        else:
            sections[key] = DebugSectionDescriptor(_section_stream(elf, stream.fileno(), section), name,
                                                   section["sh_offset"], section.data_size, section["sh_addr"])
    config = DwarfConfig(little_endian=elf.little_endian, default_address_size=elf.elfclass // 8,
                         machine_arch=elf.get_machine_arch())
    inflated = [s.stream for s in sections.values() if s is not None and isinstance(s.stream, _Inflated)]
    return DWARFInfo(config=config, **sections), inflated


class _Lines:
    """DWARF line tables, parsed per compilation unit on first use."""

    def __init__(self, elf: ELFFile, stream: BinaryIO, problems: List[SymbolizerError]) -> None:
        self._stream = stream  # kept open: compilation units are read lazily
        self._problems = problems  # where units that cannot be read are said, once
        self._said = False
        self._dwarf, self._inflated = _dwarf_info(elf, stream)
        aranges = self._dwarf.debug_aranges_sec
        if aranges is not None and aranges.size > MAX_ARANGES:
            raise TooLarge(f".debug_aranges of {aranges.size} bytes, over {MAX_ARANGES}")
        self._aranges = self._dwarf.get_aranges()
        # A compressed .debug_info (6 MB in libc's debug file, and 30 ms to inflate) is read
        # once, here, for where each unit's line program is: all that lookups need of it.
        compressed_info = isinstance(self._dwarf.debug_info_sec.stream, _Inflated)
        self._places = every_program_place(self._dwarf) if compressed_info else None
        self._abbreviations = AbbreviationTables(self._dwarf.debug_abbrev_sec.stream)
        self._forget_parsed()
        self._spans: Optional[Tuple[List[int], List[Tuple[int, int]]]] = None  # without .debug_aranges
        self._tables: Dict[int, tuple] = {}  # CU offset -> _line_table()

    def _cu_offset(self, vaddr: int) -> Optional[int]:
        if self._aranges:
            return self._aranges.cu_offset_at_addr(vaddr)
        if self._spans is None:
            spans = sorted(_cu_spans(self._dwarf))
            self._spans = [s[0] for s in spans], [(s[1], s[2]) for s in spans]
            self._forget_parsed()
        starts, rest = self._spans
        i = bisect.bisect_right(starts, vaddr) - 1
        return rest[i][1] if i >= 0 and vaddr < rest[i][0] else None

    def find(self, vaddr: int) -> Optional[Tuple[str, int]]:
        try:
            cu_offset = self._cu_offset(vaddr)
            if cu_offset is None:
                return None
            table = self._tables.get(cu_offset)
            if table is None:
                place = self._places.get(cu_offset) if self._places is not None \
                    else program_place(self._dwarf, cu_offset, self._abbreviations)
                table = self._tables[cu_offset] = _line_table(line_program(self._dwarf, place))
                self._forget_parsed(keep_inflated=True)
        except _UNUSABLE_DWARF as e:  # names still come from the symbol tables
            if not self._said:
                self._said = True
                self._problems.append(_dwarf_problem(e))
            return None
        base, addresses, lines, files, names = table
        i = bisect.bisect_right(addresses, vaddr - base) - 1
        if i < 0 or not lines[i]:
            return None
        return names[files[i]], lines[i]

    def num_bytes(self) -> int:
        """Bytes of the tables built so far, about."""
        return sum(sum(a.itemsize * len(a) for a in (addresses, lines, files)) + sum(map(sys.getsizeof, names.values()))
                   for _, addresses, lines, files, names in self._tables.values())

    def _forget_parsed(self, keep_inflated: bool = False) -> None:
        """pyelftools keeps every CU (with its DIEs), abbreviation table and line program
        it parsed, for good; the compact table replaces all of them. Inflated sections
        may be kept a while, for the next tables (see drop_inflated)."""
        dwarf = self._dwarf
        for cache in ("_linetable_cache", "_abbrevtable_cache", "_cu_cache", "_cu_offsets_map"):
            getattr(dwarf, cache, {}).clear()
        if not keep_inflated:
            self.drop_inflated()

    def drop_inflated(self) -> None:
        """Let go of the compressed sections inflated for the tables built since the last
        call: libc's debug file holds 8.5 MB of DWARF in 3, and inflating its line
        programs again for each new table was nearly all of the time of building one."""
        for stream in self._inflated:
            stream.forget()

    def close(self) -> None:
        self._dwarf = None
        self._stream.close()


# Compilation units and their address ranges read without .debug_aranges: a large C++
# binary has a few thousand units; libpython3.13's range lists take 0.7 MB, and
# pyelftools makes an object of each entry of a list, however long.
MAX_UNITS = 1 << 15
MAX_ARANGES = 4 << 20  # bytes of .debug_aranges, an object per entry in pyelftools
MAX_SPANS = 1 << 20
MAX_RANGE_LISTS = 2 << 20


def _cu_spans(dwarf) -> List[Tuple[int, int, int]]:
    """(start, end, CU offset) of each compilation unit's code, from its top DIE: what
    .debug_aranges says when a compiler leaves that section out (clang does)."""
    for name in ("debug_ranges_sec", "debug_rnglists_sec"):
        section = getattr(dwarf, name, None)
        if section is not None and section.size > MAX_RANGE_LISTS:
            raise TooLarge(f"range lists of {section.size} bytes, over {MAX_RANGE_LISTS}")
    spans = []
    for n, cu in enumerate(dwarf.iter_CUs()):
        if n == MAX_UNITS or len(spans) > MAX_SPANS:
            raise TooLarge(f"more than {MAX_UNITS} compilation units or {MAX_SPANS} address ranges")
        attributes = cu.get_top_DIE().attributes
        low = attributes.get("DW_AT_low_pc")
        high = attributes.get("DW_AT_high_pc")
        ranges = attributes.get("DW_AT_ranges")
        base = low.value if low else 0
        if ranges is not None and ranges.form == "DW_FORM_sec_offset" and dwarf.range_lists():
            for entry in dwarf.range_lists().get_range_list_at_offset(ranges.value, cu=cu):
                if hasattr(entry, "base_address"):
                    base = entry.base_address
                elif entry.is_absolute:
                    spans.append((entry.begin_offset, entry.end_offset, cu.cu_offset))
                else:
                    spans.append((base + entry.begin_offset, base + entry.end_offset, cu.cu_offset))
        elif low is not None and high is not None:
            end = high.value if high.form == "DW_FORM_addr" else low.value + high.value
            spans.append((low.value, end, cu.cu_offset))
    return spans


def _line_table(program: Optional[LineProgram]) -> Tuple[int, array, array, array, Dict[int, str]]:
    """A base address; sorted addresses, as offsets from the base, and for each the line
    (0 where a sequence ends) and the program's number of its file, named by the dict
    that ends the tuple. Compact: 5 to 10 bytes a row, and a row that names the same place
    as the one before it is left out. Built with map and compress, not a loop per row."""
    sequences = sorted(line_sequences(program), key=lambda s: s[0][0]) if program is not None else []
    addresses = list(chain.from_iterable(a for a, _ in sequences))
    places = list(chain.from_iterable(p for _, p in sequences))
    if any(a[0][-1] > b[0][0] for a, b in zip(sequences, sequences[1:])):
        # Overlapping sequences: every row sorted, a sequence's end (place 0) before a start at the same address.
        rows = sorted(zip(addresses, places))
        addresses, places = [a for a, _ in rows], [p for _, p in rows]
    kept = list(map(operator.ne, places, chain((None,), places)))
    addresses, places = list(compress(addresses, kept)), list(compress(places, kept))
    base = addresses[0] if addresses else 0  # every address of a compilation unit is within 4 GiB of it
    files = array("I", map(operator.rshift, places, repeat(32)))
    names = {n: program.file_names[n] if n < len(program.file_names) else "" for n in set(files)} if program else {}
    return (base, _narrowest(array("I", map(operator.sub, addresses, repeat(base)))),
            _narrowest(array("I", map(operator.and_, places, repeat(0xFFFFFFFF)))), _narrowest(files), names)


def _narrowest(values: array) -> array:
    """The values in the smallest unsigned items that hold them: most compilation units
    have under 64 KiB of code, 64k lines and 256 files, so most rows take 5 bytes."""
    top = max(values, default=0)
    for typecode in "BHI":
        if top < 1 << (8 * array(typecode).itemsize):
            return values if typecode == values.typecode else array(typecode, values)
    return values


class LoadedData:
    """Where a binary's PT_LOAD segments load, and the link-time addresses of some data objects."""

    def __init__(self, segments: List[Tuple[int, int, int]], data: Dict[str, int]) -> None:
        self._segments = segments  # (file offset, file size, virtual address) of each PT_LOAD
        self.data = data  # link-time addresses of the data objects asked for

    def vaddr(self, file_offset: int) -> Optional[int]:
        """The link-time address that a file offset is loaded at."""
        for offset, size, vaddr in self._segments:
            if offset <= file_offset < offset + size:
                return file_offset - offset + vaddr
        return None


class ElfSymbols(LoadedData):
    """Names for file offsets of one binary (plus its debug file, if any)."""

    def __init__(self, identity: ContentIdentity, segments: List[Tuple[int, int, int]], symbols: _Symbols,
                 lines: Optional[_Lines], data: Dict[str, int], problems: List[SymbolizerError]) -> None:
        super().__init__(segments, data)
        self.identity = identity  # of the binary and its debug file, as far as names and lines go
        self.build_id = identity.build_id
        self._symbols = symbols
        self._lines = lines
        self._problems = problems  # parts of the file left out (malformed, too large), as they are found

    def take_problems(self) -> List[SymbolizerError]:
        """Why parts of the file were left out, since the last call."""
        problems = self._problems[:]
        del self._problems[:]
        return problems

    def num_bytes(self) -> int:
        """Bytes of its names, addresses and line tables, about."""
        return self._symbols.num_bytes() + (self._lines.num_bytes() if self._lines else 0)

    def get_function(self, file_offset: int) -> Optional[FunctionInfo]:
        vaddr = self.vaddr(file_offset)
        if vaddr is None:
            return None
        name = self._symbols.find(vaddr)
        if name is None:
            return None
        location = self._lines.find(vaddr) if self._lines else None
        if location is None:
            return FunctionInfo(demangle(name))
        return FunctionInfo(demangle(name), location[0], location[1])

    def has_open_file(self) -> bool:
        """Whether a descriptor of the file is held, to read its lines when asked for."""
        return self._lines is not None

    def drop_inflated(self) -> None:
        """Free the compressed debug sections inflated since the last call."""
        if self._lines:
            self._lines.drop_inflated()

    def close(self) -> None:
        if self._lines:
            self._lines.close()


def open_elf(path: str) -> Tuple[BinaryIO, ELFFile]:
    try:
        stream = open(path, "rb")
    except OSError as e:
        raise SymbolizerError(f"cannot open: {e.strerror or e}") from None
    return stream, _read_elf(stream)


def _read_elf(stream: BinaryIO) -> ELFFile:
    """The ELF file of an open stream, which is closed if it holds none."""
    try:
        elf = ELFFile(stream)
        _check_extents(elf, stream.fileno())
        return elf
    except (ELFError, struct.error, ValueError, OverflowError, OSError, SymbolizerError) as e:
        # (A seek to an offset the headers claim fails with OSError or OverflowError.)
        stream.close()
        raise SymbolizerError(f"not a readable ELF file: {e}") from None


def _check_extents(elf: ELFFile, fd: int) -> None:
    """The header tables and every section's contents lie inside the file: pyelftools
    seeks to and reads whatever offsets and sizes the headers claim. The section headers
    are read directly: pyelftools would make an object of each section on the way."""
    size = os.fstat(fd).st_size
    header = elf.header
    for name, offset, length in (("program", header["e_phoff"], header["e_phnum"] * header["e_phentsize"]),
                                 ("section", header["e_shoff"], header["e_shnum"] * header["e_shentsize"])):
        if offset + length > size:
            raise ELFError(f"the {name} headers lie past the end of the file")
    headers = read_section_headers(elf, fd)
    names = None
    for i, section in enumerate(headers):
        if section.type not in (_SHT_NULL, _SHT_NOBITS) and section.offset + section.size > size:
            raise ELFError(f"section {i} lies past the end of the file")
        # pyelftools inflates any compressed section it is asked for, whatever size it
        # claims; only DWARF is compressed by toolchains, and it is inflated with a cap.
        if section.flags & SH_FLAGS.SHF_COMPRESSED:
            names = names or read_section_names(elf, fd, headers)
            if not (names[i].startswith(b".debug_") and section.type == _SHT_PROGBITS):
                raise ELFError(f"section {names[i]!r} is compressed")


def _debug_symbols(fd: int, data_names: FrozenSet[str], want_lines: bool, budget: _SymbolBudget,
                   problems: List[SymbolizerError]
                   ) -> Tuple[List[Symbol], Dict[str, int], Optional[_Lines], Optional[ContentIdentity]]:
    """Function symbols, data addresses and lines if wanted, of a separate debug file
    (its descriptor, which this takes over), and its identity; nothing from one that
    cannot be used, so the binary's own symbols still stand."""
    stream = os.fdopen(fd, "rb")
    try:
        elf = _read_elf(stream)
    except SymbolizerError:
        return [], {}, None, None
    entries, data, lines, identity = [], {}, None, None
    try:
        identity = content_identity(elf, stream.fileno(), "", SYMBOL_SECTIONS)
        entries, data = _read_symbols(elf, data_names, budget, problems)
        if want_lines:
            lines = _lines(elf, stream, problems)
    except (ELFError, struct.error, ValueError, SymbolizerError):
        pass
    if lines is None:
        stream.close()
    return entries, data, lines, identity


def load_segments(elf: ELFFile) -> List[Tuple[int, int, int]]:
    """(file offset, size in the file, virtual address) of each PT_LOAD segment."""
    return [(s["p_offset"], s["p_filesz"], s["p_vaddr"]) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]


def read_exported_data(open_path: str, data_names: Iterable[str]) -> LoadedData:
    """Only the data objects that the dynamic symbol table exports: it has a few thousand
    entries where .symtab has tens of thousands, so an interpreter's runtime is found in
    a few milliseconds, before the program it starts gets far."""
    stream, elf = open_elf(open_path)
    try:
        _, data = _read_symbols(elf, frozenset(data_names), _SymbolBudget(), [], (".dynsym",))
        return LoadedData(load_segments(elf), data)
    except (ELFError, struct.error, ValueError) as e:
        raise SymbolizerError(f"not a readable ELF file: {e}") from None
    finally:
        stream.close()


def read_section_place(open_path: str, name: bytes) -> Optional[Tuple[LoadedData, int, int]]:
    """Where the section `name` of a binary loads: its segments, and the section's
    link-time address and size; None when it has no such section."""
    stream, elf = open_elf(open_path)
    try:
        headers = read_section_headers(elf, stream.fileno())
        names = read_section_names(elf, stream.fileno(), headers)
        segments = load_segments(elf)
    except (ELFError, struct.error, ValueError) as e:
        raise SymbolizerError(f"not a readable ELF file: {e}") from None
    finally:
        stream.close()
    found = next((header for header, found in zip(headers, names) if found == name), None)
    return None if found is None else (LoadedData(segments, {}), found.addr, found.size)


def open_elf_symbols(open_path: str, path: str = "", root: str = "/", data_names: Iterable[str] = ()) -> ElfSymbols:
    """Reads the binary at open_path. `path` is its name as its process sees it and
    `root` that process's filesystem root: both locate a separate debug file. The
    addresses of data objects named in data_names are kept too."""
    data_names = frozenset(data_names)
    stream, elf = open_elf(open_path)
    lines = None
    try:
        build_id = read_build_id(elf)
        identity = content_identity(elf, stream.fileno(), build_id, SYMBOL_SECTIONS)
        segments = load_segments(elf)
        budget, problems = _SymbolBudget(), []
        entries, data = _read_symbols(elf, data_names, budget, problems)
        own_lines = lines = _lines(elf, stream, problems)
        if elf.get_section_by_name(".symtab") is None or lines is None:
            debug_fd = _find_debug_file(elf, path or open_path, root, build_id)
            if debug_fd is not None:
                debug_entries, debug_data, debug_lines, debug_identity = _debug_symbols(
                    debug_fd, data_names, lines is None, budget, problems)
                if debug_identity is not None:
                    identity = identity.joined(debug_identity)
                entries += debug_entries
                data = {**debug_data, **data}
                lines = lines or debug_lines
        if own_lines is None:
            stream.close()  # nothing reads the binary lazily
        if budget.exceeded:
            problems.append(TooLarge(budget.exceeded))
        return ElfSymbols(identity, segments, _Symbols(entries), lines, data, problems)
    except (ELFError, struct.error, ValueError) as e:
        error = SymbolizerError(f"not a readable ELF file: {e}")
    except SymbolizerError as e:  # sections too large to hash, or beyond the end of the file
        error = e
    stream.close()
    if lines is not None:
        lines.close()
    raise error from None
