"""Small ELF files written byte by byte for tests: a header, the sections asked for and
their names, nothing else (no segments). Enough for hostile files that a compiler
would never write, such as a compressed section that inflates far past any cap."""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple, Sequence

SHT_PROGBITS = 1
SHF_COMPRESSED = 0x800
ELFCOMPRESS_ZLIB = 1
EM_X86_64 = 62
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_FILE_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr



class Section(NamedTuple):
    name: str
    kind: int  # sh_type
    flags: int  # sh_flags
    contents: bytes
    link: int = 0  # sh_link: the index of another section, counting the null section as 0
    entsize: int = 0  # sh_entsize


def elf_file(sections: Sequence[Section]) -> bytes:
    """An x86-64 ELF64 little-endian shared object holding these sections, then
    .shstrtab; each section's contents 8-byte aligned after the file header."""
    names = b"\0" + b"".join(section.name.encode() + b"\0" for section in sections) + b".shstrtab\0"
    body = bytearray(_FILE_HEADER.size)
    headers = [bytes(_SECTION_HEADER.size)]  # the null section
    name_at = 1
    for name, kind, flags, contents, link, entsize in (*sections, Section(".shstrtab", 3, 0, names)):
        body += bytes(-len(body) % 8)
        headers.append(_SECTION_HEADER.pack(name_at, kind, flags, 0, len(body), len(contents), link, 0, 1, entsize))
        body += contents
        name_at += len(name) + 1
    body += bytes(-len(body) % 8)
    identity = b"\x7fELF" + bytes((2, 1, 1)) + bytes(9)  # 64-bit, little-endian, version 1
    body[:_FILE_HEADER.size] = _FILE_HEADER.pack(identity, 3, EM_X86_64, 1, 0, 0, len(body), 0, _FILE_HEADER.size,
                                                 56, 0, _SECTION_HEADER.size, len(headers), len(headers) - 1)
    return bytes(body) + b"".join(headers)


def deflated_zeros(size: int) -> bytes:
    """`size` zero bytes deflated with zlib: about a thousandth of that."""
    deflate = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    return b"".join([deflate.compress(chunk) for _ in range(size >> 20)] + [deflate.flush()])


def compressed_zeros(size: int) -> bytes:
    """The contents of an SHF_COMPRESSED section that inflates to `size` zero bytes, as
    its Elf64_Chdr (zlib, that size, alignment 1) says."""
    return struct.pack("<IIQQ", ELFCOMPRESS_ZLIB, 0, size, 1) + deflated_zeros(size)
