"""The unwind-table builder's thread: every binary submitted is told as built, whatever
happens while it is opened or read, so that no process waits on it for good."""

import errno
import os
import queue

from bpfprof.collector.processes.native_unwinding import _TableBuilder
from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.native.symbolizer import ObjectFile


def object_file(path, inode):
    return ObjectFile((0, 0, inode), str(path), str(path), "/")


def test_every_binary_is_told_as_built(build_c, tmp_path):
    garbage = tmp_path / "garbage.so"
    garbage.write_bytes(b"\x7fELF" + b"\xff" * 60)
    chain = build_c("chain")

    def open_binary(obj):
        if obj.path.endswith("full"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        if obj.path.endswith("gone"):
            return None
        return os.open(obj.path, os.O_RDONLY)

    built = queue.Queue()
    failures = Failures()
    builder = _TableBuilder(str(tmp_path / "cache"), open_binary, lambda *told: built.put(told), failures)
    for inode, path in enumerate((tmp_path / "full", garbage, tmp_path / "gone", chain)):
        builder.submit(object_file(path, inode))
    told = [built.get(timeout=30) for _ in range(4)]
    builder.stop()
    assert [(file_id[2], table is None, opened) for file_id, table, opened in told] == [
        (0, True, True), (1, True, True), (2, True, False), (3, False, True)]
    assert failures.counts() == {("binary", "unreadable"): 1, ("binary", "unusable"): 1}
