"""The profile model to and from pprof's gzipped protobuf, as the design's output contract says."""

from __future__ import annotations

import gzip
import zlib
from typing import Dict, Tuple

from google.protobuf.message import DecodeError

from bpfprof.collector.atomic_file import write_atomically
from bpfprof.collector.errors import UsageError
from bpfprof.collector.pprof_schema import PprofProfile
from bpfprof.collector.profile import Frame, FrameKind, Labels, Module, Profile


class _Builder:
    """Fills a pprof message, each string, function, mapping and location stored once."""

    def __init__(self) -> None:
        self.message = PprofProfile()
        self._strings: Dict[str, int] = {}
        self._functions: Dict[Tuple[str, str, int], int] = {}
        self._mappings: Dict[Module, object] = {}
        self._locations: Dict[tuple, int] = {}
        self.string("")

    def string(self, s: str) -> int:
        index = self._strings.get(s)
        if index is None:
            index = self._strings[s] = len(self.message.string_table)
            self.message.string_table.append(s)
        return index

    def function(self, frame: Frame) -> int:
        key = (frame.name, frame.file, frame.start_line)
        function_id = self._functions.get(key)
        if function_id is None:
            function_id = self._functions[key] = len(self.message.function) + 1
            name = self.string(frame.name)
            self.message.function.add(
                id=function_id, name=name, system_name=name, filename=self.string(frame.file),
                start_line=frame.start_line,
            )
        return function_id

    def mapping(self, frame: Frame):
        mapping = self._mappings.get(frame.module)
        if mapping is None:
            mapping = self._mappings[frame.module] = self.message.mapping.add(
                id=len(self.message.mapping) + 1,
                memory_start=frame.address,
                memory_limit=frame.address + 1,
                filename=self.string(frame.module.path),
                build_id=self.string(frame.module.build_id),
                has_functions=True,
            )
        # Addresses are file offsets (kernel: kernel addresses); the mapping spans
        # them all and maps each to itself.
        mapping.memory_start = min(mapping.memory_start, frame.address)
        mapping.memory_limit = max(mapping.memory_limit, frame.address + 1)
        mapping.file_offset = mapping.memory_start
        if frame.line:
            mapping.has_filenames = mapping.has_line_numbers = True
        return mapping

    def location(self, frame: Frame) -> int:
        # Code with a binary is one location per (binary, address); Python code per (function, line).
        native = frame.module is not None and frame.kind != FrameKind.PYTHON
        key = (frame.module, frame.address, frame.name) if native else (frame.name, frame.file, frame.start_line, frame.line)
        location_id = self._locations.get(key)
        if location_id is None:
            location_id = self._locations[key] = len(self.message.location) + 1
            location = self.message.location.add(id=location_id)
            if native:
                location.mapping_id = self.mapping(frame).id
                location.address = frame.address
            location.line.add(function_id=self.function(frame), line=frame.line)
        return location_id

    def labels(self, sample, labels: Labels) -> None:
        sample.label.add(key=self.string("pid"), num=labels.pid)
        sample.label.add(key=self.string("tid"), num=labels.tid)
        sample.label.add(key=self.string("comm"), str=self.string(labels.comm))
        sample.label.add(key=self.string("thread"), str=self.string(labels.thread))
        for key, value in labels.extra:
            sample.label.add(key=self.string(key), str=self.string(value))


def to_pprof(profile: Profile):
    builder = _Builder()
    message = builder.message
    for value_type in profile.sample_types:
        message.sample_type.add(type=builder.string(value_type.type), unit=builder.string(value_type.unit))
    message.period_type.type = builder.string(profile.period_type.type)
    message.period_type.unit = builder.string(profile.period_type.unit)
    message.period = profile.period
    message.time_nanos = profile.start_ns
    message.duration_nanos = profile.duration_ns
    message.default_sample_type = builder.string(profile.sample_types[-1].type)
    for (stack, labels), values in profile.samples.items():
        sample = message.sample.add()
        sample.location_id.extend(builder.location(frame) for frame in stack)
        sample.value.extend(values)
        builder.labels(sample, labels)
    return message


def write_pprof(profile: Profile, path: str) -> None:
    write_atomically(path, gzip.compress(to_pprof(profile).SerializeToString(), compresslevel=6))


def read_pprof(path: str):
    """A pprof message from a file, gzipped or not; UsageError when it is not a profile."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        message = PprofProfile.FromString(data)
    except (OSError, EOFError, zlib.error, DecodeError) as e:
        raise UsageError(f"{path} is not a pprof profile: {e}") from None
    if not message.string_table or message.string_table[0] != "":
        raise UsageError(f"{path} is not a pprof profile: its string table does not start with \"\"")
    return message
