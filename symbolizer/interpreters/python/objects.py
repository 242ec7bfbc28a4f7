"""str objects read out of a CPython process's memory: the names of code objects, the
keys of dicts and the names of threads. The memory may change under the read or hold
garbage: what does not look like a compact str raises UnreadableMemory."""

from __future__ import annotations

import struct
from typing import Tuple

from bpfprof.symbolizer.interpreters.python.layouts import PythonLayout
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory

_ENCODINGS = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}  # by bytes per character


def str_header(memory: ProcessMemory, layout: PythonLayout, address: int) -> Tuple[int, int, bool, int]:
    """(length, bytes per character, ASCII only, address of the characters) of a compact
    str object (the only kind that code objects, dict keys and thread names hold)."""
    header = memory.read(address, layout.unicode_ascii_data)
    (state,) = struct.unpack_from("<I", header, layout.unicode_state)
    (length,) = struct.unpack_from("<q", header, layout.unicode_length)
    kind, compact, ascii_only = (state >> 2) & 7, (state >> 5) & 1, bool((state >> 6) & 1)
    if not compact or kind not in _ENCODINGS or not 0 <= length < 1 << 31:
        raise UnreadableMemory(f"not a compact str at {address:#x}")
    data = layout.unicode_ascii_data if ascii_only else layout.unicode_compact_data
    return length, kind, ascii_only, address + data


def read_str(memory: ProcessMemory, layout: PythonLayout, address: int, max_length: int) -> str:
    """The text of a str object, cut to its first max_length characters."""
    length, kind, ascii_only, data = str_header(memory, layout, address)
    raw = memory.read(data, min(length, max_length) * kind)
    return raw.decode("ascii" if ascii_only else _ENCODINGS[kind], "replace")


def is_str(memory: ProcessMemory, layout: PythonLayout, address: int, text: str) -> bool:
    """Whether the object at address is a str equal to the (ASCII) text."""
    try:
        length, _, ascii_only, data = str_header(memory, layout, address)
    except UnreadableMemory:
        return False  # objects of other types, or garbage, are not this str
    return ascii_only and length == len(text) and memory.read(data, length) == text.encode()
