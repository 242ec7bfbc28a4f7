"""Native stacks without frame pointers, unwound in BPF from .eh_frame: C fixtures built
with -fomit-frame-pointer, and pyenv CPython (no frame pointers) calling into zlib."""

from __future__ import annotations

import ctypes
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from bpfprof.collector.probe.kernel_headers import find_kernel_headers
from bpfprof.collector.probe.sampler import Sampler, SamplerConfig
from bpfprof.symbolizer.native.unwind_cache import open_unwind_table
from conftest import (FIXTURES, PYTHON_MINORS, bpfprof_command, pyenv_python, run_bpfprof, sampler_programs,
                      sampling_started)
from samples import read_samples, share

pytestmark = pytest.mark.usefixtures("bpf_ready")

ROOT = ("_start", "__libc_start_main", "__libc_start_call_main", "main")
CHAIN = tuple(f"level_{n}" for n in range(1, 9))
ZLIB_SCRIPT = """
import sys, time, zlib
data = bytes(range(256)) * 4096
def compress_all(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        zlib.compress(data, 9)
compress_all(float(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def no_frame_pointers(build_dir) -> Path:
    """The fixture and the shared library it calls, both without frame pointers."""
    flags = ["gcc", "-O2", "-g", "-fomit-frame-pointer"]
    out = build_dir / "no_frame_pointers"
    if not out.exists():
        subprocess.run([*flags, "-shared", "-fPIC", "-o", str(build_dir / "libunwind_lib.so"),
                        str(FIXTURES / "unwind" / "unwind_lib.c")], check=True)
        subprocess.run([*flags, "-o", str(out), str(FIXTURES / "unwind" / "no_frame_pointers.c"),
                        f"-L{build_dir}", "-lunwind_lib", f"-Wl,-rpath,{build_dir}"], check=True)
    # The tests measure unwinding, not a first recording on a fresh machine, whose tables
    # are built while the command runs (its first samples have frame-pointer stacks):
    # each binary's table is built here into the cache, as a first recording would.
    for binary in [out, *re.findall(r"(/\S+) \(0x", subprocess.run(["ldd", str(out)], capture_output=True,
                                                                   text=True, check=True).stdout)]:
        open_unwind_table(str(binary))
    return out


def test_unwinder_memory_is_what_its_maps_take(monkeypatch):
    """What `check` and the end summary say the unwinder's maps take, against the maps loaded."""
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "")  # the sampler sets it: restored for the other tests
    monkeypatch.delenv("BCC_KERNEL_SOURCE")
    config = SamplerConfig(block=True, native_unwind=True)
    sampler = Sampler(config, find_kernel_headers())
    sampler.start(lambda event: None)
    try:
        tables = [sampler._bpf[name] for name in ("unwind_rows", "unwind_mappings", "native_stacks_0",
                                                  "native_stacks_1", "offcpu_native_stacks")]
        taken = sum(ctypes.sizeof(table.Leaf) * table.max_entries for table in tables)
    finally:
        sampler.close()
    assert taken == config.unwind_memory_bytes()


def record(tmp_path, *args: str, name: str = "out.pb.gz"):
    out = tmp_path / name
    result = run_bpfprof("record", "-F", "199", "-o", str(out), *args)  # unwinding tables by default
    assert result.returncode == 0, result.stderr
    return result, [s for s in read_samples(out) if s.labels["comm"] != "bpfprof"]


def test_eight_deep_chain_in_order(no_frame_pointers, tmp_path):
    result, samples = record(tmp_path, "--", str(no_frame_pointers), "chain", "3")
    assert share(samples, lambda s: s.has_chain(*ROOT, *CHAIN)) >= 0.9
    assert "native unwinding:" in result.stderr and "complete" in result.stderr


def test_frame_pointers_alone_lose_the_chain(no_frame_pointers, tmp_path):
    _, samples = record(tmp_path, "--no-dwarf", "--", str(no_frame_pointers), "chain", "2")
    assert share(samples, lambda s: s.has_chain("main", *CHAIN)) < 0.1


def test_recursion(no_frame_pointers, tmp_path):
    _, samples = record(tmp_path, "--", str(no_frame_pointers), "recursion", "2")
    assert share(samples, lambda s: s.has_chain(*ROOT, *["recurse"] * 20, "spin_in_recursion")) >= 0.9


def test_call_through_a_shared_library(no_frame_pointers, tmp_path):
    _, samples = record(tmp_path, "--", str(no_frame_pointers), "library", "2")
    assert share(samples, lambda s: s.has_chain(*ROOT, "call_library", "library_outer", "library_inner")) >= 0.9


def test_library_loaded_after_the_process_was_read(no_frame_pointers, tmp_path):
    """The mappings BPF unwinds through are read again when the process runs code in none
    of them (here a library dlopen'd 0.3 s in, after its first samples were taken)."""
    library = tmp_path / "libunwind_loaded.so"
    shutil.copy(no_frame_pointers.parent / "libunwind_lib.so", library)
    _, samples = record(tmp_path, "--", str(no_frame_pointers), "dlopen", "4", str(library))
    in_library = [s for s in samples if "library_inner" in s.functions]
    assert sum(s.count for s in in_library) >= 4 * 199 * 0.8
    assert share(in_library, lambda s: s.has_chain(*ROOT, "call_loaded", "library_outer", "library_inner")) >= 0.9


def test_library_loaded_late_is_named_by_a_whole_system_recording_without_dwarf(no_frame_pointers, tmp_path):
    """With frame pointers alone, a sample in a library loaded after the process was read
    still names its function: the kernel tells of the code the process mapped, and the
    process is read again for it."""
    # Its own copy of library_inner, named late_inner: the fixture's library_outer calls
    # it, not the library_inner of the library loaded at start.
    library = tmp_path / "liblate.so"
    subprocess.run(["gcc", "-O2", "-g", "-fomit-frame-pointer", "-shared", "-fPIC", "-Dlibrary_inner=late_inner",
                    "-o", str(library), str(FIXTURES / "unwind" / "unwind_lib.c")], check=True)
    out = tmp_path / "all.pb.gz"
    before = sampler_programs()
    profiler = subprocess.Popen([*bpfprof_command(), "record", "-a", "-F", "199", "--no-dwarf", "-o", str(out)],
                                stderr=subprocess.PIPE, text=True)
    try:
        sampling_started(profiler, before)
        fixture = subprocess.Popen([str(no_frame_pointers), "dlopen", "2", str(library)])
        fixture.wait()
    finally:
        profiler.send_signal(signal.SIGINT)
        _, stderr = profiler.communicate(timeout=60)
    assert profiler.returncode == 0, stderr
    samples = [s for s in read_samples(out) if s.labels["pid"] == fixture.pid]
    assert share(samples, lambda s: s.functions[:1] in (["spin"], ["now"])) > 0  # read before the dlopen
    in_library = sum(s.count for s in samples if s.functions[:1] == ["late_inner"])
    assert in_library >= 2 * 199 * 0.8, sorted(((s.count, s.functions) for s in samples), reverse=True)[:8]


def test_signal_handler_on_top_of_the_interrupted_frames(no_frame_pointers, tmp_path):
    _, samples = record(tmp_path, "--", str(no_frame_pointers), "signal", "2")
    in_handler = [s for s in samples if "on_alarm" in s.functions]
    assert share(samples, lambda s: "on_alarm" in s.functions) >= 0.5  # the handler spins 8 ms of every 10
    # Above the handler the kernel's signal frame (glibc's __restore_rt, unnamed in a
    # stripped libc), then the code it interrupted (itself, or the clock_gettime it
    # calls), down to main.
    assert share(in_handler, lambda s: s.has_chain(*ROOT, "interrupted") and s.has_chain("on_alarm", "spin_in_handler")
                 and s.functions.index("interrupted") > s.functions.index("on_alarm") + 1) >= 0.9


def test_blocking_delay_stacks(no_frame_pointers, tmp_path):
    # With CPU samples too, so that the process is read while it spins, before its first nap.
    out = tmp_path / "out.pb.gz"
    result = run_bpfprof("record", "-t", "cpu", "-t", "block", "-o", str(out), "--",
                         str(no_frame_pointers), "sleep", "1")
    assert result.returncode == 0, result.stderr
    delay = [s for s in read_samples(tmp_path / "out.block.pb.gz") if "clock_nanosleep" in s.functions]
    total = sum(s.values[1] for s in delay)
    assert total >= 0.9e9
    chained = sum(s.values[1] for s in delay if s.has_chain(*ROOT, *CHAIN))
    assert chained / total >= 0.9


# Below __libc_start_call_main, before 3.8's Py_BytesMain.
INTERPRETER_MAIN = {6: ("main", "Py_Main"), 7: ("_Py_UnixMain",)}


@pytest.mark.parametrize("minor", [pytest.param(m, id=f"pyenv-3.{m}") for m in PYTHON_MINORS])
def test_python_calling_a_c_extension(minor, tmp_path):
    script = tmp_path / "compress.py"
    script.write_text(ZLIB_SCRIPT)
    _, samples = record(tmp_path, "--", pyenv_python(minor), str(script), "3")
    in_zlib = [s for s in samples if "compress_all" in s.functions and "zlib_compress" in s.functions]
    assert sum(s.count for s in in_zlib) / sum(s.count for s in samples) >= 0.7
    # The interpreter's main above the Python frames, the extension and zlib below them
    # (up to 3.10 with the interpreter's own C frames between a Python call and the next).
    # main jumps to the interpreter's main from 3.7 on, so it is on the stack in 3.6 only.
    entry = INTERPRETER_MAIN.get(minor, ("Py_BytesMain",))
    assert share(in_zlib, lambda s: s.has_chain(*ROOT[:3], *entry) and s.has_chain("zlib_compress", "deflate")
                 and in_order(s, entry[-1], "<module>", "compress_all", "zlib_compress")) >= 0.8


def in_order(sample, *root_to_leaf: str) -> bool:
    """These functions are in the stack, root to leaf in this order (not only adjacent)."""
    remaining = iter(sample.functions[::-1])
    return all(name in remaining for name in root_to_leaf)
