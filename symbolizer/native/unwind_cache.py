"""Unwind tables kept on disk per build ID, so that a binary is parsed once per machine.

A cache file, `<build-id>.bin`, holds a header (struct _HEADER: magic, format version,
record size, row count, unreadable FDEs, CRC-32 of what follows), the build ID's bytes
and the rows as `struct unwind_row` records (see unwind_table). A file that is short,
of another version or whose CRC does not match is ignored and written again; a binary
without a build ID is never cached, since nothing would tell its versions apart.
"""

from __future__ import annotations

import os
import struct
import zlib
from array import array
from typing import Optional

from elftools.common.exceptions import ELFError

from bpfprof.symbolizer.atomic_file import write_atomically
from bpfprof.symbolizer.native.elf import load_segments, open_elf, read_build_id
from bpfprof.symbolizer.errors import SymbolizerError
from bpfprof.symbolizer.native.unwind_table import RECORD_SIZE, UnwindTable, build_unwind_table

FORMAT_VERSION = 2  # raise it whenever the record layout or the rules' meaning change
_MAGIC = b"BPFUNWND"
_HEADER = struct.Struct("<8sHHIII")  # magic, version, record size, rows, unreadable FDEs, CRC-32


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/bpfprof/unwind when set; else /var/cache/bpfprof/unwind for root
    (the profiler runs as root) and ~/.cache/bpfprof/unwind for anyone else."""
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.environ["XDG_CACHE_HOME"], "bpfprof", "unwind")
    if os.geteuid() == 0:
        return "/var/cache/bpfprof/unwind"
    return os.path.join(os.path.expanduser("~"), ".cache", "bpfprof", "unwind")


def cache_path(cache_dir: str, build_id: str) -> str:
    return os.path.join(cache_dir, f"{build_id}.bin")


def open_unwind_table(path: str, cache_dir: Optional[str] = None) -> UnwindTable:
    """The unwind table of the binary at path: from the cache when it holds this build
    ID, else built and written there. A cache that cannot be written leaves the table
    usable, with the reason in its cache_error."""
    cache_dir = cache_dir or default_cache_dir()
    stream, elf = open_elf(path)
    try:
        build_id = read_build_id(elf)
        segments = load_segments(elf)
    except (ELFError, struct.error, ValueError) as e:
        raise SymbolizerError(f"not a readable ELF file: {e}") from None
    finally:
        stream.close()
    if build_id:
        cached = _read(cache_path(cache_dir, build_id), build_id)
        if cached is not None:
            cached.segments = tuple(segments)
            return cached
    table = build_unwind_table(path)
    if table.build_id:  # the file's own, should it have been replaced meanwhile
        try:
            os.makedirs(cache_dir, mode=0o755, exist_ok=True)
            write_atomically(cache_path(cache_dir, table.build_id), _serialize(table))
        except OSError as e:
            table.cache_error = f"{cache_dir}: {e.strerror or e}"
    return table


def _serialize(table: UnwindTable) -> bytes:
    body = bytes.fromhex(table.build_id) + table.records()
    header = _HEADER.pack(_MAGIC, FORMAT_VERSION, RECORD_SIZE, table.num_rows(), table.unreadable_fdes,
                          zlib.crc32(body))
    return header + body


def _read(path: str, build_id: str) -> Optional[UnwindTable]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < _HEADER.size:
        return None
    magic, version, record_size, count, unreadable, crc = _HEADER.unpack_from(data)
    id_bytes = bytes.fromhex(build_id)
    rows_at = _HEADER.size + len(id_bytes)
    if (magic != _MAGIC or version != FORMAT_VERSION or record_size != RECORD_SIZE
            or len(data) != rows_at + count * RECORD_SIZE or data[_HEADER.size:rows_at] != id_bytes
            or zlib.crc32(memoryview(data)[_HEADER.size:]) != crc):
        return None
    rows = array("Q")
    rows.frombytes(memoryview(data)[rows_at:])
    table = UnwindTable(build_id, rows, unreadable)
    table.from_cache = True
    return table
