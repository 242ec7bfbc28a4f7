"""The code objects and frames PythonSymbolizer keeps (symbolizer/interpreters/python/
code_objects.py), read from a made-up process image: a line table many code objects
share is held once, both caches stay within their bytes, dropping the least recently used
first, and a process that is gone leaves nothing behind."""

from __future__ import annotations

import struct
import tracemalloc
from typing import List, Tuple

from bpfprof.symbolizer.interpreters.python.code_objects import PythonSymbolizer, check_of
from bpfprof.symbolizer.interpreters.python.layouts import LAYOUTS
from test_python_thread_names import FakeMemory

LAYOUT = LAYOUTS[(3, 12)]
BASE = 0x10000
MiB = 1 << 20


class Image:
    """A process's memory being made: str, bytes and code objects laid out one after another."""

    def __init__(self, pid: int = 1) -> None:
        self.data = bytearray()
        self.pid = pid

    def _place(self, size: int) -> int:
        at = len(self.data)
        self.data += bytes(size + -size % 16)
        return at

    def str(self, text: str) -> int:
        at = self._place(LAYOUT.unicode_ascii_data + len(text) + 1)
        struct.pack_into("<q", self.data, at + LAYOUT.unicode_length, len(text))
        struct.pack_into("<I", self.data, at + LAYOUT.unicode_state, 0x64)  # compact, ASCII, 1 byte a character
        start = at + LAYOUT.unicode_ascii_data
        self.data[start:start + len(text)] = text.encode()
        return BASE + at

    def bytes(self, content: bytes) -> int:
        at = self._place(LAYOUT.bytes_data + len(content))
        struct.pack_into("<q", self.data, at + LAYOUT.bytes_size, len(content))
        self.data[at + LAYOUT.bytes_data:at + LAYOUT.bytes_data + len(content)] = content
        return BASE + at

    def code(self, name: int, filename: int, linetable: int, firstlineno: int) -> Tuple[int, int]:
        """(address, check) of a code object, as the walker records them."""
        at = self._place(LAYOUT.code_adaptive)
        struct.pack_into("<i", self.data, at + LAYOUT.code_firstlineno, firstlineno)
        for field, value in ((LAYOUT.code_name, name), (LAYOUT.code_qualname, name),
                             (LAYOUT.code_filename, filename), (LAYOUT.code_linetable, linetable)):
            struct.pack_into("<Q", self.data, at + field, value)
        return BASE + at, check_of(firstlineno, name)

    def memory(self) -> FakeMemory:
        memory = FakeMemory(BASE, bytes(self.data))
        memory.pid = self.pid
        return memory


def learn_all(symbols: PythonSymbolizer, memory: FakeMemory, codes: List[Tuple[int, int]]) -> None:
    for code, check in codes:
        symbols.learn(memory, LAYOUT, code, check)


def test_code_objects_sharing_a_line_table_hold_it_once():
    image = Image()
    name, filename = image.str("f"), image.str("module.py")
    table = bytes(range(256)) * 4096  # 1 MiB
    shared = image.bytes(table)
    codes = [image.code(name, filename, shared, line) for line in range(1, 301)]
    # Other objects with the same content, at their own addresses: held once too.
    codes += [image.code(name, filename, image.bytes(table), 1000 + i) for i in range(3)]
    memory = image.memory()
    del image

    tracemalloc.start()
    try:
        symbols = PythonSymbolizer()
        learn_all(symbols, memory, codes)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert symbols.num_bytes() < 2 * MiB
    assert held < 3 * MiB  # each code object's own copy would make 303 MiB
    assert all(symbols.learn(memory, LAYOUT, code, check).linetable == table for code, check in codes)


def test_the_code_cache_stays_within_its_bytes_and_drops_the_least_recently_used():
    image = Image()
    filename = image.str("module.py")
    codes = [image.code(image.str(f"f{i}"), filename, image.bytes(bytes([i]) * (MiB // 2)), i + 1) for i in range(12)]
    memory = image.memory()
    symbols = PythonSymbolizer(max_code_bytes=3 * MiB)
    learn_all(symbols, memory, codes[:4])
    symbols.learn(memory, LAYOUT, *codes[0])  # used again: the newest now
    learn_all(symbols, memory, codes[4:])
    assert symbols.num_bytes() <= 3 * MiB

    # What is still held is not read again: names changed since show which were dropped.
    for code, _ in codes:
        name = struct.unpack_from("<Q", image.data, code - BASE + LAYOUT.code_name)[0]
        image.data[name - BASE + LAYOUT.unicode_ascii_data] = ord("g")
    changed = image.memory()
    newest = [symbols.learn(changed, LAYOUT, *code).qualname for code in codes[8:]]
    assert newest == [f"f{i}" for i in range(8, 12)]  # the most recently used stay
    oldest = [symbols.learn(changed, LAYOUT, *code).qualname for code in codes[:4]]
    assert oldest == [f"g{i}" for i in range(4)]  # the least were dropped, and are read again
    assert symbols.num_bytes() <= 3 * MiB


def test_the_frame_cache_stays_within_its_bytes():
    image = Image()
    code, check = image.code(image.str("f" * 4000), image.str("module.py"), image.bytes(b""), 1)
    memory = image.memory()
    symbols = PythonSymbolizer(max_frame_bytes=MiB)
    for instr in range(2000):
        assert symbols.get_frame(memory, LAYOUT, code, instr, check).name == "f" * 4000
    assert symbols.num_bytes() <= MiB + 16 * 1024  # the frames, and one code object


def test_a_process_forgotten_leaves_nothing_behind():
    symbols = PythonSymbolizer()
    empty = symbols.num_bytes()
    for pid in (1, 2):
        image = Image(pid)
        code, check = image.code(image.str("f"), image.str("module.py"), image.bytes(b"\x01" * 1000), 1)
        symbols.get_frame(image.memory(), LAYOUT, code, 0, check)
    symbols.forget(1)
    symbols.forget(2)
    assert symbols.num_bytes() == empty
