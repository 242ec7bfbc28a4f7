"""What a binary is, for caches and sharing: its build ID and a BLAKE2b-256 hash of the bytes read from it.

A build ID is a claim the file makes about itself, and any file can make it: keyed by
build ID alone, a file that claims the host libc's would hand its unwind rows and names
to every process mapping the real one. So two files are taken for one only when the
parts a consumer reads are the same bytes: the PT_LOAD segment headers (file offset,
size, address) and, for each section the consumer names, its header and raw contents
(compressed as in the file), with those of the section its sh_link names (a symbol
table's strings). The build ID stays for what it tells people (pprof mappings show it);
the hash does the telling apart, so a binary without a build ID is shared and cached by
its hash all the same.

Sections are hashed from the open file in bounded chunks with CPython's own BLAKE2b (about
0.8 GB/s here; libc's used sections take a few milliseconds): hashlib's SHA-256 is as
sound and twice as fast, but importing hashlib maps OpenSSL's libcrypto, 3.7 MB more
resident in a profiler that otherwise never needs it. Hashing only the sections used,
not the whole file, keeps a large .text out of it.
"""

from __future__ import annotations

import os
import struct
from typing import List, Mapping, NamedTuple, Optional, Sequence, Tuple

from _blake2 import blake2b
from elftools.elf.elffile import ELFFile

from bpfprof.symbolizer.errors import MalformedInput, TooLarge

CHUNK = 1 << 20  # bytes read at a time
MAX_HASHED = 4 << 30  # bytes of sections hashed for one file (a sparse file may claim any size)
MAX_HEADERS = 1 << 16  # sections, or segments
_VERSION = b"bpfprof content identity 3"
_SHT_NOBITS = 8
_PT_LOAD = 1
_NAME_READ = 64  # bytes of a section name read: longer than every name asked for
# Elf64_Shdr / Elf32_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
_SECTION_FIELDS = {64: "IIQQQQIIQQ", 32: "IIIIIIIIII"}
# Elf64_Phdr / Elf32_Phdr, their fields named in _load_segments
_SEGMENT_FIELDS = {64: "IIQQQQQQ", 32: "IIIIIIII"}


def _hasher(data: bytes = b""):
    return blake2b(data, digest_size=32)


class ContentIdentity(NamedTuple):
    build_id: str  # hex GNU build ID, "" when the binary carries none
    digest: str  # hex BLAKE2b-256 of the parts read, see the module docstring

    def joined(self, other: "ContentIdentity") -> "ContentIdentity":
        """The identity of what is read from this file and the other together (a binary
        and its separate debug file); the build ID stays this file's."""
        return ContentIdentity(self.build_id, _hasher(f"{self.digest}+{other.digest}".encode()).hexdigest())


class SectionHeader(NamedTuple):
    name: int
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int
    entsize: int


def content_identity(elf: ELFFile, fd: int, build_id: str, section_names: Sequence[str],
                     contents: Mapping[int, bytes] = {}) -> ContentIdentity:
    """The identity of the ELF file open as elf and fd, for a consumer that reads the
    sections of these names (every section of such a name, should there be several). A
    section whose index is in contents is hashed from those bytes, its raw contents as
    the caller read (and parses) them: the identity then names what was parsed even if
    the file changes meanwhile. Raises MalformedInput for headers or sections beyond the
    end of the file and TooLarge past MAX_HEADERS headers or MAX_HASHED bytes."""
    hasher = _Hasher(fd)
    hasher.part(_VERSION, build_id, elf.elfclass, elf.little_endian, elf["e_machine"])
    for segment in _load_segments(elf, fd):
        hasher.part("PT_LOAD", *segment)
    headers = read_section_headers(elf, fd)
    names = read_section_names(elf, fd, headers)
    for wanted in section_names:
        found = [i for i, name in enumerate(names) if name == wanted.encode()]
        hasher.part("sections", wanted, len(found))
        for i in found:
            hasher.section(i, headers[i], contents.get(i))
            link = headers[i].link
            if link:
                if link >= len(headers):
                    raise MalformedInput(f"section {wanted} links to section {link} of {len(headers)}")
                hasher.section(link, headers[link], None)
    return ContentIdentity(build_id, hasher.digest.hexdigest())


def read_section_headers(elf: ELFFile, fd: int) -> List[SectionHeader]:
    """Every section header of the ELF file open as elf and fd."""
    return [SectionHeader(*fields) for fields in _table(elf, fd, "section", elf.num_sections(), elf["e_shentsize"],
                                                        elf["e_shoff"], _SECTION_FIELDS[elf.elfclass])]


def _load_segments(elf: ELFFile, fd: int) -> List[Tuple[int, int, int]]:
    """(file offset, size in the file, virtual address) of each PT_LOAD segment, as
    load_segments in elf.py gives them."""
    fields = _table(elf, fd, "program", elf.num_segments(), elf["e_phentsize"], elf["e_phoff"],
                    _SEGMENT_FIELDS[elf.elfclass])
    if elf.elfclass == 64:  # type, flags, offset, vaddr, paddr, filesz, memsz, align
        return [(f[2], f[5], f[3]) for f in fields if f[0] == _PT_LOAD]
    # type, offset, vaddr, paddr, filesz, memsz, flags, align
    return [(f[1], f[4], f[2]) for f in fields if f[0] == _PT_LOAD]


def _table(elf: ELFFile, fd: int, kind: str, count: int, entry_size: int, offset: int, fields: str) -> List[tuple]:
    """The entries of a program or section header table, read here rather than through
    pyelftools, which parses every section (a large library's hash tables) on the way."""
    layout = struct.Struct(("<" if elf.little_endian else ">") + fields)
    if count > MAX_HEADERS:
        raise TooLarge(f"{count} {kind} headers")
    if count and entry_size < layout.size:
        raise MalformedInput(f"{kind} headers of {entry_size} bytes")
    data = os.pread(fd, count * entry_size, offset)
    if len(data) < count * entry_size:
        raise MalformedInput(f"{kind} headers beyond the end of the file")
    return [layout.unpack_from(data, i * entry_size) for i in range(count)]


def read_section_names(elf: ELFFile, fd: int, headers: List[SectionHeader]) -> List[bytes]:
    """Each section's name, as far as _NAME_READ bytes go, read where pyelftools reads it."""
    if not headers:
        return []
    index = elf.get_shstrndx()
    if index >= len(headers):
        raise MalformedInput(f"section names in section {index} of {len(headers)}")
    strings = headers[index].offset
    return [os.pread(fd, _NAME_READ, strings + header.name).split(b"\0", 1)[0] for header in headers]


class _Hasher:
    def __init__(self, fd: int) -> None:
        self.digest = _hasher()
        self._fd = fd
        self._left = MAX_HASHED

    def part(self, *fields: object) -> None:
        """Fields hashed with their length, so that no two sequences of parts hash alike."""
        data = repr(fields).encode()
        self.digest.update(struct.pack("<Q", len(data)) + data)

    def section(self, index: int, header: SectionHeader, data: Optional[bytes]) -> None:
        size = 0 if header.type == _SHT_NOBITS else header.size
        self.part("section", index, header)
        if data is not None:
            if len(data) != size:
                raise MalformedInput(f"section {index} read as {len(data)} bytes, not {size}")
            self.digest.update(data)
            return
        self._left -= size
        if self._left < 0:
            raise TooLarge(f"sections of more than {MAX_HASHED} bytes to hash")
        offset, end = header.offset, header.offset + size
        while offset < end:
            chunk = os.pread(self._fd, min(CHUNK, end - offset), offset)
            if not chunk:
                raise MalformedInput(f"section {index} reaches beyond the end of the file")
            self.digest.update(chunk)
            offset += len(chunk)
