"""ELF symbolization against real binaries built here: PIE and fixed-address executables,
stripped ones with debug files found by build ID and by .gnu_debuglink, C++ names."""

import os
import re
import shutil
import signal
import struct
import subprocess
import time
import tracemalloc
import zlib
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from elftools.elf.elffile import ELFFile

from bpfprof.symbolizer.native import elf as elf_module
from bpfprof.symbolizer.native import symbolizer as symbolizer_module
from bpfprof.symbolizer.native.elf import CUT_MARK, MAX_NAME_BYTES, MAX_NAME_LENGTH, open_elf_symbols, read_build_id
from bpfprof.symbolizer.native.unwind_cache import open_unwind_table
from bpfprof.symbolizer.errors import SymbolizerError, TooLarge
from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.native.symbolizer import IDLE_SYMBOLS_S, MAX_OPEN_FILES, NativeSymbolizer, ObjectFile
from conftest import FIXTURES, skip_or_fail
from handmade_elf import SHF_COMPRESSED, SHT_PROGBITS, Section, compressed_zeros, elf_file

CHAIN = ("chain_a", "chain_b", "chain_c", "main")


def symbol_addresses(binary, dynamic=False):
    cmd = ["nm", "-D", str(binary)] if dynamic else ["nm", str(binary)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = (line.split() for line in out.splitlines())
    return {row[2].split("@")[0]: int(row[0], 16) for row in rows if len(row) == 3}


def file_offset(binary, vaddr):
    """File offset of a link-time address, from readelf's program headers."""
    out = subprocess.run(["readelf", "-lW", str(binary)], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == "LOAD":
            offset, start, size = int(fields[1], 16), int(fields[2], 16), int(fields[4], 16)
            if start <= vaddr < start + size:
                return vaddr - start + offset
    raise AssertionError(f"{vaddr:#x} is in no LOAD segment of {binary}")


def chain_line_numbers():
    source = os.path.join(os.path.dirname(__file__), "..", "fixtures", "chain.c")
    with open(source) as f:
        return {m.group(1): n for n, line in enumerate(f, 1) if (m := re.match(r"\w.*?\b(chain_\w|main)\(", line))}


def without_aranges(binary):
    """The binary as clang leaves it: no .debug_aranges, so lines are found through the
    compilation units' own address ranges."""
    copy = binary.with_name(binary.name + "_no_aranges")
    subprocess.run(["objcopy", "--remove-section", ".debug_aranges", str(binary), str(copy)], check=True)
    return copy


def compressed(binary):
    """The binary with its DWARF compressed (SHF_COMPRESSED), as many distributions ship debug files."""
    copy = binary.with_name(binary.name + "_compressed")
    subprocess.run(["objcopy", "--compress-debug-sections=zlib", str(binary), str(copy)], check=True)
    sections = subprocess.run(["readelf", "-SW", str(copy)], check=True, capture_output=True, text=True).stdout
    assert re.search(r"\.debug_info .* C ", sections) and re.search(r"\.debug_line .* C ", sections)
    return copy


@pytest.mark.parametrize("flags, edit", [((), None), (("-no-pie",), None), ((), without_aranges), ((), compressed),
                                         ((), lambda binary: compressed(without_aranges(binary)))],
                         ids=["pie", "fixed-address", "no-aranges", "compressed", "compressed-no-aranges"])
def test_functions_and_lines_at_file_offsets(build_c, flags, edit):
    binary = build_c("chain", *flags)
    if edit:
        binary = edit(binary)
    symbols = open_elf_symbols(str(binary))
    addresses = symbol_addresses(binary)
    starts = chain_line_numbers()
    for name in CHAIN:
        info = symbols.get_function(file_offset(binary, addresses[name]) + 1)
        assert info.name == name
        assert info.file.endswith("chain.c")
        assert starts[name] <= info.line <= starts[name] + 12
    assert re.fullmatch(r"[0-9a-f]{40}", symbols.build_id)


def test_compressed_sections_are_inflated_once_a_batch(tmp_path, monkeypatch):
    """Line tables built one after another share one inflated copy of the compressed
    sections (inflating libc's .debug_line was most of the time of a table), which is
    let go at the end of the batch."""
    sources = []
    for unit in ("second", "third"):
        sources.append(tmp_path / f"{unit}.c")
        sources[-1].write_text(f"int {unit}_unit(int x) {{ return x * 3 + 1; }}\n")
    binary = tmp_path / "three_units"
    subprocess.run(["gcc", "-O1", "-g", "-o", str(binary), str(FIXTURES / "chain.c"), *map(str, sources)], check=True)
    binary = compressed(binary)
    addresses = symbol_addresses(binary)
    offsets = {name: file_offset(binary, addresses[name]) for name in ("chain_a", "second_unit", "third_unit")}
    symbols = open_elf_symbols(str(binary))
    inflations = []
    inflate = zlib.decompressobj
    monkeypatch.setattr(zlib, "decompressobj", lambda *args, **kwargs: inflations.append(1) or inflate(*args, **kwargs))
    assert symbols.get_function(offsets["chain_a"] + 1).file.endswith("chain.c")
    per_table = len(inflations)
    assert per_table > 0
    assert symbols.get_function(offsets["second_unit"] + 1).file.endswith("second.c")
    assert len(inflations) == per_table  # the same inflated sections
    symbols.drop_inflated()
    assert symbols.get_function(offsets["third_unit"] + 1).file.endswith("third.c")
    assert len(inflations) == 2 * per_table
    symbols.close()


def test_offset_outside_any_function_is_unknown(build_c):
    symbols = open_elf_symbols(str(build_c("chain")))
    assert symbols.get_function(0) is None  # the ELF header
    assert symbols.get_function(1 << 40) is None


@pytest.fixture
def stripped(build_c, tmp_path):
    """A stripped copy of the chain fixture under a private root, and its debug file."""
    binary = build_c("chain")
    root = tmp_path / "root"
    (root / "opt/app").mkdir(parents=True)
    debug = tmp_path / "chain.debug"
    subprocess.run(["objcopy", "--only-keep-debug", str(binary), str(debug)], check=True)
    target = root / "opt/app/chain"
    subprocess.run(["strip", "--strip-all", "-o", str(target), str(binary)], check=True)
    return root, target, debug


def test_stripped_binary_alone_has_no_names(stripped):
    root, target, _ = stripped
    symbols = open_elf_symbols(str(target), "/opt/app/chain", str(root))
    assert symbols.get_function(file_offset(target, symbol_addresses(stripped[2])["chain_c"])) is None


@pytest.mark.parametrize("linked", [False, True], ids=["file", "link"])
def test_debug_file_found_by_build_id_inside_the_process_root(stripped, linked):
    """The build-ID entry is the debug file, or (as Fedora ships them) an absolute link to
    it, which resolves inside the process's root."""
    root, target, debug = stripped
    build_id = open_elf_symbols(str(target)).build_id
    place = root / f"usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
    place.parent.mkdir(parents=True)
    if linked:
        (root / "usr/lib/debug/opt").mkdir()
        shutil.copy(debug, root / "usr/lib/debug/opt/chain.debug")
        place.symlink_to("/usr/lib/debug/opt/chain.debug")
    else:
        shutil.copy(debug, place)
    symbols = open_elf_symbols(str(target), "/opt/app/chain", str(root))
    info = symbols.get_function(file_offset(target, symbol_addresses(debug)["chain_c"]) + 1)
    assert info.name == "chain_c" and info.file.endswith("chain.c") and info.line > 0


def test_unusable_debug_file_leaves_the_binarys_own_symbols(build_c, tmp_path):
    binary = tmp_path / "chain"
    subprocess.run(["strip", "--strip-debug", "-o", str(binary), str(build_c("chain"))], check=True)
    build_id = open_elf_symbols(str(binary)).build_id
    place = tmp_path / f"usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
    place.parent.mkdir(parents=True)
    place.write_bytes(b"\x7fELF" + b"\xff" * 60)  # found by build ID, but not an ELF file we can read
    offset = file_offset(binary, symbol_addresses(binary)["chain_c"])
    assert open_elf_symbols(str(binary), str(binary), str(tmp_path)).get_function(offset).name == "chain_c"


def test_debug_file_found_by_debuglink_with_matching_crc(stripped, tmp_path):
    root, target, debug = stripped
    linked = tmp_path / "linked"
    subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(target), str(linked)], check=True)
    shutil.copy(linked, target)
    (root / "opt/app/.debug").mkdir()
    shutil.copy(debug, root / "opt/app/.debug/chain.debug")
    offset = file_offset(target, symbol_addresses(debug)["chain_b"]) + 1
    assert open_elf_symbols(str(target), "/opt/app/chain", str(root)).get_function(offset).name == "chain_b"
    # A debug file whose CRC does not match the link belongs to another build: ignored.
    with open(root / "opt/app/.debug/chain.debug", "ab") as f:
        f.write(b"\0")
    assert open_elf_symbols(str(target), "/opt/app/chain", str(root)).get_function(offset) is None


@contextmanager
def must_return_within(seconds):
    """Fails the test (rather than hanging it) if the block blocks."""
    def fail(*_):
        raise AssertionError(f"blocked for {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_debug_files_that_are_fifos_or_huge_are_passed_over(stripped, tmp_path):
    """Found by build ID or debug link, a FIFO would block the profiler and a huge sparse
    file would have its CRC read for minutes: neither is read, and the debug file the
    link names further on is found."""
    root, target, debug = stripped
    linked = tmp_path / "linked"
    subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(target), str(linked)], check=True)
    shutil.copy(linked, target)
    build_id = open_elf_symbols(str(target)).build_id
    by_build_id = root / f"usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
    by_build_id.parent.mkdir(parents=True)
    os.mkfifo(by_build_id)
    os.mkfifo(root / "opt/app/chain.debug")
    (root / "opt/app/.debug").mkdir()
    with open(root / "opt/app/.debug/chain.debug", "wb") as f:
        f.truncate(1 << 40)
    (root / "usr/lib/debug/opt/app").mkdir(parents=True)
    shutil.copy(debug, root / "usr/lib/debug/opt/app/chain.debug")
    offset = file_offset(target, symbol_addresses(debug)["chain_b"]) + 1
    with must_return_within(10):
        assert open_elf_symbols(str(target), "/opt/app/chain", str(root)).get_function(offset).name == "chain_b"
    os.unlink(by_build_id)
    by_build_id.symlink_to("/usr/lib/debug/opt/app/chain.debug")  # inside the root: a final link is not followed
    os.unlink(root / "usr/lib/debug/opt/app/chain.debug")
    with must_return_within(10):
        assert open_elf_symbols(str(target), "/opt/app/chain", str(root)).get_function(offset) is None


def test_debug_links_resolve_inside_the_root(stripped, tmp_path):
    """A directory of the binary that links to an absolute path leads to that path in
    the process's root, not in ours."""
    root, target, debug = stripped
    linked = tmp_path / "linked"
    subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(target), str(linked)], check=True)
    assert debug == tmp_path / "chain.debug"
    (root / "opt/app/.debug").symlink_to(tmp_path)  # outside the root
    shutil.copy(linked, target)
    offset = file_offset(target, symbol_addresses(debug)["chain_b"]) + 1
    assert open_elf_symbols(str(target), "/opt/app/chain", str(root)).get_function(offset) is None
    assert open_elf_symbols(str(target), "/opt/app/chain", "/").get_function(offset) is None  # no /opt/app here
    relocated = root / str(tmp_path).lstrip("/")
    relocated.mkdir(parents=True)
    shutil.copy(debug, relocated / "chain.debug")
    assert open_elf_symbols(str(target), "/opt/app/chain", str(root)).get_function(offset).name == "chain_b"


def test_cxx_names_are_demangled():
    libstdcxx = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"
    if not os.path.exists(libstdcxx):
        skip_or_fail("libstdc++ is not installed")
    mangled = "_ZNSt6chrono3_V212system_clock3nowEv"
    vaddr = symbol_addresses(libstdcxx, dynamic=True)[mangled]
    info = open_elf_symbols(libstdcxx).get_function(file_offset(libstdcxx, vaddr))
    assert info.name == "std::chrono::_V2::system_clock::now()"


def test_not_an_elf_file(tmp_path):
    path = tmp_path / "text"
    path.write_text("#!/bin/sh\n")
    with pytest.raises(SymbolizerError, match="not a readable ELF"):
        open_elf_symbols(str(path))
    with pytest.raises(SymbolizerError, match="cannot open"):
        open_elf_symbols(str(tmp_path / "missing"))


def test_native_symbolizer_names_unknown_frames_by_module(build_c):
    binary = build_c("chain")
    st = os.stat(binary)
    obj = ObjectFile((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), str(binary), "/nonexistent", "/")
    native = NativeSymbolizer()
    try:
        # map_files is gone (the process exited): the path still names the same inode.
        known = native.get_frame(obj, file_offset(binary, symbol_addresses(binary)["chain_c"]))
        assert known.name == "chain_c" and known.module.build_id
        assert native.get_frame(obj, 0x10).name == f"[{binary.name}+0x10]"
    finally:
        native.close()


def test_native_symbolizer_closes_idle_symbols_and_reads_them_again(build_c, tmp_path):
    """Closed symbols are read again through a process that still maps the binary (here
    this one, holding it open, as /proc/PID/map_files would), even once it is deleted;
    when none does, the binary's new frames are unnamed and that is counted."""
    binary = tmp_path / "chain"
    shutil.copy(build_c("chain"), binary)
    failures = Failures()
    native = NativeSymbolizer(failures=failures)
    st = os.stat(binary)
    held = os.open(binary, os.O_RDONLY)
    obj = ObjectFile((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), str(binary),
                     f"/proc/{os.getpid()}/fd/{held}", "/")
    native.keep_reachable(obj)
    offsets = {name: file_offset(binary, symbol_addresses(binary)[name]) for name in CHAIN}
    try:
        first = native.get_frame(obj, offsets["chain_a"])
        native.close_idle(time.monotonic() + IDLE_SYMBOLS_S / 2)
        assert native.num_binaries() == 1
        native.close_idle(time.monotonic() + IDLE_SYMBOLS_S * 2)
        assert native.num_binaries() == 0 and native.num_open_files() == 0
        binary.unlink()  # still mapped
        assert native.get_frame(obj, offsets["chain_a"]) is first  # named frames stay named
        assert native.get_frame(obj, offsets["chain_b"]).name == "chain_b"
        assert native.num_binaries() == 1
        native.close_idle(time.monotonic() + IDLE_SYMBOLS_S * 2)
        os.close(held)  # no process maps it any more
        assert native.get_frame(obj, offsets["chain_c"]).name == f"[chain+{offsets['chain_c']:#x}]"
        assert failures.counts() == {("binary", "unreadable"): 1}
    finally:
        native.close()


def copies_that_share_nothing(source, directory, count):
    """ObjectFiles of `count` copies of a binary, each with a build ID of its own."""
    data = bytearray(source.read_bytes())
    with open(source, "rb") as f:
        build_id_at = ELFFile(f).get_section_by_name(".note.gnu.build-id")["sh_offset"] + 16  # after "GNU\0"
    objects = []
    for i in range(count):
        data[build_id_at:build_id_at + 4] = struct.pack("<I", i)
        path = directory / f"chain{i}"
        path.write_bytes(data)
        st = os.stat(path)
        objects.append(ObjectFile((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), str(path), str(path), "/"))
    return objects


def test_native_symbolizer_keeps_a_bounded_number_of_files_open(build_c, tmp_path):
    """Binaries kept reachable and symbols that read their lines lazily each hold a
    descriptor: past MAX_OPEN_FILES the least recently used is closed, and read again
    when asked for."""
    source = build_c("chain")
    objects = copies_that_share_nothing(source, tmp_path, MAX_OPEN_FILES + 44)
    offset = file_offset(source, symbol_addresses(source)["chain_b"]) + 1

    def held():
        """Descriptors of these binaries, whatever else the test process opens or closes."""
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
            except FileNotFoundError:  # closed meanwhile
                pass
        return sum(target.startswith(f"{tmp_path}/chain") for target in targets)

    native = NativeSymbolizer()
    try:
        for obj in objects:
            native.keep_reachable(obj)
        assert native.num_open_files() == MAX_OPEN_FILES == held()
        for obj in objects:
            frame = native.get_frame(obj, offset)
            assert frame.name == "chain_b" and frame.line > 0
        assert native.num_open_files() == MAX_OPEN_FILES == held()
        assert native.num_binaries() == MAX_OPEN_FILES
        assert native.get_frame(objects[0], offset + 4).name == "chain_b"  # closed, and read again
    finally:
        native.close()
    assert held() == 0


def test_native_symbolizer_looks_for_a_binary_by_path_inside_its_root(build_c, tmp_path):
    """With map_files gone, a binary is looked for by its path in its process's root: a
    link there to an absolute path leads inside that root, never into ours."""
    outside = tmp_path / "outside/app"
    outside.mkdir(parents=True)
    shutil.copy(build_c("chain"), outside / "chain")
    root = tmp_path / "root"
    root.mkdir()
    (root / "opt").symlink_to(outside.parent)
    st = os.stat(outside / "chain")
    obj = ObjectFile((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), "/opt/app/chain", "/nonexistent", str(root))
    offset = file_offset(outside / "chain", symbol_addresses(outside / "chain")["chain_b"])
    failures = Failures()
    native = NativeSymbolizer(failures=failures)
    assert native.get_frame(obj, offset).name == f"[chain+{offset:#x}]"
    assert failures.counts() == {("binary", "unreadable"): 1}
    inside = root / str(outside).lstrip("/")
    inside.mkdir(parents=True)
    os.link(outside / "chain", inside / "chain")  # the same inode, where the link leads in the root
    native = NativeSymbolizer()
    try:
        assert native.get_frame(obj, offset).name == "chain_b"
    finally:
        native.close()


def test_native_symbolizer_refuses_a_replaced_file(build_c):
    binary = build_c("chain")
    obj = ObjectFile((0, 0, 1), str(binary), "/nonexistent", "/")  # not this inode
    failures = Failures()
    native = NativeSymbolizer(failures=failures)
    assert native.get_frame(obj, 0x1000).name == f"[{binary.name}+0x1000]"
    assert failures.counts() == {("binary", "unreadable"): 1}
    assert failures.examples()[("binary", "unreadable")] == f"{binary}: gone before it could be opened"


def test_a_build_id_note_of_another_owner_is_not_a_build_id(tmp_path):
    """A note of the build ID's type whose owner is not "GNU" holds raw bytes, which would
    name cache and debug files (and crash the unwind table builder): it is no build ID."""
    binary = tmp_path / "forged"
    subprocess.run(["gcc", "-O1", "-Wl,--build-id=none", "-o", str(binary), str(FIXTURES / "chain.c")], check=True)
    note = tmp_path / "note"
    description = bytes(range(0xf0, 0x100)) + b"../x"
    note.write_bytes(struct.pack("<III", 4, len(description), 3) + b"XNU\0" + description)
    subprocess.run(["objcopy", "--add-section", f".note.forged={note}", str(binary)], check=True)
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        assert any(s["sh_type"] == "SHT_NOTE" and s.name == ".note.forged" for s in elf.iter_sections())
        assert read_build_id(elf) == ""
    assert open_elf_symbols(str(binary)).build_id == ""
    assert open_unwind_table(str(binary), str(tmp_path / "cache")) is not None


def without_abbreviations(binary):
    copy = binary.with_name(binary.name + "_no_abbrev")
    subprocess.run(["objcopy", "--remove-section", ".debug_abbrev", str(binary), str(copy)], check=True)
    return copy


def with_corrupt_line_section(binary):
    """Compressed DWARF whose .debug_line payload no longer inflates."""
    copy = compressed(binary)
    with open(copy, "r+b") as f:
        elf = ELFFile(f)
        section = elf.get_section_by_name(".debug_line")
        payload = section["sh_offset"] + 24  # after the Elf64_Chdr
        f.seek(payload)
        f.write(bytes(b ^ 0x5a for b in f.read(32)))
    return copy


@pytest.mark.parametrize("edit", [without_abbreviations, with_corrupt_line_section], ids=["no-abbrev", "corrupt-zlib"])
def test_dwarf_that_cannot_be_read_leaves_the_names(build_c, edit):
    """Lines that cannot be read are no lines; the symbol table still names every function."""
    binary = edit(build_c("chain"))
    symbols = open_elf_symbols(str(binary))
    addresses = symbol_addresses(binary)
    for name in CHAIN:
        info = symbols.get_function(file_offset(binary, addresses[name]) + 1)
        assert (info.name, info.line) == (name, 0)


def test_a_compressed_section_other_than_dwarf_is_refused(build_c, tmp_path):
    """pyelftools would inflate a compressed symbol table to whatever size its header
    claims: only DWARF is read compressed (with a cap), a file compressing more is refused."""
    binary = tmp_path / "bomb"
    shutil.copy(build_c("chain"), binary)
    with open(binary, "r+b") as f:
        elf = ELFFile(f)
        index = next(i for i, s in enumerate(elf.iter_sections()) if s.name == ".symtab")
        symtab = elf.get_section(index)
        header_at = elf.header["e_shoff"] + index * elf.header["e_shentsize"]
        f.seek(header_at + 8)  # sh_flags
        f.write(struct.pack("<Q", symtab["sh_flags"] | 0x800))
        f.seek(symtab["sh_offset"])
        f.write(struct.pack("<IIQQ", 1, 0, 1 << 40, 1))  # Elf64_Chdr: zlib, a terabyte inflated
    with pytest.raises(SymbolizerError, match="compressed"):
        open_elf_symbols(str(binary))
    with pytest.raises(SymbolizerError, match="compressed"):
        open_unwind_table(str(binary), str(tmp_path / "cache"))


BOMB = 128 << 20  # bytes a hostile compressed section inflates to: twice MAX_INFLATED


@pytest.fixture(scope="module")
def bomb():
    """An SHF_COMPRESSED section's contents that inflate to BOMB zero bytes (128 KiB of them)."""
    return compressed_zeros(BOMB)


def heap_peak(call):
    """What call returns, and the most heap it held at once."""
    tracemalloc.start()
    try:
        with must_return_within(10):
            result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("extra", ["plain", "gnu_debugaltlink", "debug_sup", "zdebug"])
def test_dwarf_inflating_past_the_cap_is_left_out_within_bounds(tmp_path, bomb, extra):
    """A .debug_info that inflates to 128 MiB from 128 KiB: its lines are left out, said as
    too large, and nothing near that is allocated, whatever else the file holds (pyelftools'
    own reading of DWARF, which supplementary files and .zdebug_* sections once led to,
    inflates every section to whatever it claims)."""
    sections = [Section(".debug_info", SHT_PROGBITS, SHF_COMPRESSED, bomb),
                Section(".debug_line", SHT_PROGBITS, 0, bytes(16)), Section(".debug_abbrev", SHT_PROGBITS, 0, bytes(4))]
    sections += {
        "plain": [],
        "gnu_debugaltlink": [Section(".gnu_debugaltlink", SHT_PROGBITS, 0, b"dwz.debug\0" + bytes(20))],
        "debug_sup": [Section(".debug_sup", SHT_PROGBITS, 0, b"\5\0\0dwz.debug\0\0")],
        # GNU's older compressed sections: "ZLIB", the inflated size (big-endian), zlib
        "zdebug": [Section(".zdebug_info", SHT_PROGBITS, 0, b"ZLIB" + struct.pack(">Q", BOMB) + bomb[24:])],
    }[extra]
    binary = tmp_path / "bomb.so"
    binary.write_bytes(elf_file(sections))
    symbols, peak = heap_peak(lambda: open_elf_symbols(str(binary)))
    problems = symbols.take_problems()
    assert len(problems) == 1 and isinstance(problems[0], TooLarge), problems
    assert "DWARF line tables left out" in str(problems[0])
    assert peak < 16 << 20


@pytest.mark.parametrize("kind", [3, 7], ids=["string-table", "note"])
def test_compressed_tables_named_like_dwarf_are_refused(tmp_path, bomb, kind):
    """A symbol table's strings or a note (the build ID's), read whole, compressed and
    named like DWARF to pass for it: refused, not inflated."""
    binary = tmp_path / "bomb.so"
    binary.write_bytes(elf_file([Section(".debug_str", kind, SHF_COMPRESSED, bomb),
                                 Section(".symtab", 2, 0, bytes(48), link=1, entsize=24)]))
    with pytest.raises(SymbolizerError, match="compressed"), must_return_within(10):
        open_elf_symbols(str(binary))


def with_symbol_table(binary, out, count, strings, name_offset):
    """A copy of binary whose .symtab holds `count` functions, 16 bytes apart from the
    start of .text, each named by the string at name_offset(i) in `strings` (the new
    .strtab): both tables are written past the end of the file, their headers moved there."""
    data = bytearray(binary.read_bytes())
    with open(binary, "rb") as f:
        elf = ELFFile(f)
        header_at, header_size = elf["e_shoff"], elf["e_shentsize"]
        index = {s.name: i for i, s in enumerate(elf.iter_sections())}
        text = elf.get_section_by_name(".text")["sh_addr"]
    rows = (struct.pack("<IBBHQQ", name_offset(i), 0x12, 0, index[".text"], text + 16 * i, 16) for i in range(count))
    for name, content in ((".symtab", b"".join(rows)), (".strtab", strings)):
        struct.pack_into("<QQ", data, header_at + index[name] * header_size + 24, len(data), len(content))
        data += content
    out.write_bytes(data)
    return out


def test_symbols_that_all_name_one_long_string_are_read_within_bounds(build_c, tmp_path):
    """200k function symbols all pointing at one name of a megabyte would make 200 GB of
    names: each name is cut, and past the bytes of names one binary may have, the rest
    are left out and counted."""
    chain = build_c("chain")
    text = symbol_addresses(chain)["chain_a"] & ~0xF  # a function of the new table starts every 16 bytes
    binary = with_symbol_table(chain, tmp_path / "hostile", 200_000, b"\0" + b"x" * (1 << 20) + b"\0", lambda i: 1)
    failures = Failures()
    native = NativeSymbolizer(failures=failures)
    st = os.stat(binary)
    obj = ObjectFile((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), str(binary), str(binary), "/")
    tracemalloc.start()
    try:
        name = native.get_frame(obj, file_offset(binary, text)).name
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        native.close()
    assert name == "x" * MAX_NAME_LENGTH + CUT_MARK.decode()
    assert peak < MAX_NAME_BYTES * 3 + (16 << 20)
    assert native.num_bytes() < MAX_NAME_BYTES + (4 << 20)
    assert failures.counts() == {("binary", "too large"): 1}
    assert "bytes of names left out" in failures.examples()[("binary", "too large")]


def test_symbols_past_the_cap_are_left_out_and_counted(build_c, tmp_path, monkeypatch):
    monkeypatch.setattr(elf_module, "MAX_FUNCTION_SYMBOLS", 1000)
    strings = b"\0" + b"".join(b"f%05d\0" % i for i in range(2000))
    binary = with_symbol_table(build_c("chain"), tmp_path / "many", 2000, strings, lambda i: 1 + 7 * i)
    symbols = open_elf_symbols(str(binary))
    problems = symbols.take_problems()
    assert [str(p) for p in problems] == ["symbols past the first 1000 function symbols left out"]
    assert isinstance(problems[0], TooLarge)


def test_native_frames_are_kept_within_a_bound(build_c, monkeypatch):
    """Named frames past MAX_FRAMES drop the least recently used, which is named again."""
    monkeypatch.setattr(symbolizer_module, "MAX_FRAMES", 8)
    binary = build_c("chain")
    st = os.stat(binary)
    obj = ObjectFile((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), str(binary), str(binary), "/")
    start = file_offset(binary, symbol_addresses(binary)["chain_a"])
    native = NativeSymbolizer()
    try:
        first = native.get_frame(obj, start)
        for offset in range(start + 1, start + 20):
            native.get_frame(obj, offset)
            assert native.num_frames() <= 8
        again = native.get_frame(obj, start)
        assert again is not first and again == first
    finally:
        native.close()


def test_a_section_window_reads_only_within_itself(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"headSECTIONtail")
    fd = os.open(path, os.O_RDONLY)
    try:
        window = elf_module._Window(fd, 4, 7)
        assert window.read() == b"SECTION"
        window.seek(2)
        assert window.read(100) == b"CTION" and window.read(1) == b""
        window.seek(5)
        assert window.read(-1) == b"ON"
        with pytest.raises(ValueError):
            window.read(-2)
        with pytest.raises(ValueError):
            window.seek(-1)
    finally:
        os.close(fd)


def test_compilation_units_read_without_aranges_are_bounded(monkeypatch):
    """Without .debug_aranges each unit's top DIE and range list is read through
    pyelftools, an object per entry: too many units or too long range lists are TooLarge
    (the file's lines left out), not memory and minutes."""
    unit = SimpleNamespace(cu_offset=0, get_top_DIE=lambda: SimpleNamespace(attributes={}))
    many = SimpleNamespace(debug_ranges_sec=None, debug_rnglists_sec=None,
                           iter_CUs=lambda: iter([unit] * (elf_module.MAX_UNITS + 1)))
    with pytest.raises(TooLarge):
        elf_module._cu_spans(many)
    long_lists = SimpleNamespace(debug_ranges_sec=SimpleNamespace(size=elf_module.MAX_RANGE_LISTS + 1),
                                 debug_rnglists_sec=None, iter_CUs=lambda: iter([unit]))
    with pytest.raises(TooLarge):
        elf_module._cu_spans(long_lists)


def test_aranges_past_their_bound_leave_the_lines_out(build_c, monkeypatch):
    monkeypatch.setattr(elf_module, "MAX_ARANGES", 16)
    binary = build_c("chain")
    symbols = open_elf_symbols(str(binary))
    info = symbols.get_function(file_offset(binary, symbol_addresses(binary)["chain_b"]) + 1)
    assert (info.name, info.line) == ("chain_b", 0)
    assert [type(problem) for problem in symbols.take_problems()] == [TooLarge]


def test_native_symbols_are_kept_within_their_bytes(build_c, tmp_path, monkeypatch):
    """Past MAX_SYMBOL_BYTES, once a batch of frames is named, the least recently used
    binaries' symbols are closed, and read again when one of their new addresses comes."""
    source = build_c("chain")
    objects = copies_that_share_nothing(source, tmp_path, 6)
    offset = file_offset(source, symbol_addresses(source)["chain_b"]) + 1
    native = NativeSymbolizer()
    try:
        one = native.get_symbols(objects[0]).num_bytes()
        monkeypatch.setattr(symbolizer_module, "MAX_SYMBOL_BYTES", 3 * one)
        for obj in objects:  # a batch of frames each, as drains name them
            assert native.get_frame(obj, offset).name == "chain_b"
            native.close_idle()
            assert native.num_bytes() <= 3 * one
        assert native.get_frame(objects[0], offset + 4).name == "chain_b"  # closed, and read again
        native.close_idle()
        assert native.num_bytes() <= 3 * one
    finally:
        native.close()
