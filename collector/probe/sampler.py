"""Load, attach and drain the BPF sampler; the only module that touches bcc."""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import mmap
import os
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from bpfprof.bpf import BPF_DIR, BUFFERED_MAPS, PROGRAM, define, enum_names
from bpfprof.collector.errors import SetupError
from bpfprof.collector.probe import memory_ranges
from bpfprof.collector.probe.kernel_headers import KernelHeaders
from bpfprof.symbolizer.interpreters.python.threads import FRAME_ENTRY, FRAME_SHIM

# Let samples that read the old buffer index finish before that buffer is drained.
# Perf-event BPF programs run to completion in microseconds with preemption off.
_IN_FLIGHT_GRACE_S = 0.002


LOSS_REASONS = enum_names("loss_reason")
NUM_LOSS_REASONS = LOSS_REASONS.pop("LOSS_REASONS")  # the sentinel that sizes the map
OFFCPU_STATS = enum_names("offcpu_stat")
OFFCPU_STATS.pop("OFFCPU_STATS")
UNWIND_ENDS = enum_names("unwind_end")
UNWIND_ENDS.pop("UNWIND_ENDS")
MEMORY_STATS = enum_names("memory_stat")
MEMORY_STATS.pop("MEMORY_STATS")
EVENT_KINDS = enum_names("process_event_kind")


NATIVE_STACK_DEPTH = define("NATIVE_STACK_DEPTH")  # frames the unwinder records
UNWIND_MAPPINGS_SEARCHED = 1 << define("UNWIND_MAPPING_SEARCH")  # a process's mappings a binary search finds
UNWIND_ROWS_SEARCHED = 1 << define("UNWIND_ROW_SEARCH")  # a binary's rows a binary search finds
_FNV_OFFSET, _FNV_PRIME = define("FNV_OFFSET"), define("FNV_PRIME")  # stack keys, as BPF makes them


# Sizes of the unwinder's map entries (common.h), for `check` before anything is loaded.
_UNWIND_ROW_SIZE = 8  # u64
_UNWIND_MAPPING_SIZE = 32  # struct unwind_mapping: three u64 and two u32
_NATIVE_STACK_SIZE = 8 + 8 * NATIVE_STACK_DEPTH  # struct native_stack

MAX_PENDING_HOLES = 1 << 16  # holes kept between two readings of the memory

_MADV_DONTNEED = 4
_COMPILER_LIBRARY = re.compile(r"/lib(LLVM|clang)[^/]*$")


def _release_compiler_memory() -> None:
    """Once the program is loaded, clang and LLVM are not needed again: give back the
    heap they freed, and drop the pages of their code and read-only data from this
    process (about 60 MB). Only mappings holding no private copy of a page are dropped:
    those pages come back from the file if ever touched again, even when another process
    (another bcc tool) keeps them in memory."""
    libc = ctypes.CDLL(None)
    libc.malloc_trim(0)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    region = None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", fields[0]):
                start, end = (int(a, 16) for a in fields[0].split("-"))
                shared_file = len(fields) > 5 and "w" not in fields[1] and _COMPILER_LIBRARY.search(fields[5])
                region = (start, end) if shared_file else None
            elif fields[0] == "Anonymous:" and region is not None and fields[1] == "0":
                libc.madvise(region[0], region[1] - region[0], _MADV_DONTNEED)  # advice only: failure is harmless


class _Batches:
    """Reads a BPF hash map (and clears it, when asked) a batch at a time through buffers
    made once: bcc's items_*_batch makes and zeroes buffers for every entry the map can
    hold on each call, megabytes per drain that glibc then keeps in its heap."""

    SIZE = 256  # entries a call

    def __init__(self, table, name: str) -> None:
        from bcc import lib

        self._table = table
        self._name = name
        self._lib = lib
        self._size = min(self.SIZE, table.max_entries)
        self._keys = (table.Key * self._size)()
        self._values = (table.Leaf * self._size)()

    def _batches(self, delete: bool) -> Iterable[int]:
        """Fills the buffers a batch at a time, yielding how many entries each holds."""
        call = self._lib.bpf_lookup_and_delete_batch if delete else self._lib.bpf_lookup_batch
        position, count = ctypes.c_uint32(0), ctypes.c_uint32(0)
        first = True
        while True:
            count.value = self._size
            result = call(self._table.map_fd, None if first else ctypes.byref(position), ctypes.byref(position),
                          self._keys, self._values, ctypes.byref(count))
            error = ctypes.get_errno()
            if result != 0 and error != errno.ENOENT:
                raise OSError(error, f"reading BPF map {self._name} in batches: {os.strerror(error)}")
            yield count.value
            if result != 0:  # ENOENT: that was the last batch
                return
            first = False

    def read(self, delete: bool) -> Iterable[Tuple[object, object]]:
        """Every (key, value) in the map. Both live in the shared buffers: read each pair
        before asking for the next."""
        for count in self._batches(delete):
            for i in range(count):
                yield self._keys[i], self._values[i]

    def read_bytes(self, delete: bool) -> Iterable[Tuple[bytes, bytes]]:
        """The map's keys and values as the bytes of their C structs, a batch at a time:
        many times faster to unpack than their fields."""
        key_size, value_size = ctypes.sizeof(self._table.Key), ctypes.sizeof(self._table.Leaf)
        for count in self._batches(delete):
            yield (ctypes.string_at(ctypes.addressof(self._keys), count * key_size),
                   ctypes.string_at(ctypes.addressof(self._values), count * value_size))


@dataclass(frozen=True)
class SamplerConfig:
    """Everything the BPF program is built and attached with; turns into -D cflags."""

    frequency: int = 99
    pids: Tuple[int, ...] = ()  # empty: the whole system
    follow_children: bool = False
    kernel_stacks: bool = True
    stack_storage_size: int = 16384
    map_size: int = 65536
    target_entries: int = 65536
    event_pages: int = 64  # ring buffer pages, a power of two
    python: bool = True  # walk CPython frames
    python_processes: int = 4096
    python_event_pages: int = 256  # ring buffer for new Python stacks (2 KiB at most each)
    cpu: bool = True  # sample CPU stacks (perf events)
    block: bool = False  # record blocking delay (sched_switch)
    wall: bool = False  # record off-CPU time of every kind (sched_switch), for wall-clock profiles
    min_block_ns: int = 1000
    native_unwind: bool = True  # unwind user stacks from unwind tables (else frame pointers only)
    unwind_rows: int = 1 << 21  # unwind table rows, of every binary, held at once (8 bytes each)
    unwind_mappings: int = 1 << 16  # executable mappings of every process, held at once (32 bytes each)
    unwind_frames_per_program: int = 8  # frames unwound per tail call of the unwinder
    memory: bool = False  # follow anonymous memory obtained and held (syscall tracepoints)
    memory_ranges: int = 65536  # ranges of memory held at once, of every process
    memory_holes: int = 4096  # unmappings BPF leaves to the collector, between two reads of the ranges
    faults: bool = False  # count page faults, 1 in fault_period
    fault_period: int = 64

    def native_stack_entries(self) -> int:
        return max(64, self.stack_storage_size // 2)

    def unwind_memory_bytes(self) -> int:
        """Kernel memory of the native unwinder's maps: rows, mappings and native stacks
        (two buffers, and one more for off-CPU stacks)."""
        if not self.native_unwind:
            return 0
        stack_maps = 3 if self.block or self.wall else 2
        return (self.unwind_rows * _UNWIND_ROW_SIZE + self.unwind_mappings * _UNWIND_MAPPING_SIZE
                + stack_maps * self.native_stack_entries() * _NATIVE_STACK_SIZE)

    def cflags(self) -> List[str]:
        """The settings common.bpf.c lists, as -D flags."""
        settings = {
            "FILTER_PIDS": bool(self.pids) or self.follow_children,
            "FOLLOW_CHILDREN": self.follow_children,
            "KERNEL_STACKS": self.kernel_stacks,
            "PYTHON_STACKS": self.python,
            "OFFCPU_BLOCK": self.block,
            "OFFCPU_WALL": self.wall,
            "NATIVE_UNWIND": self.native_unwind,
            "SAMPLE_ENTRIES": self.map_size,
            "STACK_ENTRIES": self.stack_storage_size,
            "THREAD_ENTRIES": self.target_entries,
            "EVENT_PAGES": self.event_pages,
            "PYTHON_PROCESSES": self.python_processes,
            # A Python stack takes 2 KiB of kernel memory per entry, twice (double buffering).
            "PYTHON_STACK_ENTRIES": max(64, self.stack_storage_size // 8),
            "PYTHON_EVENT_PAGES": self.python_event_pages,
            "UNWIND_ROWS": self.unwind_rows,
            "UNWIND_MAPPINGS": self.unwind_mappings,
            "NATIVE_STACK_ENTRIES": self.native_stack_entries(),
            "MIN_BLOCK_NS": self.min_block_ns,
            "UNWIND_FRAMES_PER_PROGRAM": self.unwind_frames_per_program,
            "MEMORY": self.memory,
            "MEMORY_RANGES": self.memory_ranges,
            "MEMORY_HOLE_ENTRIES": self.memory_holes,
            "FAULTS": self.faults,
            "FAULT_PERIOD": self.fault_period,
        }
        return [f"-D{name}={int(value)}" for name, value in settings.items()]


@dataclass(frozen=True)
class RawSample:
    pid: int
    tid: int
    thread_name: str
    kernel_stack: Tuple[int, ...]  # addresses, leaf first
    user_stack: Tuple[int, ...]
    count: int
    python_stack: Tuple["RawPythonFrame", ...] = ()  # leaf first
    python_truncated: bool = False  # root-most Python frames were left out
    delay_ns: int = 0  # off-CPU samples: the time spent blocked, `count` times
    bytes: int = 0  # memory samples: the bytes of `count` ranges
    user_stack_complete: bool = False  # the native unwinder reached the thread's outermost frame


@dataclass(frozen=True)
class Drained:
    cpu: List[RawSample]
    block: List[RawSample]  # empty unless the config asks for blocking delay
    wall: List[RawSample]  # off-CPU time of every kind, if the config asks for wall time
    code_mapped: FrozenSet[int] = frozenset()  # pids that mapped code since the last drain, of those seen
    alloc: List[RawSample] = field(default_factory=list)  # memory obtained, if the config follows memory
    faults: List[RawSample] = field(default_factory=list)  # page faults sampled, if the config counts them


class _SampleKey(NamedTuple):  # struct sample_key's fields, as a range keeps them
    pid: int
    tid: int
    kernel_stack_id: int
    user_stack_id: int
    python_stack: int
    native_stack: int
    thread_name: bytes


class _Held(NamedTuple):  # as struct memory_value: ranges and their bytes
    count: int
    bytes: int


@dataclass(frozen=True)
class MemoryHeld:
    live: List[RawSample]  # count: ranges held, bytes: their size
    ended: List[RawSample]  # held by process images that ended since the last reading, as they ended


class RawPythonFrame(NamedTuple):  # a tuple: made for every frame of every new stack
    code: int  # PyCodeObject address
    instr: int  # as struct python_frame says, per version
    check: int  # hash of code fields taken in BPF
    entry: bool  # the eval loop was entered at this frame


@dataclass(frozen=True)
class ProcessEvent:
    kind: str  # a name from EVENT_KINDS
    pid: int
    tid: int
    comm: str


def _write_array(table, first: int, data: bytes) -> None:
    """Write into an mmap-able BPF array from element `first`: only the pages written are
    mapped, and only while they are, so they never count as this process's memory."""
    start = first * ctypes.sizeof(table.Leaf)
    page_start = start - start % mmap.PAGESIZE
    length = start + len(data) - page_start
    if not data:
        return
    with mmap.mmap(table.map_fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                   offset=page_start) as window:
        window[start - page_start:] = data


@functools.lru_cache(maxsize=None)
def _unpacker(ctype) -> struct.Struct:
    """Reads the C struct behind a ctypes structure of plain fields (as bcc makes them
    from common.h) straight from its bytes, many times faster than its fields."""
    layout = struct.Struct("@" + "".join(field_type._type_ for _, field_type in ctype._fields_))
    if layout.size != ctypes.sizeof(ctype):
        raise RuntimeError(f"{ctype.__name__} is not a struct of plain fields")
    return layout


def _python_frames(stack) -> Tuple[RawPythonFrame, ...]:
    """The Python frames of a struct python_stack, leaf first. A shim frame (3.12+) is
    not code: it marks the frame above it, toward the leaf, as an eval loop entry."""
    layout = _unpacker(type(stack.frames)._type_)
    depth = min(stack.depth, len(stack.frames))
    frames: List[RawPythonFrame] = []
    for code, instr, check, flags in layout.iter_unpack(ctypes.string_at(ctypes.addressof(stack.frames),
                                                                          depth * layout.size)):
        if flags & FRAME_SHIM:
            if frames:
                frames[-1] = frames[-1]._replace(entry=True)
        else:
            frames.append(RawPythonFrame(code, instr, check, bool(flags & FRAME_ENTRY)))
    return tuple(frames)


def _python_stack(stack) -> Tuple[Tuple[RawPythonFrame, ...], bool]:
    """A struct python_stack: (frames leaf first, truncated)."""
    return _python_frames(stack), bool(stack.truncated)


def _native_stack(stack) -> Tuple[Tuple[int, ...], bool]:
    """A struct native_stack: (addresses leaf first, whether unwinding reached the outermost frame)."""
    return tuple(stack.pcs[: min(stack.depth, len(stack.pcs))]), stack.end == UNWIND_ENDS["UNWIND_COMPLETE"]


class _StackLookup:
    """A stack map (hash -> stack) read an entry at a time, each once."""

    def __init__(self, table, convert: Callable[[object], Tuple]) -> None:
        self._table = table  # None: the map is not in use
        self._convert = convert
        self._read: Dict[int, Tuple] = {}

    def get(self, key: int, default: Tuple) -> Tuple:
        if self._table is None:
            return default
        if key not in self._read:
            try:
                self._read[key] = self._convert(self._table[self._table.Key(key)])
            except KeyError:
                self._read[key] = default
        return self._read[key]


def python_stack_key(frames: Sequence[Tuple[int, int, int, int]]) -> int:
    """The key BPF stores a Python stack under: FNV-1a over each frame's code and instr
    (frames as struct python_frame holds them, leaf first)."""
    key = _FNV_OFFSET
    for code, instr, _, _ in frames:
        key = ((key ^ code) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
        key = ((key ^ (instr & 0xFFFFFFFF)) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return key | 1


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class Sampler:
    """The BPF program on every CPU: start(), then poll() for events and drain() samples."""

    def __init__(self, config: SamplerConfig, headers: KernelHeaders):
        self.config = config
        self.headers = headers
        self._bpf = None
        self._active = 0
        self._batches: Dict[str, _Batches] = {}
        self._kind_names = {v: k for k, v in EVENT_KINDS.items()}
        self._ended_read = 0  # MEMORY_RANGES_LEFT when the memory was last read
        self.memory_ranges_held = 0  # ranges in the map after the memory was last read
        self._holes: Deque[memory_ranges.Hole] = collections.deque(maxlen=MAX_PENDING_HOLES)
        self._holes_lost = 0

    def start(self, on_event: Callable[[ProcessEvent], None],
              on_python_stack: Optional[Callable[[int, Tuple[RawPythonFrame, ...]], None]] = None) -> None:
        """Load and attach. Both callbacks run in poll(): on_event for process events,
        on_python_stack for each Python stack the first time it is stored after a drain."""
        from bcc import BPF, PerfSWConfig, PerfType

        if self.headers.source:
            os.environ["BCC_KERNEL_SOURCE"] = self.headers.source
        else:  # the running kernel's own headers, which bcc takes only when this is unset
            os.environ.pop("BCC_KERNEL_SOURCE", None)
        cflags = [f"-I{BPF_DIR}", *self.headers.cflags, *self.config.cflags()]
        try:
            self._bpf = BPF(text=PROGRAM, cflags=cflags)
        except Exception as e:  # bcc raises bare Exception for compile and load failures
            raise SetupError(f"cannot load the BPF program ({e}); kernel headers: {self.headers.description}") from e
        for pair in BUFFERED_MAPS:
            outer = self._bpf[pair]
            for buffer in (0, 1):
                outer[ctypes.c_int(buffer)] = ctypes.c_int(self._bpf[f"{pair}_{buffer}"].map_fd)
        if self.config.native_unwind:
            self._load_unwinders(BPF)
        _release_compiler_memory()
        self.add_targets(self.config.pids)

        def deliver(_ctx, data, _size):
            event = self._bpf["events"].event(data)
            on_event(ProcessEvent(self._kind_names.get(event.kind, "?"), event.pid, event.tid, _text(event.comm)))

        self._bpf["events"].open_ring_buffer(deliver)
        if self.config.python and on_python_stack is not None:
            # bcc cannot make the event's type from the C source (a struct in a struct);
            # the per-CPU scratch map holds the same struct, one per CPU.
            event_type = ctypes.POINTER(self._bpf["python_scratch"].Leaf._type_)

            def deliver_python(_ctx, data, _size):
                event = ctypes.cast(data, event_type).contents
                on_python_stack(event.pid, _python_frames(event.stack))

            self._bpf["python_stack_events"].open_ring_buffer(deliver_python)
        if not self.config.cpu:
            return
        try:
            self._bpf.attach_perf_event(
                ev_type=PerfType.SOFTWARE,
                ev_config=PerfSWConfig.CPU_CLOCK,
                fn_name="on_cpu_sample",
                sample_freq=self.config.frequency,
            )
        except Exception as e:
            self.close()
            raise SetupError(f"cannot open perf events ({e}); check /proc/sys/kernel/perf_event_paranoid") from e

    def _load_unwinders(self, bpf_class) -> None:
        """The native unwinder programs, each in the slot its sampler tail-calls."""
        unwinders = [("cpu_unwinder", "unwind_cpu_stack", bpf_class.PERF_EVENT)]
        if self.config.block or self.config.wall:
            unwinders.append(("offcpu_unwinder", "unwind_offcpu_stack", bpf_class.TRACEPOINT))
        if self.config.memory:
            unwinders.append(("memory_unwinder", "unwind_memory_stack", bpf_class.TRACEPOINT))
        if self.config.faults:
            unwinders.append(("fault_unwinder", "unwind_fault_stack", bpf_class.TRACEPOINT))
        for table, function, kind in unwinders:
            try:
                fn = self._bpf.load_func(function, kind)
            except Exception as e:
                self.close()
                raise SetupError(f"cannot load the native unwinder ({e}); with --no-dwarf stacks are unwound by frame "
                                 "pointers") from e
            self._bpf[table][ctypes.c_int(0)] = ctypes.c_int(fn.fd)

    def add_targets(self, pids: Iterable[int]) -> None:
        targets = self._bpf["targets"]
        for pid in pids:
            targets[targets.Key(pid)] = targets.Leaf(1)

    def see_again(self, pid: int) -> None:
        """Report the process as PROCESS_SEEN again, to read it again: at its next mmap
        (its libraries may be on the way) or its next sample, whichever comes first."""
        table = self._bpf["seen"]
        try:
            del table[table.Key(pid)]
        except KeyError:
            pass
        pending = self._bpf["maps_pending"]
        pending[pending.Key(pid)] = pending.Leaf(1)

    def poll(self, timeout_ms: int) -> None:
        """Deliver pending events to the callbacks given to start()."""
        self._bpf.ring_buffer_poll(timeout_ms)

    def drain(self) -> Drained:
        """Switch buffers, then read and clear the one samples no longer go to."""
        control = self._bpf["control"]
        drained = self._active
        self._active = 1 - drained
        control[control.Key(0)] = control.Leaf(self._active)
        time.sleep(_IN_FLIGHT_GRACE_S)

        stacks = self._bpf[f"stacks_{drained}"]
        python = self._python_stacks(f"python_stacks_{drained}")
        native = self._native_stacks(f"native_stacks_{drained}")
        cpu = self._samples(self._entries(f"counts_{drained}"), stacks, python, native)
        faults = self._samples(self._entries(f"faults_{drained}"), stacks, python, native) if self.config.faults else []
        # Also clears stacks whose sample found the counts map full.
        for key in list(stacks.keys()):
            del stacks[key]
        offcpu = {}
        if self.config.block or self.config.wall:  # their stacks stay: a thread may be away across drains
            python = self._python_stacks("offcpu_python_stacks", keep=True)
            native = self._native_stacks("offcpu_native_stacks", keep=True)
            for kind in ("block", "wall"):
                if getattr(self.config, kind):
                    offcpu[kind] = self._samples(self._entries(f"{kind}_{drained}"), self._bpf["offcpu_stacks"],
                                                 python, native)
        alloc = []
        if self.config.memory:
            self._take_holes()
            alloc = self._samples(self._entries(f"alloc_{drained}"), self._bpf["memory_stacks"], *self._memory_stacks())
        code_mapped = frozenset(pid for pid, _ in self._entries("code_mapped"))
        return Drained(cpu, offcpu.get("block", []), offcpu.get("wall", []), code_mapped, alloc, faults)

    def prune_offcpu_stacks(self) -> int:
        """Free the off-CPU stacks (kernel, user and Python) that neither a thread still
        away nor an undrained count refers to; they are kept across drains, so a long
        recording would otherwise fill their maps. Returns how many were freed."""
        if not (self.config.block or self.config.wall):
            return 0
        tables = [(self._bpf["offcpu_stacks"], lambda k: {k.kernel_stack_id, k.user_stack_id})]
        if self.config.python:
            tables.append((self._bpf["offcpu_python_stacks"], lambda k: {k.python_stack}))
        if self.config.native_unwind:
            tables.append((self._bpf["offcpu_native_stacks"], lambda k: {k.native_stack}))
        # Listed before the references are read: a stack made in between is not freed. One
        # that exists, unreferenced, and is taken again just before it is freed loses its
        # frames in that one count (a window of a few system calls).
        listed = [(table, list(table.keys()), refers) for table, refers in tables]
        keys = [start.key for start in self._bpf["offcpu_starts"].values()]
        for kind in ("block", "wall"):
            if getattr(self.config, kind):
                keys.extend(self._bpf[f"{kind}_{self._active}"].keys())
        late = {late.python_stack for late in self._bpf["offcpu_late_python"].values()} if self.config.python else set()
        return self._free_unreferenced(listed, keys, late)

    @staticmethod
    def _free_unreferenced(listed, keys: Iterable[object], also: Iterable[int] = ()) -> int:
        """Of each (stack map, its keys as listed, what a sample key refers to in it),
        frees the stacks none of `keys` refers to (nor `also`). Returns how many."""
        keys = list(keys)
        freed = 0
        for table, table_keys, refers in listed:
            in_use = set(also)
            for key in keys:
                in_use.update(refers(key))
            for key in table_keys:
                if key.value not in in_use:
                    try:
                        del table[key]
                        freed += 1
                    except KeyError:
                        pass
        return freed

    def memory_ended(self) -> bool:
        """Whether a process image holding memory ended since the memory was last read."""
        return self.memory_stats()["MEMORY_RANGES_LEFT"] > self._ended_read

    def read_memory(self, pid: Optional[int] = None) -> MemoryHeld:
        """The memory held, per key. Holes BPF left are cut out first, the ranges of
        process images that ended are returned as `ended` and removed, and the stacks no
        range or undrained allocation refers to any more are freed. With `pid`, only what
        that process holds, nothing changed (what the OOM killer is taking)."""
        if not self.config.memory:
            return MemoryHeld([], [])
        listed = self._list_memory_stacks() if pid is None else []
        ended_so_far = self.memory_stats()["MEMORY_RANGES_LEFT"]
        ranges = [r for keys, values in self._batches_of("memory_ranges").read_bytes(delete=False)
                  for r in memory_ranges.unpack_ranges(keys, values)]
        if pid is None:
            self._take_holes()
            holes = list(self._holes)
            self._holes.clear()
            removed, added = memory_ranges.cut_holes(ranges, holes)
            self._remove_ranges(removed)
            self._add_ranges(added)
            gone = set(removed)
            ranges = [r for r in ranges if r not in gone] + added
        generations = {process_id: generation for keys, values in self._batches_of("memory_processes").read_bytes(False)
                       for (process_id,), (generation, _, _) in zip(struct.iter_unpack("@I", keys),
                                                                 memory_ranges.PROCESS.iter_unpack(values))}
        reading = memory_ranges.classify(ranges, generations, pid)
        if pid is None:
            self._remove_ranges(reading.ended_ranges)
            self._ended_read = ended_so_far
            self.memory_ranges_held = len(reading.remaining)
        stacks = self._bpf["memory_stacks"]
        python, native = self._memory_stacks()

        def samples(held: memory_ranges.Held) -> List[RawSample]:
            return self._samples(((_SampleKey(*key), _Held(*value)) for key, value in held.by_key.items()),
                                 stacks, python, native)

        held = MemoryHeld(samples(reading.live), samples(reading.ended))  # their stacks read before any is freed
        if pid is None:
            in_use = {_SampleKey(*r.key) for r in reading.remaining}
            in_use.update(_SampleKey(k.pid, k.tid, k.kernel_stack_id, k.user_stack_id, k.python_stack, k.native_stack,
                                     bytes(k.thread_name)) for k, _ in self._entries(f"alloc_{self._active}", keep=True))
            self._free_unreferenced(listed, in_use)
        return held

    def _take_holes(self) -> None:
        """Holes BPF noted, out of its map (which only holds so many) into ours, to be cut
        at the next reading of the memory; past MAX_PENDING_HOLES the oldest are lost."""
        for keys, values in self._batches_of("memory_holes").read_bytes(delete=True):
            for hole in memory_ranges.unpack_holes(keys, values):
                self._holes_lost += len(self._holes) == MAX_PENDING_HOLES
                self._holes.append(hole)

    def _remove_ranges(self, ranges: Iterable[memory_ranges.Range]) -> None:
        """Deletes the ranges and their ends' index entries (an entry that has become
        another range's end goes too: BPF then treats its unmapping as a hole)."""
        from bcc import lib

        table, ends = self._bpf["memory_ranges"], self._bpf["memory_range_ends"]
        for r in ranges:
            lib.bpf_delete_elem(table.map_fd, ctypes.c_char_p(memory_ranges.RANGE_KEY.pack(r.pid, 0, r.start)))
            lib.bpf_delete_elem(ends.map_fd, ctypes.c_char_p(memory_ranges.RANGE_KEY.pack(r.pid, 0, r.end)))

    def _add_ranges(self, ranges: Iterable[memory_ranges.Range]) -> None:
        from bcc import lib

        table, ends = self._bpf["memory_ranges"], self._bpf["memory_range_ends"]
        for r in ranges:
            key, value = memory_ranges.pack_range(r)
            if lib.bpf_update_elem(table.map_fd, ctypes.c_char_p(key), ctypes.c_char_p(value), 0) == 0:
                end_key = ctypes.c_char_p(memory_ranges.RANGE_KEY.pack(r.pid, 0, r.end))
                lib.bpf_update_elem(ends.map_fd, end_key, ctypes.byref(ctypes.c_uint64(r.start)), 0)

    def _memory_stacks(self) -> Tuple["_StackLookup", "_StackLookup"]:
        """The Python and native stacks of memory samples, looked up as samples refer to
        them: their maps keep every stack a range still held refers to, many more than
        one drain's samples do."""
        return (_StackLookup(self._bpf["memory_python_stacks"] if self.config.python else None, _python_stack),
                _StackLookup(self._bpf["memory_native_stacks"] if self.config.native_unwind else None, _native_stack))

    def _list_memory_stacks(self) -> List[Tuple[object, List[object], Callable[[object], object]]]:
        """Each memory stack map with its keys as now, and what a sample key refers to in it."""
        tables = [(self._bpf["memory_stacks"], lambda k: {k.user_stack_id})]
        if self.config.python:
            tables.append((self._bpf["memory_python_stacks"], lambda k: {k.python_stack}))
        if self.config.native_unwind:
            tables.append((self._bpf["memory_native_stacks"], lambda k: {k.native_stack}))
        return [(table, list(table.keys()), refers) for table, refers in tables]

    def memory_stats(self) -> Dict[str, int]:
        """MEMORY_* counts so far (memory.bpf.c)."""
        if not self.config.memory:
            return {name: 0 for name in MEMORY_STATS}
        table = self._bpf["memory_stats"]
        return {name: sum(table[table.Key(i)]) for name, i in MEMORY_STATS.items()}

    def _batches_of(self, table_name: str) -> _Batches:
        if table_name not in self._batches:
            self._batches[table_name] = _Batches(self._bpf[table_name], table_name)
        return self._batches[table_name]

    def _entries(self, table_name: str, keep: bool = False) -> Iterable[Tuple[object, object]]:
        """Every (key, value) of a hash map, cleared unless kept; read each pair before the next."""
        return self._batches_of(table_name).read(delete=not keep)

    @staticmethod
    def _samples(counts: Iterable[Tuple[object, object]], stacks,
                 python: Dict[int, Tuple[Tuple[RawPythonFrame, ...], bool]],
                 native: Dict[int, Tuple[Tuple[int, ...], bool]]) -> List[RawSample]:
        """Raw samples from one counts map's entries; their stacks are in `stacks`, `python` and `native`."""
        resolved: Dict[int, Tuple[int, ...]] = {}

        def stack(stack_id: int) -> Tuple[int, ...]:
            if stack_id < 0:
                return ()
            if stack_id not in resolved:
                try:
                    resolved[stack_id] = tuple(stacks.walk(stack_id))
                except KeyError:
                    resolved[stack_id] = ()
            return resolved[stack_id]

        samples = []
        for k, v in counts:
            python_stack, python_truncated = python.get(k.python_stack, ((), False))
            user_stack, complete = native.get(k.native_stack, ((), False)) if k.native_stack else (
                stack(k.user_stack_id), False)
            count, delay, size = (v.count, v.ns, 0) if hasattr(v, "ns") else (
                (v.count, 0, v.bytes) if hasattr(v, "bytes") else (v, 0, 0))
            samples.append(RawSample(
                pid=k.pid,
                tid=k.tid,
                thread_name=_text(k.thread_name),
                kernel_stack=stack(k.kernel_stack_id),
                user_stack=user_stack,
                count=count,
                python_stack=python_stack,
                python_truncated=python_truncated,
                delay_ns=delay,
                bytes=size,
                user_stack_complete=complete,
            ))
        return samples

    def _python_stacks(self, table_name: str, keep: bool = False) -> Dict[int, Tuple[Tuple[RawPythonFrame, ...], bool]]:
        """Read (and clear, unless kept) a Python stack map: hash -> (frames leaf first, truncated)."""
        if not self.config.python:
            return {}
        return {key: _python_stack(value) for key, value in self._entries(table_name, keep)}

    def _native_stacks(self, table_name: str, keep: bool = False) -> Dict[int, Tuple[Tuple[int, ...], bool]]:
        """Read (and clear, unless kept) a native stack map: hash -> (addresses leaf first,
        whether unwinding reached the outermost frame)."""
        if not self.config.native_unwind:
            return {}
        return {key: _native_stack(value) for key, value in self._entries(table_name, keep)}

    def write_unwind_rows(self, first: int, records: bytes) -> None:
        """Copy unwind rows (struct unwind_row records) into unwind_rows from index first."""
        _write_array(self._bpf["unwind_rows"], first, records)

    def new_unwind_mappings(self, count: int):
        """An array of `count` struct unwind_mapping, to fill and pass to write_unwind_mappings."""
        return (self._bpf["unwind_mappings"].Leaf * count)()

    def write_unwind_mappings(self, first: int, mappings) -> None:
        _write_array(self._bpf["unwind_mappings"], first, bytes(mappings))

    def set_unwind_process(self, pid: int, first_mapping: int, num_mappings: int) -> None:
        """From now on the process's user stacks are unwound through these mappings."""
        table = self._bpf["unwind_processes"]
        table[table.Key(pid)] = table.Leaf(first_mapping, num_mappings)

    def clear_unwind_process(self, pid: int) -> None:
        table = self._bpf["unwind_processes"]
        try:
            del table[table.Key(pid)]
        except KeyError:
            pass

    def unwind_ends(self) -> Dict[str, int]:
        """Native stacks unwound so far, per why unwinding stopped (UNWIND_* names)."""
        if not self.config.native_unwind:
            return {}
        table = self._bpf["unwind_ends"]
        return {name: sum(table[table.Key(i)]) for name, i in UNWIND_ENDS.items()}

    @property
    def follows_offcpu_python(self) -> bool:
        """Whether threads leaving the CPU are kept with their Python stacks."""
        return self.config.python and (self.config.block or self.config.wall)

    def offcpu_start_ns(self, tid: int) -> Optional[int]:
        """When the thread left the CPU, if it is away without a Python stack; else None."""
        table = self._bpf["offcpu_starts"]
        try:
            start = table[table.Key(tid)]
        except KeyError:
            return None
        return None if start.key.python_stack else start.start_ns

    def set_late_python_stack(self, tid: int, start_ns: int, frames: Sequence[Tuple[int, int, int, int]]) -> None:
        """Give the thread away since start_ns the Python stack walked for it meanwhile:
        frames leaf first as struct python_frame holds them (code, instr, check, flags),
        more than the struct holds meaning truncated."""
        from bcc import lib

        stacks = self._bpf["offcpu_python_stacks"]
        stack = stacks.Leaf()
        stack.depth = min(len(frames), len(stack.frames))
        stack.truncated = len(frames) > stack.depth
        for slot, (code, instr, check, flags) in zip(stack.frames, frames):
            slot.code, slot.instr, slot.check, slot.flags = code, instr, check, flags
        key = stacks.Key(python_stack_key(frames[:stack.depth]))
        if lib.bpf_update_elem(stacks.map_fd, ctypes.byref(key), ctypes.byref(stack), 0) != 0:
            return  # the map is full: the thread's time counts without Python frames
        late = self._bpf["offcpu_late_python"]
        late[late.Key(tid)] = late.Leaf(start_ns, key.value)

    def set_python_process(self, pid: int, fields: Dict[str, int]) -> None:
        """Start walking a CPython process: fields of struct python_process."""
        table = self._bpf["python_processes"]
        leaf = table.Leaf()
        for name, value in fields.items():
            setattr(leaf, name, value)
        table[table.Key(pid)] = leaf

    def losses(self) -> Dict[str, int]:
        """Cumulative losses per reason (LOSS_* names from common.h)."""
        table = self._bpf["losses"]
        losses = {name: sum(table[table.Key(i)]) for name, i in LOSS_REASONS.items()}
        losses["LOSS_MEMORY_HOLES_FULL"] += self._holes_lost
        return losses

    def offcpu_stats(self) -> Dict[str, int]:
        """Off-CPU switches so far per kind (OFFCPU_* names from common.h)."""
        if not (self.config.block or self.config.wall):
            return {}
        table = self._bpf["offcpu_stats"]
        return {name: sum(table[table.Key(i)]) for name, i in OFFCPU_STATS.items()}

    def close(self) -> None:
        """Detach every program and free the maps; safe to call twice."""
        if self._bpf is not None:
            bpf, self._bpf = self._bpf, None
            bpf.cleanup()
