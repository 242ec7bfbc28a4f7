"""Free-threaded CPython builds (3.13t, 3.14t), none of which can be installed here, told
apart from synthetic data: a `_Py_DebugOffsets` whose free_threaded member is set, and
binaries named with the t ABI flag. layout_of refuses them with Unsupported, so that
their processes get one warning and native frames."""

from __future__ import annotations

import struct

import pytest

from bpfprof.symbolizer.errors import Unsupported
from bpfprof.symbolizer.interpreters.python.layouts import (
    DEBUG_OFFSETS_COOKIE,
    DEBUG_OFFSETS_SIZE,
    debug_offsets_free_threaded,
)
from bpfprof.symbolizer.interpreters.python.threads import INTERPRETER_NAME, is_free_threaded, layout_of
from test_python_thread_names import FakeMemory

RUNTIME = 0x7F0000001000


def debug_offsets(version_hex: int, free_threaded: int) -> bytes:
    """The start of a 3.13+ _PyRuntime: cookie, version, free_threaded, then members left 0."""
    return DEBUG_OFFSETS_COOKIE + struct.pack("<QQ", version_hex, free_threaded) + bytes(DEBUG_OFFSETS_SIZE - 24)


@pytest.mark.parametrize("version_hex", [0x030D00F0, 0x030E0AF0, 0x030F02F0], ids=["3.13.0", "3.14.10", "3.15.2"])
def test_debug_offsets_say_whether_the_build_is_free_threaded(version_hex):
    assert debug_offsets_free_threaded(debug_offsets(version_hex, 1))
    assert not debug_offsets_free_threaded(debug_offsets(version_hex, 0))


def test_debug_offsets_too_short_to_say_are_not_free_threaded():
    assert not debug_offsets_free_threaded(debug_offsets(0x030D00F0, 1)[:23])


@pytest.mark.parametrize("name, free_threaded", [
    ("libpython3.13t.so.1.0", True), ("python3.14t", True), ("libpython3.14td.so.1.0", True),
    ("libpython3.13.so.1.0", False), ("python3.13d", False), ("libpython3.6m.so.1.0", False), ("python3.12", False),
])
def test_the_t_abi_flag_of_the_name(name, free_threaded):
    assert is_free_threaded(INTERPRETER_NAME.match(name).group(3), None) is free_threaded


def test_a_free_threaded_runtime_is_refused_whatever_its_name():
    memory = FakeMemory(RUNTIME, debug_offsets(0x030E0AF0, 1))
    with pytest.raises(Unsupported, match="free-threaded"):
        layout_of(memory, RUNTIME, None, "/usr/lib/x86_64-linux-gnu/libpython3.14.so.1.0")


def test_a_binary_named_free_threaded_is_refused():
    memory = FakeMemory(RUNTIME, debug_offsets(0x030D00F0, 0))
    with pytest.raises(Unsupported, match="free-threaded"):
        layout_of(memory, RUNTIME, None, "/opt/python/lib/libpython3.13t.so.1.0")
