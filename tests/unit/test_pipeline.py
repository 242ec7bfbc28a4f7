"""The pipeline above the probe, fed recorded drain records by a stand-in probe: process
events, CPU and off-CPU samples, and Python stacks of this very process (its interpreter,
code objects and libc are real; only the BPF side is played)."""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Callable, Dict, List, Tuple

from bpfprof.collector.pipeline.recorder import Recorder
from bpfprof.collector.probe.sampler import (Drained, MemoryHeld, ProcessEvent, RawPythonFrame, RawSample,
                                            SamplerConfig)
from bpfprof.symbolizer.interpreters.python.code_objects import check_of

GONE_PID = 4_000_000  # above pid_max: never a live process


class RecordedProbe:
    """What the sampler hands the pipeline, replayed: events, then one drain's records."""

    def __init__(self, config: SamplerConfig, events: List[ProcessEvent], drained: Drained,
                 held: MemoryHeld = MemoryHeld([], [])) -> None:
        self.config = config
        self._events = events
        self._drains = [drained]
        self._held = held
        self.memory_ranges_held = 0
        self._delivered = threading.Event()
        self.python_processes: Dict[int, Dict[str, int]] = {}
        self.closed = False

    follows_offcpu_python = False

    def start(self, on_event: Callable[[ProcessEvent], None], on_python_stack=None) -> None:
        self._on_event = on_event

    def poll(self, timeout_ms: int) -> None:
        events, self._events = self._events, []
        for event in events:
            self._on_event(event)
        if not events:
            self._delivered.wait(timeout_ms / 1000)  # nothing more will come: wait as the ring buffer would

    def drain(self) -> Drained:
        return self._drains.pop(0) if self._drains else Drained([], [], [])

    def add_targets(self, pids) -> None:
        pass

    def see_again(self, pid: int) -> None:
        pass

    def set_python_process(self, pid: int, fields: Dict[str, int]) -> None:
        self.python_processes[pid] = fields

    def prune_offcpu_stacks(self) -> int:
        return 0

    def memory_ended(self) -> bool:
        return bool(self._held.ended)

    def read_memory(self, pid=None) -> MemoryHeld:
        """What is held: ended ranges once (they are removed as read), live ones each time."""
        held, self._held = self._held, MemoryHeld(self._held.live, [])
        return held

    def losses(self) -> Dict[str, int]:
        return {"LOSS_COUNTS_FULL": 0, "LOSS_EVENTS_FULL": 2}

    def offcpu_stats(self) -> Dict[str, int]:
        return {"OFFCPU_BLOCKED": 1, "OFFCPU_BELOW_MIN": 0}

    def unwind_ends(self) -> Dict[str, int]:
        return {}

    def close(self) -> None:
        self.closed = True


def libc_address(name: str) -> int:
    """Where a libc function is in this process: a return address just inside it."""
    return ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p).value + 1


def hot_function():
    return sum(range(10))


def python_frame(function) -> RawPythonFrame:
    """The frame the BPF walker would record for `function` (its code object; the
    instruction offset only picks the line)."""
    code = function.__code__
    return RawPythonFrame(id(code), 0, check_of(code.co_firstlineno, id(code.co_name)), True)


def record(events: List[ProcessEvent], drained: Drained, types: Tuple[str, ...] = ("cpu",),
           held: MemoryHeld = MemoryHeld([], []), **config) -> Tuple[RecordedProbe, object]:
    probe = RecordedProbe(SamplerConfig(native_unwind=False, kernel_stacks=False, **config), events, drained, held)
    recording = Recorder(probe, types=types).run(duration=0.01)
    return probe, recording


def stacks(profile) -> Dict[Tuple[str, ...], List[int]]:
    return {tuple(frame.name for frame in stack): values for (stack, _), values in profile.samples.items()}


def test_cpu_samples_of_a_process_are_named_from_its_binaries():
    pid = os.getpid()
    sample = RawSample(pid, pid, "pytest", (), (libc_address("getpid"), libc_address("write")), 3)
    probe, recording = record([ProcessEvent("PROCESS_SEEN", pid, pid, "pytest")], Drained([sample], [], []))
    (stack, labels), = recording.profiles["cpu"].samples
    assert [frame.name for frame in stack][:1] in (["getpid"], ["__getpid"])
    assert labels.pid == pid and labels.tid == pid
    assert recording.profiles["cpu"].samples[(stack, labels)] == [3, 3 * 1_000_000_000 // 99]
    assert recording.losses == {"LOSS_EVENTS_FULL": 2}  # only the reasons that happened
    assert probe.closed


def test_a_process_gone_before_it_was_read_is_marked():
    sample = RawSample(GONE_PID, GONE_PID, "ephemeral", (), (0x401000,), 1)
    _, recording = record([ProcessEvent("PROCESS_SEEN", GONE_PID, GONE_PID, "ephemeral")], Drained([sample], [], []))
    marked = ("[ephemeral: process exited before it could be read]",)
    assert stacks(recording.profiles["cpu"]) == {marked: [1, 1_000_000_000 // 99]}
    assert recording.unreadable_processes == 1


def test_python_frames_of_this_interpreter_are_named_and_merged():
    pid = os.getpid()
    sample = RawSample(pid, pid, "pytest", (), (), 2, python_stack=(python_frame(hot_function),))
    probe, recording = record([ProcessEvent("PROCESS_SEEN", pid, pid, "pytest")], Drained([sample], [], []))
    assert pid in probe.python_processes  # the walker was told where this interpreter's threads are
    (stack, labels), = recording.profiles["cpu"].samples
    frame, = stack
    assert frame.name.endswith("hot_function") and frame.file == __file__
    assert frame.start_line == hot_function.__code__.co_firstlineno
    assert labels.thread == threading.current_thread().name  # the name threading gave this thread


def test_off_cpu_records_go_to_block_and_wall_profiles():
    pid = os.getpid()
    blocked = RawSample(pid, pid, "pytest", (), (libc_address("read"),), 4, delay_ns=7_000_000)
    cpu = RawSample(pid, pid, "pytest", (), (libc_address("getpid"),), 1)
    drained = Drained([cpu], [blocked], [blocked])
    _, recording = record([ProcessEvent("PROCESS_SEEN", pid, pid, "pytest")], drained, types=("block", "wall"),
                          block=True, wall=True)
    block, wall = recording.profiles["block"], recording.profiles["wall"]
    assert sorted(block.samples.values()) == [[4, 7_000_000]]
    # Wall time: the CPU sample's period and the time off the CPU.
    assert sorted(wall.samples.values()) == [[7_000_000], [1_000_000_000 // 99]]
    assert recording.offcpu == {"OFFCPU_BLOCKED": 1, "OFFCPU_BELOW_MIN": 0}


def test_an_exec_forgets_the_old_image():
    """Samples drained after an exec but taken before it are named from the old image."""
    pid = os.getpid()
    sample = RawSample(pid, pid, "pytest", (), (libc_address("getpid"),), 1)
    events = [ProcessEvent("PROCESS_SEEN", pid, pid, "pytest"), ProcessEvent("PROCESS_EXEC", pid, pid, "pytest")]
    _, recording = record(events, Drained([sample], [], []))
    (stack, _), = recording.profiles["cpu"].samples
    assert stack[0].name in ("getpid", "__getpid")


def test_names_a_process_gave_itself_are_escaped_in_labels():
    evil = "a\n99\x1b[2J"
    sample = RawSample(GONE_PID, GONE_PID, evil, (), (0x401000,), 1)
    _, recording = record([ProcessEvent("PROCESS_SEEN", GONE_PID, GONE_PID, evil)], Drained([sample], [], []))
    (_, labels), = recording.profiles["cpu"].samples
    assert (labels.comm, labels.thread) == ("a\\x0a99\\x1b[2J", "a\\x0a99\\x1b[2J")


def test_memory_obtained_held_and_held_at_exit_go_to_the_memory_profile():
    pid = os.getpid()
    mmap, brk = (libc_address("mmap"),), (libc_address("sbrk"),)
    obtained = RawSample(pid, pid, "pytest", (), mmap, 3, bytes=12 << 20)
    held = RawSample(pid, pid, "pytest", (), mmap, 2, bytes=8 << 20)
    held_at_exit = RawSample(pid, pid, "pytest", (), brk, 1, bytes=1 << 20)
    faulted = RawSample(pid, pid, "pytest", (), brk, 5)
    _, recording = record([ProcessEvent("PROCESS_SEEN", pid, pid, "pytest")],
                          Drained([], [], [], alloc=[obtained], faults=[faulted]), types=("memory", "faults"),
                          held=MemoryHeld([held], [held_at_exit]), memory=True, faults=True, fault_period=64)
    memory, faults = recording.profiles["memory"], recording.profiles["faults"]
    assert sorted(memory.samples.values()) == [[0, 0, 1, 1 << 20], [3, 12 << 20, 2, 8 << 20]]
    assert memory.main_type.type == "inuse_space"
    assert list(faults.samples.values()) == [[5 * 64, 5 * 64 * 4096]]
