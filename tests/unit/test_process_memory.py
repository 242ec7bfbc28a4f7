"""Reading another process's memory (here this one's, through /proc/self/mem)."""

import ctypes
import os

import pytest

from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory
from conftest import skip_or_fail


@pytest.fixture
def memory():
    if not os.access(f"/proc/{os.getpid()}/mem", os.R_OK):
        skip_or_fail("needs to read /proc/self/mem")
    opened = ProcessMemory(os.getpid())
    yield opened
    opened.close()


def test_reads_what_is_there(memory):
    buffer = ctypes.create_string_buffer(b"bpfprof reads this")
    assert memory.read(ctypes.addressof(buffer), 18) == b"bpfprof reads this"


@pytest.mark.parametrize("size", [1 << 40, -1], ids=["a terabyte", "negative"])
def test_a_size_the_process_claims_is_not_believed(memory, size):
    """Sizes come from the memory read: none makes the reader allocate more than MAX_READ."""
    buffer = ctypes.create_string_buffer(16)
    with pytest.raises(UnreadableMemory, match="will not read"):
        memory.read(ctypes.addressof(buffer), size)


def test_an_unmapped_address(memory):
    with pytest.raises(UnreadableMemory, match="cannot read"):
        memory.read(8, 8)
