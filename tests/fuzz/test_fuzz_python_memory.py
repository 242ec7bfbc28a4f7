"""Fuzz: memory images of a CPython process, one per minor version 3.8-3.14, built here
from the layouts (3.13+ from a _Py_DebugOffsets at the start of _PyRuntime) and holding
an interpreter, two thread states with their frames, code objects with str names and
line tables, and sys.modules -> threading._active -> Thread objects with names. Each case
mutates one object of an image; the readers then go through it as the collector does:
the layout (debug offsets or Py_Version), the thread list, each thread's frames, each
frame's code object and line, and the threads' names. A result or a SymbolizerError
(UnreadableMemory), nothing else."""

from __future__ import annotations

import dataclasses
import struct
from typing import Dict, List, Tuple

from fuzzing import Case, assert_no_failures, case_rng, mutate, run_family
from bpfprof.symbolizer.errors import SymbolizerError
from bpfprof.symbolizer.interpreters.python.code_objects import PythonSymbolizer
from bpfprof.symbolizer.interpreters.python.layouts import (
    _ABI_VALUES,
    _DEBUG_OFFSETS_LAYOUTS,
    _DEBUG_OFFSETS_OBJECTS,
    _FROM_DEBUG_OFFSETS,
    ABSENT,
    DEBUG_OFFSETS_COOKIE,
    DEBUG_OFFSETS_SIZE,
    DICT_POINTER,
    LAYOUTS,
    PythonLayout,
    parse_debug_offsets,
)
from bpfprof.symbolizer.interpreters.python.lines import line_table
from bpfprof.symbolizer.interpreters.python.thread_names import MANAGED_DICT_FLAG, thread_names
from bpfprof.symbolizer.interpreters.python.threads import layout_of, thread_states, walk_frames
from bpfprof.symbolizer.process_memory import ProcessMemory, UnreadableMemory

CASES = 2100
BASE = 0x7F3A_0000_0000
RUNTIME_HEAD_3_13 = DEBUG_OFFSETS_SIZE + 8   # where the images of 3.13+ keep interpreters.head
LINE_TABLES = {  # a few lines each, in each version's format (lines.py)
    (3, 8): bytes([2, 1, 4, 1, 6, 2]),
    (3, 10): bytes([2, 0, 4, 1, 6, 1, 4, 0x80]),
    (3, 11): bytes([0x80 | 13 << 3, 2, 0x80 | 10 << 3 | 1, 1, 5, 0x80 | 15 << 3, 0x80 | 14 << 3 | 1, 4, 0, 1, 3]),
}


class ImageMemory(ProcessMemory):
    """A process whose readable memory is one image at BASE."""

    def __init__(self, data: bytes) -> None:
        self.pid, self._fd, self.data = 0, -1, data

    def read(self, address: int, size: int) -> bytes:
        start = address - BASE
        if not 0 <= start <= start + size <= len(self.data) or size < 0:
            raise UnreadableMemory(f"{size} bytes at {address:#x}")
        return self.data[start:start + size]


@dataclasses.dataclass
class Image:
    """A memory image under construction: objects placed one after another, each kept
    by kind for the mutations to aim at."""
    layout: PythonLayout
    data: bytearray = dataclasses.field(default_factory=bytearray)
    objects: List[Tuple[str, int, int]] = dataclasses.field(default_factory=list)

    def alloc(self, kind: str, size: int, before: int = 0) -> int:
        start = len(self.data)
        self.data += bytes(before + size + (-(before + size) % 16))
        self.objects.append((kind, start, start + before + size))
        return BASE + start + before

    def put(self, address: int, offset: int, form: str, value: int) -> None:
        if offset != ABSENT:
            struct.pack_into("<" + form, self.data, address + offset - BASE, value)

    def write(self, address: int, raw: bytes) -> None:
        self.data[address - BASE:address - BASE + len(raw)] = raw

    def str(self, text: str) -> int:
        ly = self.layout
        address = self.alloc("str", ly.unicode_ascii_data + len(text) + 1)
        self.put(address, ly.unicode_state, "I", 1 << 2 | 1 << 5 | 1 << 6)   # 1-byte kind, compact, ASCII
        self.put(address, ly.unicode_length, "q", len(text))
        self.write(address + ly.unicode_ascii_data, text.encode())
        return address

    def code(self, qualname: str, firstlineno: int) -> int:
        ly = self.layout
        table = LINE_TABLES[max(v for v in LINE_TABLES if v <= ly.version)]
        linetable = self.alloc("line table", ly.bytes_data + len(table))
        self.put(linetable, ly.bytes_size, "q", len(table))
        self.write(linetable + ly.bytes_data, table)
        address = self.alloc("code object", max(ly.code_adaptive, ly.code_linetable) + 64)
        self.put(address, ly.code_firstlineno, "i", firstlineno)
        self.put(address, ly.code_name, "Q", self.str(qualname.rsplit(".", 1)[-1]))
        self.put(address, ly.code_qualname, "Q", self.str(qualname))
        self.put(address, ly.code_filename, "Q", self.str("/srv/app.py"))
        self.put(address, ly.code_linetable, "Q", linetable)
        return address

    def frames(self, codes: List[int]) -> int:
        """A frame chain running these code objects, leaf first: what tstate_frame points at."""
        ly, previous = self.layout, 0
        for depth, code in reversed(list(enumerate(codes))):
            frame = self.alloc("frame", 128)
            self.put(frame, ly.frame_previous, "Q", previous)
            self.put(frame, ly.frame_code, "Q", code)
            if ly.version <= (3, 10):
                self.put(frame, ly.frame_instr, "i", 2 + depth)
            else:
                self.put(frame, ly.frame_instr, "Q", code + ly.code_adaptive + 2 * depth)
            self.put(frame, ly.frame_is_entry, "B", depth == len(codes) - 1)
            previous = frame
        if ly.cframe_current_frame == ABSENT:
            return previous
        cframe = self.alloc("cframe", 16)
        self.put(cframe, ly.cframe_current_frame, "Q", previous)
        return cframe

    def int(self, value: int) -> int:
        o = self.layout.objects
        digits = [(value >> shift) & ((1 << 30) - 1) for shift in (0, 30, 60)]
        address = self.alloc("int", o.long_digits + 12)
        self.put(address, o.long_size, "q", 3 << 3 if o.long_tagged else 3)
        struct.pack_into("<3I", self.data, address + o.long_digits - BASE, *digits)
        return address

    def dict(self, items: List[Tuple[int, int]], dict_type: int) -> int:
        o = self.layout.objects
        keys = self.alloc("dict keys", o.keys_indices + 8 + 24 * len(items))
        if o.keys_kind == ABSENT:
            self.put(keys, o.keys_size, "q", 8)
        else:
            self.put(keys, o.keys_size, "B", 3)
            self.put(keys, o.keys_log2_index_bytes, "B", 3)
        self.put(keys, o.keys_nentries, "q", len(items))
        for index, (key, value) in enumerate(items):
            struct.pack_into("<qQQ", self.data, keys + o.keys_indices + 8 + 24 * index - BASE, index, key, value)
        address = self.alloc("dict", 48)
        self.put(address, o.object_type, "Q", dict_type)
        self.put(address, o.dict_keys, "Q", keys)
        return address

    def thread(self, name: str, dict_type: int) -> int:
        """A threading.Thread whose __dict__ holds its _name."""
        o = self.layout.objects
        attributes = self.dict([(self.str("_name"), self.str(name))], dict_type)
        thread_type = self.alloc("type", 1024)
        address = self.alloc("thread", 32, before=32)
        self.put(address, o.object_type, "Q", thread_type)
        if o.instance_dict == DICT_POINTER:
            self.put(thread_type, o.type_dictoffset, "q", 16)
            self.put(address, 16, "Q", attributes)
        else:
            self.put(thread_type, o.type_flags, "Q", MANAGED_DICT_FLAG)
            self.put(address, o.managed_dict, "Q", attributes)
        return address


def debug_offsets_layout(version: Tuple[int, int]) -> Tuple[bytes, PythonLayout]:
    """_Py_DebugOffsets of a 3.13+ whose structures are laid out as 3.12's, and what
    parse_debug_offsets makes of them."""
    base = dataclasses.asdict(LAYOUTS[(3, 12)]) | dataclasses.asdict(LAYOUTS[(3, 12)].objects)
    base["runtime_interpreters_head"] = RUNTIME_HEAD_3_13
    base["tstate_frame"] = 56
    values = {member: base[field] for field, member in {**_FROM_DEBUG_OFFSETS, **_DEBUG_OFFSETS_OBJECTS}.items()}
    values.update(_ABI_VALUES)
    words = [values.get(f"{group}.{member}", 8192 if member == "size" else 0)
             for group, members in _DEBUG_OFFSETS_LAYOUTS[version] for member in members]
    version_hex = version[0] << 24 | version[1] << 16 | 0xF0
    data = DEBUG_OFFSETS_COOKIE + struct.pack(f"<QQ{len(words)}Q", version_hex, 0, *words)
    return data, parse_debug_offsets(data.ljust(DEBUG_OFFSETS_SIZE, b"\0"))


def build_image(version: Tuple[int, int]) -> Tuple[Image, int, int]:
    """An image of a CPython of this version: (image, _PyRuntime, Py_Version or 0)."""
    debug_offsets = b""
    if version >= (3, 13):
        debug_offsets, layout = debug_offsets_layout(version)
    else:
        layout = LAYOUTS[version]
    image = Image(layout)
    runtime = image.alloc("runtime", max(layout.runtime_interpreters_head + 8, len(debug_offsets)))
    image.write(runtime, debug_offsets)
    if debug_offsets:
        image.objects[-1] = ("debug offsets", runtime - BASE, runtime - BASE + len(debug_offsets))
    py_version = 0
    if version < (3, 13):
        py_version = image.alloc("Py_Version", 4)
        image.put(py_version, 0, "I", version[0] << 24 | version[1] << 16 | 0xF0)
    interp = image.alloc("interpreter", max(layout.interp_modules, layout.interp_threads_head) + 16)
    image.put(runtime, layout.runtime_interpreters_head, "Q", interp)
    idents = (0x7F3A_1000_0700, 0x7F3A_2000_0700)
    tstate_next = 0
    for number, ident in enumerate(idents):
        codes = [image.code(f"Worker{number}.run", 10), image.code("helper", 30), image.code("<module>", 1)]
        tstate = image.alloc("thread state", 256)
        image.put(tstate, layout.tstate_next, "Q", tstate_next)
        image.put(tstate, layout.tstate_interp, "Q", interp)
        image.put(tstate, layout.tstate_thread_id, "Q", ident)
        image.put(tstate, layout.tstate_native_thread_id, "I", 4000 + number)
        image.put(tstate, layout.tstate_frame, "Q", image.frames(codes))
        tstate_next = tstate
    image.put(interp, layout.interp_threads_head, "Q", tstate_next)
    if layout.objects is not None:
        dict_type = image.alloc("type", 512)
        active = image.dict([(image.int(ident), image.thread(f"worker-{n}", dict_type))
                             for n, ident in enumerate(idents)], dict_type)
        threading = image.alloc("module", 64)
        image.put(threading, layout.objects.module_dict, "Q",
                  image.dict([(image.str("_active"), active)], dict_type))
        sys_module = image.alloc("module", 64)
        modules = image.dict([(image.str("sys"), sys_module), (image.str("threading"), threading)], dict_type)
        image.put(interp, layout.interp_modules, "Q", modules)
    return image, runtime, py_version


def read_process(memory: ProcessMemory, runtime: int, py_version: int, name: str) -> None:
    """What the collector reads of a CPython process, each part on its own."""
    layout = layout_of(memory, runtime, py_version or None, name)
    if layout is None:
        return
    symbols = PythonSymbolizer()
    for tstate, _, _ in thread_states(memory, layout, runtime):
        try:
            frames = walk_frames(memory, layout, tstate)
        except SymbolizerError:
            continue
        for code, instr, check, _ in frames:
            symbols.get_frame(memory, layout, code, instr, check)
            info = symbols.learn(memory, layout, code, check)
            if info is not None:
                line_table(layout.version, info.linetable, info.firstlineno)
    if layout.objects is not None:
        try:
            thread_names(memory, layout, runtime)
        except SymbolizerError:
            pass


VERSIONS = [(3, minor) for minor in range(8, 15)]


def make_case(images: Dict[Tuple[int, int], Tuple[Image, int, int]], number: int) -> Case:
    rng = case_rng("python memory", number)
    version = rng.choice(VERSIONS)
    image, runtime, py_version = images[version]
    kinds = sorted({kind for kind, _, _ in image.objects})
    kind = rng.choice(kinds)
    _, start, end = rng.choice([o for o in image.objects if o[0] == kind])
    what, data = mutate(rng, bytearray(image.data), start, end)
    return Case(f"{version[0]}.{version[1]}, {kind} at {BASE + start:#x}: {what}",
                (bytes(data), runtime, py_version, f"python{version[0]}.{version[1]}"))


def test_mutated_cpython_memory_gives_frames_lines_and_names_or_a_symbolizer_error():
    images = {version: build_image(version) for version in VERSIONS}
    for version, (image, runtime, py_version) in images.items():   # unmutated, each image reads in full
        memory = ImageMemory(bytes(image.data))
        layout = layout_of(memory, runtime, py_version or None, "python")
        states = thread_states(memory, layout, runtime)
        assert [tid for _, _, tid in states] == ([4001, 4000] if version >= (3, 11) else [0, 0])
        frames = [PythonSymbolizer().get_frame(memory, layout, code, instr, check)
                  for code, instr, check, _ in walk_frames(memory, layout, states[0][0])]
        assert [f.name.rsplit(".", 1)[-1] for f in frames] == ["run", "helper", "<module>"], version
        assert all(f.line > f.start_line for f in frames), version
        if layout.objects is not None:
            assert sorted(thread_names(memory, layout, runtime).values()) == ["worker-0", "worker-1"]

    def run(case: Case) -> None:
        data, runtime, py_version, name = case.data
        read_process(ImageMemory(data), runtime, py_version, name)

    def warm_up() -> None:
        for image, runtime, py_version in images.values():
            read_process(ImageMemory(bytes(image.data)), runtime, py_version, "python")

    failures = run_family("python memory", CASES, lambda n: make_case(images, n), run, (SymbolizerError,), warm_up)
    assert_no_failures("CPython memory", failures)
