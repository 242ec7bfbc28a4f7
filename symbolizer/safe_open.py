"""Files of another process, opened as that process names them and never as an attacker
would like: resolved inside its root, never blocking, regular files only, sizes capped.

A path is resolved by `openat2(2)` with RESOLVE_IN_ROOT (an absolute symlink or `..`
stays inside the root, magic links such as /proc/PID/root are refused), or, on a kernel
without it, by an equivalent walk one component at a time. Either gives an O_PATH
descriptor, which opens nothing: a FIFO, a device (opening /dev/watchdog arms it) or a
final symlink is refused from its fstat, and only a regular file is opened for reading,
through /proc/self/fd/N, which reopens that same inode. Callers read from the
descriptor they get; nothing checks a path and then opens it again.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import List, Optional

from bpfprof.symbolizer.errors import NotRegularFile, TooLarge

_SYS_OPENAT2 = 437  # x86-64 and every architecture with the generic syscall table
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
MAX_SYMLINKS = 40  # followed in one path, as the kernel's own limit
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC

# Whether to resolve with openat2: cleared on a kernel without it (ENOSYS), and by tests
# that try the walk.
use_openat2 = True


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def open_in_root(root: str, path: str, max_size: int, follow_last: bool = False) -> int:
    """A read-only descriptor of the regular file that `path` names for a process whose
    filesystem root is `root` (/proc/PID/root; "/" for ours). Raises OSError when it
    cannot be resolved (ELOOP past MAX_SYMLINKS), NotRegularFile for anything but a
    regular file (a final symlink included, unless follow_last: then it is resolved
    inside the root like the others) and TooLarge past max_size bytes."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        path_fd = _openat2_in_root(root_fd, path, follow_last) if use_openat2 else None
        if path_fd is None:
            path_fd = _walk_in_root(root_fd, path, follow_last)
    finally:
        os.close(root_fd)
    return _open_regular(path_fd, path, max_size)


def open_regular(path: str, max_size: int) -> int:
    """A read-only descriptor of the regular file at a path the kernel gives (a magic link
    such as /proc/PID/map_files/...), refused as open_in_root refuses one."""
    return _open_regular(os.open(path, os.O_PATH | os.O_CLOEXEC), path, max_size)


def _open_regular(path_fd: int, name: str, max_size: int) -> int:
    """The regular file behind an O_PATH descriptor, which is closed, opened for reading."""
    try:
        if not stat.S_ISREG(os.fstat(path_fd).st_mode):
            raise NotRegularFile(f"{name} is not a regular file")
        fd = os.open(f"/proc/self/fd/{path_fd}", _READ_FLAGS)
    finally:
        os.close(path_fd)
    try:
        size = os.fstat(fd).st_size
        if size > max_size:
            raise TooLarge(f"{name} has {size} bytes, over {max_size}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _openat2_in_root(root_fd: int, path: str, follow_last: bool) -> Optional[int]:
    """An O_PATH descriptor of path resolved in the root; None without openat2."""
    global use_openat2
    flags = _PATH_FLAGS & ~os.O_NOFOLLOW if follow_last else _PATH_FLAGS
    how = _OpenHow(flags, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(root_fd), ctypes.c_char_p(os.fsencode(path)),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd >= 0:
        return fd
    error = ctypes.get_errno()
    if error == errno.ENOSYS:
        use_openat2 = False
        return None
    raise OSError(error, os.strerror(error), path)


def _walk_in_root(root_fd: int, path: str, follow_last: bool) -> int:
    """What openat2 with RESOLVE_IN_ROOT does, one component at a time: each opened
    without following it, a symlink read from its own descriptor and resolved from the
    root (absolute) or its directory, `..` never above the root."""
    parts = _components(path)
    directories = [os.dup(root_fd)]  # from the root down to where the walk is
    links = 0
    try:
        while parts:
            name = parts.pop()
            if name == "..":
                if len(directories) > 1:
                    os.close(directories.pop())
                continue
            fd = os.open(name, _PATH_FLAGS, dir_fd=directories[-1])
            mode = os.fstat(fd).st_mode
            if not parts and not (follow_last and stat.S_ISLNK(mode)):
                return fd  # the last component: its fstat decides
            if stat.S_ISDIR(mode):
                directories.append(fd)
                continue
            if not stat.S_ISLNK(mode):
                os.close(fd)
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            try:
                target = os.readlink("", dir_fd=fd)
            finally:
                os.close(fd)
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            if target.startswith("/"):
                while len(directories) > 1:
                    os.close(directories.pop())
            parts += _components(target)
        return os.dup(directories[-1])  # the path named a directory (or the root)
    finally:
        for fd in directories:
            os.close(fd)


def _components(path: str) -> List[str]:
    """The path's names, last first (the walk pops them), without empty ones and `.`."""
    return [name for name in reversed(path.split("/")) if name not in ("", ".")]
