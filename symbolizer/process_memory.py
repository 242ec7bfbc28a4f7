"""Reading another process's memory through /proc/PID/mem, without stopping it."""

from __future__ import annotations

import ctypes
import os
import struct

from bpfprof.symbolizer.errors import SymbolizerError

# pread(2) called with the GIL held (a PyDLL function): a read of /proc/PID/mem takes
# microseconds, while giving the GIL up for it (as os.pread does) makes every read wait
# for the thread holding it to let go, a switch interval each, whenever a drain is busy
# on another thread. Names of a short thread's threading.Thread take hundreds of reads.
_pread = ctypes.PyDLL(None, use_errno=True).pread
_pread.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int64]
_pread.restype = ctypes.c_ssize_t
_MAX_ADDRESS = (1 << 63) - 1
# The most one read takes. Sizes come from the process read (a str's length, a dict's
# entries): one that claims more is not believed, and nothing of its size is allocated.
MAX_READ = 16 << 20


class UnreadableMemory(SymbolizerError):
    """The address is not readable (unmapped, or the process is gone)."""


class ProcessMemory:
    def __init__(self, pid: int, proc: str = "/proc") -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"{proc}/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise UnreadableMemory(f"cannot open the memory of {pid}: {e.strerror or e}") from None

    def read(self, address: int, size: int) -> bytes:
        if size == 0 and address > 0:
            return b""
        if not 0 < size <= MAX_READ:
            raise UnreadableMemory(f"will not read {size} bytes at {address:#x} in {self.pid}")
        buffer = ctypes.create_string_buffer(size)
        if not 0 < address <= _MAX_ADDRESS - size or _pread(self._fd, buffer, size, address) != size:
            raise UnreadableMemory(f"cannot read {size} bytes at {address:#x} in {self.pid}")
        return buffer.raw

    def pointer(self, address: int) -> int:
        return struct.unpack("<Q", self.read(address, 8))[0]

    def s64(self, address: int) -> int:
        return struct.unpack("<q", self.read(address, 8))[0]

    def s32(self, address: int) -> int:
        return struct.unpack("<i", self.read(address, 4))[0]

    def u32(self, address: int) -> int:
        return struct.unpack("<I", self.read(address, 4))[0]

    def close(self) -> None:
        fd, self._fd = self._fd, -1  # never a closed fd (whose number may be reused) to read from
        if fd >= 0:
            os.close(fd)
