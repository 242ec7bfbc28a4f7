"""Reading another process's memory through /proc/PID/mem, without stopping it."""

from __future__ import annotations

import os
import struct


class UnreadableMemory(Exception):
    """The address is not readable (unmapped, or the process is gone)."""


class ProcessMemory:
    def __init__(self, pid: int, proc: str = "/proc") -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"{proc}/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise UnreadableMemory(f"cannot open the memory of {pid}: {e.strerror or e}") from None

    def read(self, address: int, size: int) -> bytes:
        try:
            data = os.pread(self._fd, size, address) if address > 0 else b""
        except (OSError, OverflowError):
            data = b""
        if len(data) != size:
            raise UnreadableMemory(f"cannot read {size} bytes at {address:#x} in {self.pid}")
        return data

    def pointer(self, address: int) -> int:
        return struct.unpack("<Q", self.read(address, 8))[0]

    def s64(self, address: int) -> int:
        return struct.unpack("<q", self.read(address, 8))[0]

    def s32(self, address: int) -> int:
        return struct.unpack("<i", self.read(address, 4))[0]

    def u32(self, address: int) -> int:
        return struct.unpack("<I", self.read(address, 4))[0]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
