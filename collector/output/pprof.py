"""The profile model to and from pprof's gzipped protobuf, as the design's output contract says."""

from __future__ import annotations

import gzip
import os
import stat
import zlib
from typing import Dict, Tuple

from google.protobuf.message import DecodeError

from bpfprof.symbolizer.atomic_file import write_atomically
from bpfprof.collector.errors import UsageError
from bpfprof.collector.output.pprof_schema import PprofProfile
from bpfprof.collector.profile import Labels, Profile, ValueType
from bpfprof.symbolizer.frames import Frame, FrameKind, Module

# A profile given to `report` may be anything: how large a file, and the message inside it,
# are read at most.
MAX_PPROF_FILE = 256 << 20
MAX_PPROF_MESSAGE = 1 << 30


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


def pprof_bytes(profile: Profile) -> bytes:
    """The profile as a gzipped pprof file holds it."""
    return gzip.compress(to_pprof(profile).SerializeToString(), compresslevel=6)


def write_pprof(profile: Profile, path: str) -> None:
    write_atomically(path, pprof_bytes(profile))


def _read_file(path: str) -> bytes:
    """A regular file of at most MAX_PPROF_FILE bytes, opened without waiting (a FIFO
    given as a profile is refused, not waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise UsageError(f"{path} is not a regular file")
        if status.st_size > MAX_PPROF_FILE:
            raise UsageError(f"{path} is {status.st_size} bytes, more than a profile can be ({MAX_PPROF_FILE})")
        return f.read(status.st_size)  # read(n) allocates n bytes first: the size, not the cap


def _gunzip(data: bytes, path: str) -> bytes:
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    data = inflate.decompress(data, MAX_PPROF_MESSAGE)
    if inflate.unconsumed_tail:
        raise UsageError(f"{path} inflates to more than a profile can be ({MAX_PPROF_MESSAGE} bytes)")
    if not inflate.eof:
        raise UsageError(f"{path} is not a pprof profile: its gzip stream is cut short")
    return data


def read_pprof(path: str):
    """A pprof message from a file, gzipped or not; UsageError when it is not a profile."""
    data = _read_file(path)
    try:
        if data[:2] == b"\x1f\x8b":
            data = _gunzip(data, path)
        message = PprofProfile.FromString(data)
    except (EOFError, zlib.error, DecodeError) as e:
        raise UsageError(f"{path} is not a pprof profile: {e}") from None
    if not message.string_table or message.string_table[0] != "":
        raise UsageError(f"{path} is not a pprof profile: its string table does not start with \"\"")
    return message


def _frame_kind(mapping_name: str, file: str) -> FrameKind:
    """Kernel frames are in perf's "[kernel.kallsyms]" mapping (or vmlinux); Python frames
    have no mapping; everything else is native code."""
    if mapping_name.startswith("[kernel") or mapping_name.endswith("vmlinux"):
        return FrameKind.KERNEL
    if not mapping_name and file.endswith(".py"):
        return FrameKind.PYTHON
    return FrameKind.NATIVE


def _labels(string, sample) -> Labels:
    known = {"pid": 0, "tid": 0, "comm": "", "thread": ""}
    extra = []
    for label in sample.label:
        key = string(label.key)
        value = string(label.str) if label.str else label.num
        if key in known and isinstance(value, type(known[key])):
            known[key] = value
        else:
            extra.append((key, str(value)))
    return Labels(known["pid"], known["tid"], known["comm"], known["thread"], tuple(extra))


def from_pprof(message) -> Profile:
    """The profile model of any pprof message (ours, Go's, another tool's); its main
    value is the default sample type, else the last. Inlined functions of a location
    become frames of their own, innermost first, as pprof lists them."""
    strings = message.string_table

    def string(index: int) -> str:
        return strings[index] if 0 <= index < len(strings) else ""

    def value_type(v) -> ValueType:
        return ValueType(string(v.type), string(v.unit))

    mappings = {m.id: Module(string(m.filename), string(m.build_id)) for m in message.mapping}
    functions = {f.id: f for f in message.function}
    stacks: Dict[int, Tuple[Frame, ...]] = {}
    for location in message.location:
        module = mappings.get(location.mapping_id)
        path = module.path if module else ""
        unnamed = f"[{path.rsplit('/', 1)[-1] or '?'}+{location.address:#x}]"  # as our own unknown frames
        frames = []
        for line in location.line:
            function = functions.get(line.function_id)
            name = string(function.name) if function else ""
            file = string(function.filename) if function else ""
            frames.append(Frame(_frame_kind(path, file), name or unnamed, module, location.address, file, line.line,
                                function.start_line if function else 0))
        if not frames:  # an unsymbolized address
            frames.append(Frame(_frame_kind(path, ""), unnamed, module, location.address))
        stacks[location.id] = tuple(frames)
    sample_types = tuple(value_type(v) for v in message.sample_type)
    names = [t.type for t in sample_types]
    default = string(message.default_sample_type)
    profile = Profile(
        sample_types=sample_types,
        period_type=value_type(message.period_type),
        period=message.period,
        start_ns=message.time_nanos,
        duration_ns=message.duration_nanos,
        main_value=names.index(default) if default in names else max(len(names) - 1, 0),
    )
    for sample in message.sample:
        if len(sample.value) != len(sample_types):
            raise UsageError(f"a sample has {len(sample.value)} values for {len(sample_types)} sample types")
        stack = tuple(frame for location_id in sample.location_id for frame in stacks.get(location_id, ()))
        profile.add(stack, _labels(string, sample), list(sample.value))
    return profile


def load_profile(path: str) -> Profile:
    """The profile model of a pprof file; UsageError naming the file when it is not one."""
    try:
        return from_pprof(read_pprof(path))
    except UsageError as e:
        if path in str(e):
            raise
        raise UsageError(f"{path} is not a valid pprof profile: {e}") from None
