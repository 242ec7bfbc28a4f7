"""Unwind tables against binutils' own reading of the same frames (readelf
--debug-dump=frames-interp), row for row: a C fixture built without and with frame
pointers, PLT stubs (lazy and IBT), gaps between FDEs, CPython's shared library, damaged
FDEs, and the on-disk cache per content identity."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
import tracemalloc
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

import pytest

from bpfprof.symbolizer.native import unwind_cache, unwind_table
from bpfprof.symbolizer.errors import SymbolizerError, TooLarge
from bpfprof.symbolizer.native.unwind_cache import cache_path, open_unwind_table
from bpfprof.symbolizer.native.unwind_table import RBP_OTHER, CfaKind, RbpRule, UnwindTable, build_unwind_table
from conftest import FIXTURES, PYENV_VERSIONS, skip_or_fail
from handmade_elf import SHF_COMPRESSED, SHT_PROGBITS, Section, compressed_zeros, elf_file

NO_FRAME_POINTERS = ("-O2", "-fomit-frame-pointer")
FRAME_POINTERS = ("-O2", "-fno-omit-frame-pointer")


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        skip_or_fail(f"{tool} is not installed")


@pytest.fixture(scope="session")
def build_frames(build_dir):
    """Compile tests/fixtures/unwind/frames.c with these flags (cached per flags)."""

    def build(*flags: str) -> Path:
        need("gcc")
        out = build_dir / ("unwind_frames" + "".join(re.sub(r"\W", "_", f) for f in flags))
        if not out.exists():
            subprocess.run(["gcc", "-g", *flags, "-o", str(out), str(FIXTURES / "unwind" / "frames.c")], check=True)
        return out

    return build


def run(*argv: str) -> str:
    need(argv[0])
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def symbols(binary: Path) -> Dict[str, Tuple[int, int]]:
    """(address, size) of each function symbol."""
    found = {}
    for line in run("nm", "-S", "--defined-only", str(binary)).splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[2] in "tTwW":
            found[fields[3]] = (int(fields[0], 16), int(fields[1], 16))
    return found


def section(binary: Path, name: str) -> Tuple[int, int, int]:
    """(address, file offset, size) of a section, from readelf's section headers; zeros
    for a section the binary does not have."""
    for line in run("readelf", "-SW", str(binary)).splitlines():
        fields = line.replace("[ ", "[").split()
        if len(fields) > 5 and fields[1] == name:
            return int(fields[3], 16), int(fields[4], 16), int(fields[5], 16)
    return 0, 0, 0


def section_range(binary: Path, name: str) -> Tuple[int, int]:
    address, _, size = section(binary, name)
    return address, address + size


class ReadelfFde(NamedTuple):
    start: int
    end: int
    rows: List[Tuple[int, Dict[str, str]]]  # (PC, column -> cell), as readelf prints them


def readelf_fdes(binary: Path, sections: Tuple[str, ...] = (".eh_frame",)) -> List[ReadelfFde]:
    """Every FDE of these sections with its rows as readelf interprets them. An FDE whose
    instructions change nothing has no rows printed: its CIE's first row applies."""
    cie_rows: Dict[Tuple[str, str], Dict[str, str]] = {}
    fdes: List[ReadelfFde] = []
    owner = None  # the CIE or FDE whose rows follow
    columns: List[str] = []
    section = ""
    # -wN: not the debug file a .gnu_debuglink names, whose .eh_frame is NOBITS.
    for line in run("readelf", "-wN", "--debug-dump=frames-interp", str(binary)).splitlines():
        if line.startswith("Contents of the "):
            section = line.split()[3]
        if section not in sections:
            continue
        cie = re.match(r"([0-9a-f]{8}) \S+ \S+ CIE", line)
        fde = re.match(r"[0-9a-f]{8} \S+ \S+ FDE cie=([0-9a-f]{8}) pc=([0-9a-f]+)\.\.([0-9a-f]+)", line)
        if cie:
            owner = (section, cie.group(1))
        elif fde:
            owner = ReadelfFde(int(fde.group(2), 16), int(fde.group(3), 16), [])
            fdes.append(owner)
            if (section, fde.group(1)) in cie_rows:  # a CIE without instructions has no row
                owner.rows.append((owner.start, cie_rows[section, fde.group(1)]))  # replaced by the FDE's own
        elif line.strip().startswith("LOC"):
            columns = line.split()[1:]
        elif re.match(r"[0-9a-f]{16} ", line):
            pc, *cells = re.sub(r" \(\w+\)", "", line).split()  # "r8 (r8)": saved in register r8
            row = dict(zip(columns, cells))
            if isinstance(owner, ReadelfFde):
                if owner.rows and owner.rows[0][0] == int(pc, 16):
                    owner.rows.pop(0)
                owner.rows.append((int(pc, 16), row))
            else:
                cie_rows.setdefault(owner, row)
    return fdes


def expected_rule(cells: Dict[str, str], in_plt: bool) -> Tuple[CfaKind, int, RbpRule, int]:
    """(CFA kind, CFA offset, RBP rule, RBP offset) that a readelf row calls for."""
    cfa, ra, rbp, rsp = cells["CFA"], cells.get("ra", ""), cells.get("rbp", "u"), cells.get("rsp", "u")
    if ra == "u":
        return CfaKind.END, 0, RbpRule.UNCHANGED, 0
    if cfa == "exp":
        if not in_plt:
            return CfaKind.EXPRESSION, 0, RbpRule.UNCHANGED, 0
        kind, offset = CfaKind.PLT, 8
    else:
        register, offset = re.fullmatch(r"(\w+)([+-]\d+)", cfa).groups()
        offset = int(offset)
        kind = {"rsp": CfaKind.RSP, "rbp": CfaKind.RBP}.get(register, CfaKind.REGISTER)
        if kind == CfaKind.REGISTER:
            return kind, 0, RbpRule.UNCHANGED, 0
        if offset % 8 or not 0 <= offset < 8 << 16:
            return CfaKind.ODD_OFFSET, 0, RbpRule.UNCHANGED, 0
    if ra != "c-8":
        return CfaKind.RA_ELSEWHERE, 0, RbpRule.UNCHANGED, 0
    if rsp != "u":
        return CfaKind.RSP_ELSEWHERE, 0, RbpRule.UNCHANGED, 0
    if kind == CfaKind.PLT or rbp in ("u", "s"):
        return kind, offset, RbpRule.UNCHANGED, 0
    saved = re.fullmatch(r"c([+-]\d+)", rbp)
    if saved and int(saved.group(1)) % 8 == 0 and -1016 <= int(saved.group(1)) <= 1016:
        return kind, offset, RbpRule.SAVED, int(saved.group(1))
    return kind, offset, RbpRule.OTHER, 0


def ours(table: UnwindTable, pc: int) -> Tuple[CfaKind, int, RbpRule, int]:
    row = table.lookup(pc)
    return row.cfa_kind, row.cfa_offset, row.rbp_rule, row.rbp_offset


def assert_agrees_with_readelf(table: UnwindTable, binary: Path, sections: Tuple[str, ...] = (".eh_frame",)) -> int:
    """Every row of every FDE, at its first, middle and last byte; the byte after an FDE
    that no other FDE follows at once has no unwind information. Returns the rows compared."""
    plt = section_range(binary, ".plt")
    fdes = readelf_fdes(binary, sections)
    starts = {f.start for f in fdes}
    compared = 0
    for fde in fdes:
        for n, (pc, cells) in enumerate(fde.rows):
            end = fde.rows[n + 1][0] if n + 1 < len(fde.rows) else fde.end
            if pc >= end:
                continue
            want = expected_rule(cells, plt[0] <= pc < plt[1])
            for probe in {pc, (pc + end) // 2, end - 1}:
                assert ours(table, probe) == want, f"{binary.name} at {probe:#x}: readelf says {cells}"
            compared += 1
        if fde.end not in starts:
            assert table.lookup(fde.end).cfa_kind == CfaKind.NONE, f"{binary.name}: {fde.end:#x} after an FDE"
    return compared


def test_rows_agree_with_readelf_without_frame_pointers(build_frames):
    binary = build_frames(*NO_FRAME_POINTERS)
    table = build_unwind_table(str(binary))
    assert assert_agrees_with_readelf(table, binary) > 20
    functions = symbols(binary)
    inside = {name: ours(table, address + size // 2) for name, (address, size) in functions.items()}
    assert inside["leaf_sum"] == (CfaKind.RSP, 8, RbpRule.UNCHANGED, 0)
    assert inside["variable_length"][:3] == (CfaKind.RBP, 16, RbpRule.SAVED)  # a VLA needs RBP even so
    assert inside["large_frame"][0] == CfaKind.RSP and inside["large_frame"][1] > 72000
    assert inside["huge_frame"][0] == CfaKind.ODD_OFFSET  # 800 kB: beyond the record, counted
    assert inside["realigned"][0] == CfaKind.EXPRESSION  # *(RBP - 8)
    assert inside["_start"][0] == CfaKind.END
    kinds = table.cfa_kind_counts()
    assert kinds[CfaKind.REGISTER] >= 1 and kinds[CfaKind.PLT] >= 1
    # callee_saved pushes RBP as an ordinary callee-saved register: saved, but no RBP-based CFA.
    address, size = functions["callee_saved"]
    rules = {ours(table, pc) for pc in range(address, address + size)}
    assert any(r[2] == RbpRule.SAVED for r in rules) and all(r[0] == CfaKind.RSP for r in rules)


def test_rows_agree_with_readelf_with_frame_pointers(build_frames):
    binary = build_frames(*FRAME_POINTERS)
    table = build_unwind_table(str(binary))
    assert assert_agrees_with_readelf(table, binary) > 20
    functions = symbols(binary)
    for name in ("callee_saved", "variable_length", "large_frame", "huge_frame", "main"):
        address, size = functions[name]
        rules = {ours(table, pc) for pc in range(address, address + size)}
        assert (CfaKind.RBP, 16, RbpRule.SAVED, -16) in rules, name
    # With frame pointers even the 800 kB frame is RBP + 16.
    assert CfaKind.ODD_OFFSET not in table.cfa_kind_counts()


@pytest.mark.parametrize("flags", [("-fno-asynchronous-unwind-tables",), ("-fno-asynchronous-unwind-tables", "-gz")],
                         ids=["debug-frame", "compressed-debug-frame"])
def test_debug_frame_fills_in_for_code_without_eh_frame(build_frames, flags):
    """Without asynchronous unwind tables gcc describes the C code in .debug_frame only;
    crt1's _start and the PLT are still in .eh_frame."""
    binary = build_frames(*NO_FRAME_POINTERS, *flags)
    eh_starts = {f.start for f in readelf_fdes(binary)}
    debug_starts = {f.start for f in readelf_fdes(binary, (".debug_frame",))}
    assert symbols(binary)["callee_saved"][0] in debug_starts - eh_starts
    table = build_unwind_table(str(binary))
    assert assert_agrees_with_readelf(table, binary, (".eh_frame", ".debug_frame")) > 20
    address, size = symbols(binary)["variable_length"]
    assert ours(table, address + size // 2) == (CfaKind.RBP, 16, RbpRule.SAVED, -16)


@pytest.mark.parametrize("flags, threshold", [((), 11), (("-fcf-protection", "-Wl,-z,ibtplt"), 9)],
                         ids=["lazy-plt", "ibt-plt"])
def test_plt_stubs_get_the_plt_rule(build_frames, flags, threshold):
    binary = build_frames(*NO_FRAME_POINTERS, *flags)
    raw = run("readelf", "--debug-dump=frames", str(binary))
    assert (f"DW_CFA_def_cfa_expression (DW_OP_breg7 (rsp): 8; DW_OP_breg16 (rip): 0; DW_OP_lit15; DW_OP_and; "
            f"DW_OP_lit{threshold}; DW_OP_ge; DW_OP_lit3; DW_OP_shl; DW_OP_plus)") in raw
    table = build_unwind_table(str(binary))
    start, end = section_range(binary, ".plt")
    assert end - start >= 3 * 16  # PLT0 and the stubs of malloc, puts, ...
    for pc in range(start + 16, end):  # every stub after PLT0 (which pushes twice)
        row = table.lookup(pc)
        assert (row.cfa_kind, row.cfa_offset, row.plt_threshold) == (CfaKind.PLT, 8, threshold), hex(pc)
        # The stub's push has run from byte `threshold` on: the return address is 8 bytes further.
        pushed = (pc & 15) >= row.plt_threshold
        assert row.cfa_offset + 8 * pushed == (16 if pc - start & 15 >= threshold else 8)
    assert assert_agrees_with_readelf(table, binary) > 20


def test_records_are_the_documented_struct(build_frames):
    """struct unwind_row { u16 cfa_offset; u8 cfa_kind; s8 rbp; u32 pc; }, little-endian,
    offsets in 8-byte words: what the BPF side will read."""
    table = build_unwind_table(str(build_frames(*FRAME_POINTERS)))
    records = list(struct.iter_unpack("<HBbI", table.records()))
    assert len(records) == table.num_rows() and len(table.records()) == 8 * table.num_rows()
    for cfa_offset, kind, rbp, pc in records:
        row = table.lookup(pc)
        assert (row.pc, row.cfa_kind, row.cfa_offset) == (pc, kind, 8 * cfa_offset)
        if kind == CfaKind.PLT:
            assert row.plt_threshold == rbp
        elif rbp == RBP_OTHER:
            assert row.rbp_rule == RbpRule.OTHER
        elif rbp:
            assert (row.rbp_rule, row.rbp_offset) == (RbpRule.SAVED, 8 * rbp)
    assert (2, CfaKind.RBP, -2) in {(o, k, r) for o, k, r, _ in records}  # CFA = RBP + 16, RBP at CFA - 16


def test_gaps_between_fdes_have_no_unwind_info(build_frames):
    binary = build_frames(*NO_FRAME_POINTERS)
    table = build_unwind_table(str(binary))
    fdes = sorted(readelf_fdes(binary))
    gaps = [(a.end, b.start) for a, b in zip(fdes, fdes[1:]) if a.end < b.start]
    assert len(gaps) >= 3  # alignment padding between functions, and the function without CFI
    for start, end in gaps:
        assert table.lookup(start - 1).cfa_kind != CfaKind.NONE  # what the gap would otherwise inherit
        assert all(table.lookup(pc).cfa_kind == CfaKind.NONE for pc in range(start, end)), hex(start)
    address, size = symbols(binary)["no_unwind_info"]
    assert size > 0 and any(start <= address and address + size <= end for start, end in gaps)
    assert table.lookup(0).cfa_kind == CfaKind.NONE  # the ELF header
    assert table.lookup(1 << 40).cfa_kind == CfaKind.NONE
    words = list(table.rows)
    assert words == sorted(words)
    assert all((a ^ b) & 0xFFFFFFFF for a, b in zip(words, words[1:])), "equal consecutive rules merge"


def must_not_build(_path):
    raise AssertionError("built again although cached")


def libpython() -> Path:
    """pyenv's libpython3.12, else the newest other CPython 3 shared library there."""
    found = sorted(PYENV_VERSIONS.glob("3.*/lib/libpython3.*.so.1.0"),
                   key=lambda p: (p.name != "libpython3.12.so.1.0", [-int(x) for x in re.findall(r"\d+", p.name)]))
    if not found:
        skip_or_fail(f"no CPython shared library under {PYENV_VERSIONS}")
    return found[0]


def test_libpython_table(tmp_path, monkeypatch):
    library = libpython()
    started = time.perf_counter()
    table = open_unwind_table(str(library), str(tmp_path))
    cold = time.perf_counter() - started
    kinds = table.cfa_kind_counts()
    unsupported = sum(n for kind, n in kinds.items() if not kind.supported)
    share = unsupported / table.num_rows()
    print(f"\n{library.name}: {table.num_rows()} rows, {len(table.records())} bytes, built in {cold:.2f} s; "
          f"unsupported {unsupported} ({100 * share:.3f}%): {({k.name: n for k, n in sorted(kinds.items())})}")
    assert not table.from_cache and table.unreadable_fdes == 0
    assert share < 0.01
    assert kinds[CfaKind.RSP] > 10000 and kinds[CfaKind.PLT] >= 1

    address = int(re.search(r"^([0-9a-f]+) T _PyEval_EvalFrameDefault$",
                            run("nm", "-D", "--defined-only", str(library)), re.M).group(1), 16)
    fde = next(f for f in readelf_fdes(library) if f.start <= address < f.end)
    for pc in (address, address + 1, (fde.start + fde.end) // 2, fde.end - 1):
        cells = next(c for p, c in reversed(fde.rows) if p <= pc)
        assert ours(table, pc) == expected_rule(cells, False), hex(pc)
    assert ours(table, address) == (CfaKind.RSP, 8, RbpRule.UNCHANGED, 0)
    assert ours(table, (fde.start + fde.end) // 2)[1] > 8  # inside, past the prologue's pushes
    assert assert_agrees_with_readelf(table, library) > 10000

    with monkeypatch.context() as patch:
        patch.setattr(unwind_cache, "build_unwind_table", must_not_build)
        warm = open_unwind_table(str(library), str(tmp_path))
    assert warm.from_cache and warm.rows == table.rows


def test_cache_is_read_back_and_rebuilt_when_corrupt(build_frames, tmp_path, monkeypatch):
    binary = str(build_frames(*NO_FRAME_POINTERS))
    first = open_unwind_table(binary, str(tmp_path))
    path = Path(cache_path(str(tmp_path), first.identity))
    assert not first.from_cache and first.cache_error == "" and path.is_file()

    with monkeypatch.context() as patch:
        patch.setattr(unwind_cache, "build_unwind_table", must_not_build)
        second = open_unwind_table(binary, str(tmp_path))
    assert second.from_cache and second.rows == first.rows and second.build_id == first.build_id

    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[-5] ^= 0xFF
    old_version = bytearray(good)
    old_version[8] += 1
    for broken in (bytes(damaged), good[:-8], good[:10], b"", bytes(old_version)):
        path.write_bytes(broken)
        rebuilt = open_unwind_table(binary, str(tmp_path))
        assert not rebuilt.from_cache and rebuilt.rows == first.rows
        assert path.read_bytes() == good  # written again


def test_cache_files_are_per_identity(build_frames, tmp_path):
    one = open_unwind_table(str(build_frames(*NO_FRAME_POINTERS)), str(tmp_path))
    other = open_unwind_table(str(build_frames(*NO_FRAME_POINTERS, "-DVARIANT=2")), str(tmp_path))
    assert one.build_id != other.build_id and one.identity.digest != other.identity.digest
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"v{unwind_cache.FORMAT_VERSION}-{t.identity.digest}.bin" for t in (one, other))


def test_binary_without_build_id_is_cached_by_its_content(build_frames, tmp_path, monkeypatch):
    binary = str(build_frames(*NO_FRAME_POINTERS, "-Wl,--build-id=none"))
    table = open_unwind_table(binary, str(tmp_path))
    assert table.build_id == "" and table.num_rows() > 10
    assert [p.name for p in tmp_path.iterdir()] == [f"v{unwind_cache.FORMAT_VERSION}-{table.identity.digest}.bin"]
    with monkeypatch.context() as patch:
        patch.setattr(unwind_cache, "build_unwind_table", must_not_build)
        assert open_unwind_table(binary, str(tmp_path)).rows == table.rows


def test_unwritable_cache_leaves_the_table_usable(build_frames, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    table = open_unwind_table(str(build_frames(*NO_FRAME_POINTERS)), str(blocker / "unwind"))
    assert table.num_rows() > 10 and "Not a directory" in table.cache_error


def test_an_unreadable_fde_is_counted_and_the_others_stand(build_frames, tmp_path):
    binary = build_frames(*NO_FRAME_POINTERS)
    table = build_unwind_table(str(binary))
    functions = symbols(binary)
    address, size = functions["callee_saved"]
    # That function's FDE: its first CFA instruction becomes an opcode that does not exist.
    fde_offset = next(int(m.group(1), 16) for m in re.finditer(
        r"^([0-9a-f]{8}) \S+ \S+ FDE cie=\S+ pc=([0-9a-f]+)\.\.", run("readelf", "--debug-dump=frames", str(binary)),
        re.M) if int(m.group(2), 16) == address)
    data = bytearray(binary.read_bytes())
    data[section(binary, ".eh_frame")[1] + fde_offset + 17] = 0x3F  # after length, CIE pointer, pc_begin, pc_range, "z" size
    damaged = tmp_path / "damaged"
    damaged.write_bytes(bytes(data))
    broken = build_unwind_table(str(damaged))
    assert broken.unreadable_fdes == 1 and table.unreadable_fdes == 0
    assert broken.lookup(address + size // 2).cfa_kind == CfaKind.NONE
    for name in ("leaf_sum", "variable_length", "main"):
        start, size = functions[name]
        assert all(broken.lookup(pc) == table.lookup(pc) for pc in range(start, start + size))


def test_unusable_files(tmp_path, build_frames):
    text = tmp_path / "text"
    text.write_text("#!/bin/sh\n")
    with pytest.raises(SymbolizerError, match="not a readable ELF"):
        build_unwind_table(str(text))
    data = bytearray(build_frames(*NO_FRAME_POINTERS).read_bytes())
    data[18:20] = (183).to_bytes(2, "little")  # e_machine: AArch64
    other = tmp_path / "aarch64"
    other.write_bytes(bytes(data))
    with pytest.raises(SymbolizerError, match="x86-64 only"):
        build_unwind_table(str(other))


def test_signal_trampolines_get_the_signal_rule():
    """glibc's __restore_rt, described by a CIE whose augmentation says 'S': BPF reads the
    interrupted registers from the signal frame rather than following its CFA expression."""
    libc = Path("/lib/x86_64-linux-gnu/libc.so.6")
    if not libc.exists():
        skip_or_fail(f"no {libc}")
    need("readelf")
    text = run("readelf", "-wN", "--debug-dump=frames", str(libc))
    signal_cies = set(re.findall(r'^([0-9a-f]{8}) \S+ \S+ CIE\n\s+Version:\s+\d+\n\s+Augmentation:\s+"z\w*S\w*"',
                                 text, re.M))
    trampolines = [(int(start, 16), int(end, 16)) for cie, start, end in
                   re.findall(r"FDE cie=([0-9a-f]{8}) pc=([0-9a-f]+)\.\.([0-9a-f]+)", text) if cie in signal_cies]
    assert trampolines, "libc has no signal trampoline FDE"
    table = build_unwind_table(str(libc))
    for start, end in trampolines:
        assert {table.lookup(pc).cfa_kind for pc in (start, end - 1)} == {CfaKind.SIGNAL}
    assert CfaKind.EXPRESSION not in table.cfa_kind_counts()  # __restore_rt was libc's only expression


def test_tables_carry_the_load_segments(build_frames, tmp_path):
    binary = build_frames(*NO_FRAME_POINTERS)
    program_headers = run("readelf", "-lW", str(binary))
    loads = [(int(o, 16), int(f, 16), int(v, 16)) for o, v, f in
             re.findall(r"^\s+LOAD\s+(0x[0-9a-f]+) (0x[0-9a-f]+) 0x[0-9a-f]+ (0x[0-9a-f]+)", program_headers, re.M)]
    assert loads and build_unwind_table(str(binary)).segments == tuple(loads)
    open_unwind_table(str(binary), str(tmp_path))
    cached = open_unwind_table(str(binary), str(tmp_path))
    assert cached.from_cache and cached.segments == tuple(loads)


@pytest.mark.parametrize("name", [".debug_frame", ".eh_frame"])
def test_a_frame_section_past_the_cap_is_refused_within_bounds(tmp_path, monkeypatch, name):
    """A compressed .debug_frame that inflates to 128 MiB from 128 KiB is refused as too
    large, without inflating it; so is a section larger than the cap as it is in the file."""
    if name == ".debug_frame":
        section = Section(name, SHT_PROGBITS, SHF_COMPRESSED, compressed_zeros(128 << 20))
    else:
        section = Section(name, SHT_PROGBITS, 0, bytes(4096))
        monkeypatch.setattr(unwind_table, "MAX_FRAME_SECTION", 4095)
    binary = tmp_path / "bomb.so"
    binary.write_bytes(elf_file([section]))
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge, match=name):
            build_unwind_table(str(binary))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
