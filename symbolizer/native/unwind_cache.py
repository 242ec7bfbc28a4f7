"""Unwind tables kept on disk by content identity, so that a binary is parsed once per machine.

A cache file, `v<format version>-<hash of the sections read>.bin` (see content_identity),
holds a header (struct _HEADER: magic, format version, record size, row count,
unreadable FDEs, CRC-32 of what follows), the hash, the build ID and the rows as
`struct unwind_row` records (see unwind_table). A file that is short, of another version,
for another identity or whose CRC does not match is ignored and written again: a binary
that claims another's build ID never gets its rows.

The directory is bounded: writing a table removes files of other format versions and
then, while the tables there hold more than max_bytes, the least recently used (each read
sets its modification time, which noatime mounts leave alone). Only files named as this
module names them are removed, and none is followed through a symbolic link.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import time
import zlib
from array import array
from typing import Optional

from elftools.common.exceptions import ELFError

from bpfprof.symbolizer.atomic_file import TEMPORARY_PREFIX, write_atomically
from bpfprof.symbolizer.errors import SymbolizerError
from bpfprof.symbolizer.native.content_identity import ContentIdentity, content_identity
from bpfprof.symbolizer.native.elf import load_segments, open_elf, read_build_id
from bpfprof.symbolizer.native.unwind_table import RECORD_SIZE, UNWIND_SECTIONS, UnwindTable, build_unwind_table

FORMAT_VERSION = 4  # raise it whenever the record layout, the rules' meaning or the identity change
DEFAULT_MAX_BYTES = 256 << 20  # of tables in the cache directory
_MAGIC = b"BPFUNWND"
_HEADER = struct.Struct("<8sHHIII")  # magic, version, record size, rows, unreadable FDEs, CRC-32
_DIGEST_SIZE = 32
# Our files: this version's and earlier ones' (named by build ID alone), and writes left unfinished.
_OURS = re.compile(r"v(\d+)-[0-9a-f]{64}\.bin|[0-9a-f]{2,128}\.bin|" + re.escape(TEMPORARY_PREFIX) + r"\w+")
_UNFINISHED_S = 3600.0  # a temporary file this old is a write that was interrupted


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/bpfprof/unwind when set; else /var/cache/bpfprof/unwind for root
    (the profiler runs as root) and ~/.cache/bpfprof/unwind for anyone else."""
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.environ["XDG_CACHE_HOME"], "bpfprof", "unwind")
    if os.geteuid() == 0:
        return "/var/cache/bpfprof/unwind"
    return os.path.join(os.path.expanduser("~"), ".cache", "bpfprof", "unwind")


def cache_path(cache_dir: str, identity: ContentIdentity) -> str:
    return os.path.join(cache_dir, f"v{FORMAT_VERSION}-{identity.digest}.bin")


def open_unwind_table(path: str, cache_dir: Optional[str] = None, max_bytes: int = DEFAULT_MAX_BYTES
                      ) -> UnwindTable:
    """The unwind table of the binary at path: from the cache when it holds this binary's
    identity, else built and written there. A cache that cannot be written leaves the
    table usable, with the reason in its cache_error."""
    cache_dir = cache_dir or default_cache_dir()
    stream, elf = open_elf(path)
    try:
        identity = content_identity(elf, stream.fileno(), read_build_id(elf), UNWIND_SECTIONS)
        segments = load_segments(elf)
    except (ELFError, struct.error, ValueError) as e:
        raise SymbolizerError(f"not a readable ELF file: {e}") from None
    finally:
        stream.close()
    cached = _read(cache_path(cache_dir, identity), identity, max_bytes)
    if cached is not None:
        cached.segments = tuple(segments)
        return cached
    table = build_unwind_table(path)  # with the identity of what it read, should the file have changed
    data = _serialize(table)
    if len(data) <= max_bytes:
        try:
            os.makedirs(cache_dir, mode=0o755, exist_ok=True)
            write_atomically(cache_path(cache_dir, table.identity), data)
            _evict(cache_dir, max_bytes)
        except OSError as e:
            table.cache_error = f"{cache_dir}: {e.strerror or e}"
    return table


def _serialize(table: UnwindTable) -> bytes:
    build_id = bytes.fromhex(table.build_id)
    body = bytes.fromhex(table.identity.digest) + bytes([len(build_id)]) + build_id + table.records()
    header = _HEADER.pack(_MAGIC, FORMAT_VERSION, RECORD_SIZE, table.num_rows(), table.unreadable_fdes,
                          zlib.crc32(body))
    return header + body


def _read(path: str, identity: ContentIdentity, max_bytes: int) -> Optional[UnwindTable]:
    """The table in the cache file at path if it is whole and of this identity; its use
    marked on the file for eviction."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            return None
        data = os.pread(fd, st.st_size, 0)
        os.utime(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    expected = bytes.fromhex(identity.digest) + bytes([len(identity.build_id) // 2]) + bytes.fromhex(identity.build_id)
    rows_at = _HEADER.size + len(expected)
    if len(data) < rows_at:
        return None
    magic, version, record_size, count, unreadable, crc = _HEADER.unpack_from(data)
    if (magic != _MAGIC or version != FORMAT_VERSION or record_size != RECORD_SIZE
            or len(data) != rows_at + count * RECORD_SIZE or data[_HEADER.size:rows_at] != expected
            or zlib.crc32(memoryview(data)[_HEADER.size:]) != crc):
        return None
    rows = array("Q")
    rows.frombytes(memoryview(data)[rows_at:])
    table = UnwindTable(identity, rows, unreadable)
    table.from_cache = True
    return table


def _evict(cache_dir: str, max_bytes: int) -> None:
    """Removes our files of other versions and unfinished writes, then the least recently
    used tables until those left hold at most max_bytes."""
    now = time.time()
    current = []
    for entry in os.scandir(cache_dir):
        match = _OURS.fullmatch(entry.name)
        if match is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # another bpfprof removed it meanwhile
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if match.group(1) == str(FORMAT_VERSION):
            current.append((st.st_mtime, entry.path, st.st_size))
        elif not entry.name.startswith(TEMPORARY_PREFIX) or now - st.st_mtime > _UNFINISHED_S:
            _remove(entry.path)
    total = sum(size for _, _, size in current)
    for _, path, size in sorted(current):
        if total <= max_bytes:
            break
        _remove(path)
        total -= size


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:  # another bpfprof evicted it first
        pass
