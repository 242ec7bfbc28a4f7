"""Fuzz: real ELF files with one mutation each, aimed at one structure (a symbol or
string table, a note, DWARF units and line programs, .eh_frame, a compressed debug
section, the section or program headers), read as the symbolizer reads binaries:
symbols, lines and data addresses (open_elf_symbols, get_function, read_exported_data)
and unwind tables (build_unwind_table). A result or a SymbolizerError, nothing else."""

from __future__ import annotations

import shutil
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple

import pytest
from elftools.elf.elffile import ELFFile

from fuzzing import Case, assert_no_failures, case_rng, mutate, run_family
from handmade_elf import compressed_zeros
from bpfprof.symbolizer.errors import SymbolizerError
from bpfprof.symbolizer.native.elf import open_elf_symbols, read_exported_data
from bpfprof.symbolizer.native.unwind_table import build_unwind_table

CASES = 1600
SECTIONS = (".symtab", ".dynsym", ".strtab", ".dynstr", ".note.gnu.build-id", ".note.ABI-tag", ".debug_line",
            ".debug_info", ".debug_abbrev", ".debug_str", ".debug_line_str", ".debug_aranges", ".eh_frame",
            ".eh_frame_hdr", ".gnu_debuglink")
SHF_COMPRESSED = 0x800
DATA_NAMES = ("sink", "_PyRuntime")


@dataclass(frozen=True)
class Region:
    name: str
    start: int
    end: int
    header: int = -1        # where the section's header is, for sections
    compressed: bool = False


@dataclass(frozen=True)
class Binary:
    name: str
    data: bytes
    regions: Tuple[Region, ...]
    offsets: Tuple[int, ...]    # file offsets of its functions, for get_function


def describe(name: str, path: Path) -> Binary:
    data = path.read_bytes()
    with open(path, "rb") as f:
        elf = ELFFile(f)
        header = elf.header
        regions: List[Region] = [
            Region("ELF header", 0, header["e_ehsize"]),
            Region("section headers", header["e_shoff"], header["e_shoff"] + header["e_shnum"] * header["e_shentsize"]),
            Region("program headers", header["e_phoff"], header["e_phoff"] + header["e_phnum"] * header["e_phentsize"]),
        ]
        for index, section in enumerate(elf.iter_sections()):
            if (section.name in SECTIONS or section.name.startswith(".debug")) and section["sh_type"] != "SHT_NOBITS":
                regions.append(Region(section.name, section["sh_offset"], section["sh_offset"] + section["sh_size"],
                                      header["e_shoff"] + index * header["e_shentsize"],
                                      bool(section["sh_flags"] & SHF_COMPRESSED)))
        loads = [(s["p_vaddr"], s["p_offset"], s["p_filesz"]) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        offsets = set()
        for table in (".symtab", ".dynsym"):
            section = elf.get_section_by_name(table)
            for symbol in section.iter_symbols() if section else ():
                if symbol["st_info"]["type"] == "STT_FUNC" and symbol["st_value"]:
                    offsets.update(symbol["st_value"] - vaddr + offset + 1 for vaddr, offset, size in loads
                                   if vaddr <= symbol["st_value"] < vaddr + size)
    return Binary(name, data, tuple(regions), tuple(sorted(offsets))[:24] + (0, 1 << 40))


def mutate_inflated(rng, binary: Binary, region: Region, how=mutate) -> Tuple[str, bytearray]:
    """A compressed section inflated, mutated (by `how`) and compressed again, at the end of the file."""
    data = bytearray(binary.data)
    inflated = bytearray(zlib.decompress(data[region.start + 24:region.end]))
    what, inflated = how(rng, inflated, 0, len(inflated))
    chdr = bytearray(data[region.start:region.start + 24])
    struct.pack_into("<Q", chdr, 8, len(inflated))  # ch_size
    section = chdr + zlib.compress(bytes(inflated))
    struct.pack_into("<QQ", data, region.header + 24, len(data), len(section))  # sh_offset, sh_size
    return f"{region.name} inflated: {what}", data + section


@lru_cache(maxsize=1)
def bomb() -> bytes:
    """A compressed section's contents inflating to 160 MiB, past what a case may allocate."""
    return compressed_zeros(160 << 20)


def with_bomb(binary: Binary, region: Region) -> bytearray:
    """The compressed section replaced by bomb(), at the end of the file."""
    data = bytearray(binary.data)
    struct.pack_into("<QQ", data, region.header + 24, len(data), len(bomb()))  # sh_offset, sh_size
    return data + bomb()


def mutate_unit_length(rng, data: bytearray, start: int, end: int) -> Tuple[str, bytearray]:
    """One compilation unit's length in .debug_info (at start to end of data) set to 0,
    too small for its header, or past the section (in 32 bits, or in 64 over the header)."""
    units, offset = [], start
    while offset + 4 <= end and len(units) < 64:
        units.append(offset)
        offset += 4 + struct.unpack_from("<I", data, offset)[0]
    at = rng.choice(units)
    length = rng.choice((0, 1, 6, 0xFFFFFFF0, 0xFFFFFFFF))
    struct.pack_into("<I", data, at, length)
    if length == 0xFFFFFFFF:
        struct.pack_into("<Q", data, at + 4, rng.choice((0, 1 << 40, (1 << 64) - 1)))
    return f"unit at {at - start:#x} of length {length:#x}", data


def make_case(binaries: List[Binary], number: int) -> Case:
    rng = case_rng("elf", number)
    binary = rng.choice(binaries)
    region = rng.choice(binary.regions)
    choice = rng.random()
    if region.compressed and choice < 0.1:
        what, data = f"{region.name} inflating to 160 MiB", with_bomb(binary, region)
    elif region.name == ".debug_info" and choice < 0.3:
        if region.compressed:
            what, data = mutate_inflated(rng, binary, region, mutate_unit_length)
        else:
            what, data = mutate_unit_length(rng, bytearray(binary.data), region.start, region.end)
            what = f"{region.name}: {what}"
    elif region.compressed and choice < 0.5:
        what, data = mutate_inflated(rng, binary, region)
    elif region.header >= 0 and choice < 0.2:
        # The section's own size or place claimed huge (or zero).
        field, at = rng.choice((("sh_size", 32), ("sh_offset", 24), ("sh_entsize", 56), ("sh_link", 40)))
        value = rng.choice((0, 1 << 31, 1 << 40, (1 << 64) - 1, len(binary.data)))
        data = bytearray(binary.data)
        struct.pack_into("<I" if field == "sh_link" else "<Q", data, region.header + at, value & 0xFFFFFFFF
                         if field == "sh_link" else value)
        what = f"{region.name} {field} = {value:#x}"
    else:
        what, data = mutate(rng, bytearray(binary.data), region.start, region.end)
        what = f"{region.name}: {what}"
    return Case(f"{binary.name}, {what}", (bytes(data), binary.offsets))


def read_binary(path: str, root: str, offsets) -> None:
    """Everything the symbolizer reads of a binary, each part on its own: one that fails
    (with a SymbolizerError) does not keep the others from being tried."""
    try:
        symbols = open_elf_symbols(path, path, root, DATA_NAMES)
        try:
            for offset in offsets:
                symbols.get_function(offset)
            symbols.take_problems()
            symbols.drop_inflated()
        finally:
            symbols.close()
    except SymbolizerError:
        pass
    try:
        read_exported_data(path, DATA_NAMES).vaddr(offsets[0])
    except SymbolizerError:
        pass
    table = build_unwind_table(path)
    for offset in offsets:
        table.lookup(offset)
    table.records()


@pytest.fixture(scope="module")
def binaries(build_c) -> List[Binary]:
    built = [("chain -g", build_c("chain")), ("chain -g -gz", build_c("chain", "-gz")),
             ("chain -gdwarf-4 -O2", build_c("chain", "-gdwarf-4", "-O2", "-fomit-frame-pointer"))]
    return [describe(name, path) for name, path in built] + [describe("/bin/true", Path(shutil.which("true")))]


def test_mutated_elf_files_give_symbols_lines_and_unwind_rows_or_a_symbolizer_error(binaries, tmp_path):
    assert any(region.compressed for region in binaries[1].regions), "cc -gz made no compressed section"
    path, root = tmp_path / "binary", tmp_path / "root"
    root.mkdir()

    def run(case: Case) -> None:
        data, offsets = case.data
        path.write_bytes(data)
        read_binary(str(path), str(root), offsets)

    def warm_up() -> None:
        for binary in binaries:
            path.write_bytes(binary.data)
            read_binary(str(path), str(root), binary.offsets)

    failures = run_family("elf", CASES, lambda n: make_case(binaries, n), run, (SymbolizerError,), warm_up)
    assert_no_failures("ELF", failures)
