"""C++ (Itanium ABI) names demangled with the C++ runtime's own __cxa_demangle."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional


@functools.lru_cache(maxsize=1)
def _runtime() -> Optional[tuple]:
    try:
        cxx = ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    cxa_demangle = cxx.__cxa_demangle
    cxa_demangle.restype = ctypes.c_void_p
    cxa_demangle.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    free = libc.free
    free.argtypes = [ctypes.c_void_p]
    return cxa_demangle, free


def demangle(name: str) -> str:
    """The readable form of a mangled C++ name; any other name, or one the runtime
    cannot demangle, comes back unchanged."""
    if not name.startswith("_Z"):
        return name
    runtime = _runtime()
    if runtime is None:
        return name
    cxa_demangle, free = runtime
    status = ctypes.c_int(0)
    result = cxa_demangle(name.encode(), None, None, ctypes.byref(status))
    if not result or status.value != 0:
        return name
    try:
        return ctypes.string_at(result).decode(errors="replace")
    finally:
        free(result)
