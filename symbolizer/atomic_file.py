"""Output files that appear whole or not at all, even when the writer is interrupted."""

from __future__ import annotations

import os
import tempfile


TEMPORARY_PREFIX = ".bpfprof-"  # what an interrupted write may leave behind


def write_atomically(path: str, data: bytes, mode: int = 0o644) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)  # the file made here, whatever its name points at by now
            os.fsync(f.fileno())  # the new name never points at data still in flight
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
