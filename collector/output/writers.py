"""Profile writers chosen by the output file's extension."""

from __future__ import annotations

import os
from typing import Callable, Dict, Tuple

from bpfprof.collector.errors import UsageError
from bpfprof.collector.output.flamegraph import write_flamegraph
from bpfprof.collector.output.folded import write_folded
from bpfprof.collector.output.pprof import write_pprof
from bpfprof.collector.profile import Profile
from bpfprof.collector.output.speedscope import write_speedscope

WRITERS: Dict[str, Callable[[Profile, str], None]] = {
    ".pb.gz": write_pprof,
    ".folded": write_folded,
    ".speedscope.json": write_speedscope,
    ".html": write_flamegraph,
}


def split_extension(path: str) -> Tuple[str, str]:
    """A path as (base, extension), the extension a writer's (out.pb.gz -> out, .pb.gz)
    or "" if it has none of theirs."""
    for extension in WRITERS:
        if path.endswith(extension):
            return path[:-len(extension)], extension
    return path, ""


def path_for_type(path: str, profile_type: str) -> str:
    """Where one of several profile types goes: out.pb.gz -> out.block.pb.gz."""
    base, extension = split_extension(path)
    return f"{base}.{profile_type}{extension}"


def get_writer(path: str) -> Callable[[Profile, str], None]:
    """The writer for path's extension; UsageError for an unknown one or an unwritable place."""
    for extension, writer in WRITERS.items():
        if path.endswith(extension):
            break
    else:
        known = ", ".join(WRITERS)
        raise UsageError(f"unknown output format for {path}: use one of {known}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UsageError(f"cannot write {path}: {directory} is not a writable directory")
    return writer
