"""Thread names read out of live CPython processes: under every installed interpreter a
script starts named threads and prints what `threading.get_ident()` and the name are in
each; `thread_names` must find the same from the outside, in a number of reads bounded by
what the process holds. Also: the constants it reads with, against each version's
headers (its offsets, in layouts.py, are checked by test_python_layouts.py), and garbage
memory giving a clean error within a bounded number of reads, never a hang."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from conftest import PYTHON_MINORS, include_dir, pyenv_python, skip_or_fail

from bpfprof.symbolizer.native.elf import open_elf_symbols
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory
from bpfprof.symbolizer.interpreters.python.layouts import (
    DEBUG_OFFSETS_COOKIE,
    DEBUG_OFFSETS_SIZE,
    LAYOUTS,
    OBJECT_LAYOUTS,
    PythonLayout,
    layout_for,
    parse_debug_offsets,
)
from bpfprof.symbolizer.interpreters.python import thread_names as python_thread_names
from bpfprof.symbolizer.interpreters.python.thread_names import (
    DICT_KEYS_GENERAL,
    INLINE_VALUES_FLAG,
    MANAGED_DICT_FLAG,
    Searches,
    thread_names,
)
from bpfprof.symbolizer.interpreters.python.threads import MAX_INTERPRETERS, RUNTIME_SYMBOLS, thread_states

MINORS = PYTHON_MINORS
INTERPRETER_NAME = re.compile(r"^(?:lib)?python3\.(\d+)")


def pyenv_prefix(minor: int) -> Path:
    return Path(pyenv_python(minor)).parent.parent


# ---------------------------------------------------------------------------------------
# A live process with named threads

# Every thread reports its own ident and name, then waits until stdin closes; the first
# line also says how many modules sys.modules holds. Besides
# plain threads: names whose characters take 1, 2 and 4 bytes in a str, a subclass with
# __slots__ (no inline values in 3.13), and a thread whose __dict__ was asked for (so the
# instance's values are turned into a real dict on 3.11+).
SCRIPT = r"""
import json, queue, sys, threading

reports = queue.Queue()
stop = threading.Event()

def work():
    reports.put((threading.get_ident(), threading.current_thread().name))
    stop.wait()

class Slotted(threading.Thread):
    __slots__ = ("extra",)

names = ["worker-a", "db-poller", "gr\u00f6\u00dfe", "\u30b9\u30ec\u30c3\u30c9", "n\u00e4\U0001f9f5"]
threads = [threading.Thread(target=work, name=name, daemon=True) for name in names]
threads.append(Slotted(target=work, name="slotted", daemon=True))
threads.append(threading.Thread(target=work, name="with-dict", daemon=True))
vars(threads[-1])
threads.append(threading.Thread(target=work, daemon=True))   # a default name
for thread in threads:
    thread.start()
seen = {threading.get_ident(): threading.current_thread().name}
for _ in threads:
    ident, name = reports.get()
    seen[ident] = name
print(json.dumps({"modules": len(sys.modules), "names": {str(ident): name for ident, name in seen.items()}}),
      flush=True)
sys.stdin.read()
"""

NO_THREADING_SCRIPT = r"""
import sys
print("threading" in sys.modules, flush=True)
sys.stdin.read()
"""


def find_runtime(pid: int) -> Tuple[int, str]:
    """The address of _PyRuntime (3.6: interp_head) in a process, and the binary it is in:
    the first mapping of each file named like an interpreter, its symbols, and the load bias."""
    seen = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or not fields[5].startswith("/") or fields[5] in seen:
                continue
            path = fields[5]
            seen.add(path)
            if not INTERPRETER_NAME.match(os.path.basename(path)):
                continue
            symbols = open_elf_symbols(path, data_names=RUNTIME_SYMBOLS)
            try:
                name = next((name for name in RUNTIME_SYMBOLS if name in symbols.data), None)
                if name is None:
                    continue
                start, offset = (int(x, 16) for x in (fields[0].split("-")[0], fields[2]))
                vaddr = symbols.vaddr(offset)
                assert vaddr is not None, f"{path}: offset {offset:#x} is in no PT_LOAD segment"
                return start - vaddr + symbols.data[name], path
            finally:
                symbols.close()
    raise AssertionError(f"none of {RUNTIME_SYMBOLS} in any interpreter binary mapped by {pid}")


def process_layout(memory: ProcessMemory, runtime: int, python: str) -> PythonLayout:
    if memory.read(runtime, len(DEBUG_OFFSETS_COOKIE)) == DEBUG_OFFSETS_COOKIE:
        return parse_debug_offsets(memory.read(runtime, DEBUG_OFFSETS_SIZE))
    out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout
    layout = layout_for(tuple(int(n) for n in out.split()))
    assert layout is not None
    return layout


class CountingMemory(ProcessMemory):
    """Another memory, its reads counted. A read past `budget` fails the test, so a reader
    that loops on hostile input ends in a failure rather than a hang."""

    def __init__(self, inner: ProcessMemory, budget: int) -> None:
        self.pid = inner.pid
        self._fd = -1
        self.inner, self.budget = inner, budget
        self.reads = 0

    def read(self, address: int, size: int) -> bytes:
        self.reads += 1
        if self.reads > self.budget:
            pytest.fail(f"more than {self.budget} reads")
        return self.inner.read(address, size)


class Running:
    """A script running under an interpreter until the end of the with block."""

    def __init__(self, python: str, script: str) -> None:
        self.process = subprocess.Popen([python, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def __enter__(self) -> "Running":
        self.first_line = self.process.stdout.readline().decode()
        assert self.first_line, f"the script died: exit status {self.process.wait()}"
        self.memory = ProcessMemory(self.process.pid)
        self.runtime, self.binary = find_runtime(self.process.pid)
        return self

    def __exit__(self, *exc) -> None:
        self.memory.close()
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


# Reads a clean read of a process may take: a sys.modules entry up to three (a split
# table's value, a str's header and characters), a thread up to 24 (its ident, its type
# and flags, its __dict__ and the entries before `_name`, the name).
READS_PER_MODULE = 3
READS_PER_THREAD = 24


def test_thread_names_of_a_live_process(python):
    with Running(python, SCRIPT) as running:
        reported = json.loads(running.first_line)
        expected = {int(ident): name for ident, name in reported["names"].items()}
        layout = process_layout(running.memory, running.runtime, python)
        memory = CountingMemory(running.memory, 1 << 20)
        names = thread_names(memory, layout, running.runtime)
    assert len(expected) == 9
    assert "MainThread" in expected.values() and "gr\u00f6\u00dfe" in expected.values()
    assert names == expected
    assert memory.reads <= READS_PER_MODULE * reported["modules"] + READS_PER_THREAD * len(expected)


def test_the_idents_are_the_thread_states_thread_ids(python):
    """Joining with the thread list works: each name's ident is some thread state's
    thread_id, walking the thread states as the collector does."""
    with Running(python, SCRIPT) as running:
        layout = process_layout(running.memory, running.runtime, python)
        names = thread_names(running.memory, layout, running.runtime)
        thread_ids = {ident for _, ident, _ in thread_states(running.memory, layout, running.runtime)}
    assert set(names) <= thread_ids
    assert len(names) == 9


def test_a_process_without_threading(python):
    with Running(python, NO_THREADING_SCRIPT) as running:
        imported = running.first_line.strip() == "True"
        layout = process_layout(running.memory, running.runtime, python)
        names = thread_names(running.memory, layout, running.runtime)
    if imported:  # some builds import threading at startup (a .pth file, say)
        assert list(names.values()) == ["MainThread"]
    else:
        assert names == {}


LATE_THREADING_SCRIPT = r"""
import sys
print("started", flush=True)
sys.stdin.readline()
import threading
stop = threading.Event()
threading.Thread(target=stop.wait, name="late-worker", daemon=True).start()
print("one thread", flush=True)
sys.stdin.readline()
import decimal, email.parser, json, logging  # sys.modules grows, and is resized
threading.Thread(target=stop.wait, name="later-worker", daemon=True).start()
print("two threads", flush=True)
sys.stdin.read()
"""


def test_reads_again_find_what_was_added_since(python):
    """Reads that keep what they found of sys.modules name the same threads as a first
    read would: threading imported after the first, threads started after the second,
    and threads named already left out."""
    with Running(python, LATE_THREADING_SCRIPT) as running:
        layout = process_layout(running.memory, running.runtime, python)
        searches = Searches()
        reads = [thread_names(running.memory, layout, running.runtime, searches)]
        for _ in range(2):
            running.process.stdin.write(b"\n")
            running.process.stdin.flush()
            running.process.stdout.readline()
            reads.append(thread_names(running.memory, layout, running.runtime, searches))
            assert reads[-1] == thread_names(running.memory, layout, running.runtime)
        named = {ident for ident, name in reads[-1].items() if name != "later-worker"}
        left = thread_names(running.memory, layout, running.runtime, searches, known=named)
    assert set(reads[0].values()) <= {"MainThread"}
    assert sorted(reads[1].values()) == ["MainThread", "late-worker"]
    assert sorted(reads[2].values()) == ["MainThread", "late-worker", "later-worker"]
    assert list(left.values()) == ["later-worker"]


def test_a_process_that_is_gone(python):
    with Running(python, SCRIPT) as running:
        layout = process_layout(running.memory, running.runtime, python)
        running.process.kill()
        running.process.wait()
        with pytest.raises(UnreadableMemory):
            thread_names(running.memory, layout, running.runtime)


# ---------------------------------------------------------------------------------------
# Garbage


# A read of hostile memory is bounded by the dict entries the reader may look at in all
# (MAX_WORK, lowered by these tests so that the bound is tight): every read is for an
# entry looked at (at most 16: a thread's key, ident, type, __dict__ and name) or for
# the walk from an interpreter to its threading._active (at most 32).
HOSTILE_WORK = 1024
READS_PER_ENTRY = 16
READS_PER_INTERPRETER = 32
HOSTILE_READ_BUDGET = READS_PER_ENTRY * HOSTILE_WORK + READS_PER_INTERPRETER * MAX_INTERPRETERS


@pytest.fixture
def hostile_work(monkeypatch) -> None:
    monkeypatch.setattr(python_thread_names, "MAX_WORK", HOSTILE_WORK)


class FakeMemory(ProcessMemory):
    """Memory made of one buffer at `base`; everything else is unreadable."""

    def __init__(self, base: int, data: bytes) -> None:
        self.pid = 0
        self._fd = -1
        self.base, self.data = base, data

    def read(self, address: int, size: int) -> bytes:
        start = address - self.base
        if size < 0 or start < 0 or start + size > len(self.data):
            raise UnreadableMemory(f"{size} bytes at {address:#x}")
        return self.data[start:start + size]


def garbage(rng: random.Random, base: int, size: int) -> bytearray:
    """Words that are mostly pointers into the buffer itself, small numbers or zero:
    the worst case for a reader that follows pointers and loops over counts."""
    words = []
    for _ in range(size // 8):
        choice = rng.random()
        if choice < 0.7:
            words.append((base + rng.randrange(0, size - 8)) & ~rng.choice((0, 7)))
        elif choice < 0.9:
            words.append(rng.randrange(0, 64))
        elif choice < 0.95:
            words.append(0)
        else:
            words.append(rng.getrandbits(64))
    return bytearray(struct.pack(f"<{len(words)}Q", *words))


class CorruptingMemory(ProcessMemory):
    """A live process's memory, but some reads come back damaged: a word replaced by
    zero, a large count, a pointer back at itself or random bits."""

    def __init__(self, memory: ProcessMemory, rng: random.Random, rate: float) -> None:
        self.pid = memory.pid
        self._fd = -1
        self.inner, self.rng, self.rate = memory, rng, rate

    def read(self, address: int, size: int) -> bytes:
        data = self.inner.read(address, size)
        if not size or self.rng.random() >= self.rate:
            return data
        data = bytearray(data)
        if size < 8:
            data[self.rng.randrange(size)] = self.rng.getrandbits(8)
            return bytes(data)
        at = self.rng.randrange(0, size - 7) & ~7
        value = self.rng.choice((0, 1 << self.rng.randrange(8, 40), address, address + at, self.rng.getrandbits(64)))
        struct.pack_into("<Q", data, at, value)
        return bytes(data)


def test_damaged_memory_of_a_live_process_gives_a_clean_result_in_bounded_reads(python, hostile_work):
    with Running(python, SCRIPT) as running:
        layout = process_layout(running.memory, running.runtime, python)
        rng = random.Random(1)
        for _ in range(200):
            memory = CountingMemory(CorruptingMemory(running.memory, rng, rate=0.03), HOSTILE_READ_BUDGET)
            try:
                names = thread_names(memory, layout, running.runtime)
            except UnreadableMemory:
                continue
            assert all(isinstance(k, int) and isinstance(v, str) and len(v) <= 256 for k, v in names.items())


def layouts_for_garbage() -> List[PythonLayout]:
    # 3.13 has no tabled PythonLayout; 3.12's serves for walking, with 3.13's objects
    # completed by what its _Py_DebugOffsets carry (the same numbers as 3.12's).
    objects_3_12 = LAYOUTS[(3, 12)].objects
    objects_3_13 = dataclasses.replace(
        OBJECT_LAYOUTS[(3, 13)], object_type=objects_3_12.object_type, type_flags=objects_3_12.type_flags,
        dict_keys=objects_3_12.dict_keys, dict_values=objects_3_12.dict_values,
        long_size=objects_3_12.long_size, long_digits=objects_3_12.long_digits)
    return [*LAYOUTS.values(), dataclasses.replace(LAYOUTS[(3, 12)], version=(3, 13), objects=objects_3_13)]


@pytest.mark.parametrize("layout", layouts_for_garbage(), ids=lambda l: f"3.{l.version[1]}")
def test_garbage_gives_a_clean_error_in_bounded_reads(layout, hostile_work):
    base, size = 0x10000000, 1 << 16
    for seed in range(300):
        rng = random.Random(seed)
        data = garbage(rng, base, size)
        runtime = base + rng.randrange(0, size // 2) & ~7
        memory = CountingMemory(FakeMemory(base, bytes(data)), HOSTILE_READ_BUDGET)
        try:
            names = thread_names(memory, layout, runtime)
        except UnreadableMemory:
            continue
        assert isinstance(names, dict)
        assert all(isinstance(k, int) and isinstance(v, str) for k, v in names.items())


def test_unreadable_runtime():
    memory = FakeMemory(0x1000, bytes(64))
    for layout in layouts_for_garbage():
        with pytest.raises(UnreadableMemory):
            thread_names(memory, layout, 0x90000)


def test_versions_without_objects_are_refused():
    # As parse_debug_offsets makes 3.14's layout: no object table for it.
    layout = dataclasses.replace(LAYOUTS[(3, 12)], version=(3, 14), objects=None)
    with pytest.raises(ValueError, match="3.14"):
        thread_names(FakeMemory(0x1000, bytes(64)), layout, 0x1000)


# ---------------------------------------------------------------------------------------
# The constants against the headers


def c_expressions(minor: int) -> Dict[str, Optional[str]]:
    """For each constant the reader takes, the C expression that gives it on 3.<minor>,
    or None where the version has no such constant."""
    return {
        "PyLong_SHIFT": "PyLong_SHIFT",
        "_PyLong_NON_SIZE_BITS": "_PyLong_NON_SIZE_BITS" if minor >= 12 else None,
        "Py_TPFLAGS_MANAGED_DICT": "Py_TPFLAGS_MANAGED_DICT" if minor >= 11 else None,
        "Py_TPFLAGS_INLINE_VALUES": "Py_TPFLAGS_INLINE_VALUES" if minor >= 13 else None,
        "DICT_KEYS_GENERAL": "DICT_KEYS_GENERAL" if minor >= 11 else None,
    }


def c_program(minor: int) -> str:
    headers = ["Python.h"]
    if minor <= 10:
        headers.append("longintrepr.h")
    else:
        headers.append("internal/pycore_dict.h")
    lines = ["#define Py_BUILD_CORE 1"] + [f'#include "{h}"' for h in headers]
    lines += ["#include <stdio.h>", "", "int main(void) {"]
    for name, expr in c_expressions(minor).items():
        if expr is not None:
            lines.append(f'    printf("%s %ld\\n", "{name}", (long)({expr}));')
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def measure(minor: int, work: Path) -> Dict[str, int]:
    prefix = pyenv_prefix(minor)
    if shutil.which("gcc") is None:
        skip_or_fail("gcc is not installed")
    include = include_dir(prefix, minor)
    if not (include / "Python.h").is_file():
        skip_or_fail(f"no headers in {include}")
    source, binary = work / f"constants3{minor}.c", work / f"constants3{minor}"
    source.write_text(c_program(minor))
    result = subprocess.run(["gcc", "-w", "-o", str(binary), "-I", str(include), "-I", str(include / "internal"),
                             str(source)], capture_output=True, text=True)
    assert result.returncode == 0, f"compiling against 3.{minor} headers failed:\n{result.stderr}"
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in output.splitlines())}


@pytest.mark.parametrize("minor", MINORS, ids=[f"3.{m}" for m in MINORS])
def test_constants_match_headers(minor, tmp_path):
    measured = measure(minor, tmp_path)
    assert measured["PyLong_SHIFT"] == 30
    assert measured.get("_PyLong_NON_SIZE_BITS", 3) == 3
    assert measured.get("Py_TPFLAGS_MANAGED_DICT", MANAGED_DICT_FLAG) == MANAGED_DICT_FLAG
    assert measured.get("Py_TPFLAGS_INLINE_VALUES", INLINE_VALUES_FLAG) == INLINE_VALUES_FLAG
    assert measured.get("DICT_KEYS_GENERAL", DICT_KEYS_GENERAL) == DICT_KEYS_GENERAL
