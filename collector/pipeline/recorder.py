"""One recording: start the sampler, follow processes, drain periodically, stop cleanly."""

from __future__ import annotations

import os
import resource
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from bpfprof.collector.pipeline.events import Arrival, EventReader
from bpfprof.collector.pipeline.stacks import StackResolver
from bpfprof.collector.probe.sampler import ProcessEvent, RawSample, Sampler
from bpfprof.collector.processes.asyncio_tasks import MAX_TASK_WAITS, TaskSampler
from bpfprof.collector.processes.native_unwinding import NativeUnwinding, UnwindStats
from bpfprof.collector.processes.interpreters import InterpreterProcesses
from bpfprof.collector.processes.python import PYTHON_DATA_SYMBOLS, PythonProcesses
from bpfprof.collector.processes.table import ProcFiles, ProcessTable
from bpfprof.collector.profile import (PAGE_SIZE, Profile, block_profile, cpu_profile, faults_profile, memory_profile,
                                       wall_profile)
from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.errors import TooLarge
from bpfprof.symbolizer.kernel import KernelSymbols
from bpfprof.symbolizer.native.symbolizer import NativeSymbolizer
from bpfprof.symbolizer.text import printable

DRAIN_INTERVAL_S = 1.0
COMMAND_POLL_S = 0.1  # how often a command's exit is looked for
EVENTS_IN_DRAIN_S = 0.01  # a slow drain stops this often to take in new processes


def _in_use(sample: RawSample) -> Dict[str, List[int]]:
    """The values memory held adds: ranges and bytes in use."""
    return {"memory": [0, 0, sample.count, sample.bytes]}


@dataclass
class Recording:
    profiles: Dict[str, Profile]  # by type: "cpu", "block", "wall"
    losses: Dict[str, int]  # reason -> samples or events lost, only those that happened
    offcpu: Dict[str, int]  # OFFCPU_* -> switches seen, when off-CPU time was followed
    num_processes: int
    unreadable_processes: int
    # (boundary, reason) -> failures contained there, and the first of each as "name: why"
    failures: Dict[Tuple[str, str], int] = field(default_factory=dict)
    failure_examples: Dict[Tuple[str, str], str] = field(default_factory=dict)
    dead_thread: Optional[str] = None  # "name: why" of a worker thread given up, which ended the recording
    exit_status: Optional[int] = None  # of the command, when one was started
    unwind: Optional[UnwindStats] = None  # the unwind tables, when native stacks were unwound from them
    unwind_ends: Dict[str, int] = field(default_factory=dict)  # UNWIND_* -> native stacks that ended so
    task_reads: Tuple[int, int] = (0, 0)  # reads of asyncio tasks, awaiting tasks they saw (wall profile)


class Command:
    """A command forked held at a gate, so its pid is a target before it runs any code."""

    def __init__(self, argv: Sequence[str]):
        gate_read, gate_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child execs or exits
            os.close(gate_write)
            os.read(gate_read, 1)
            try:
                os.execvp(argv[0], list(argv))
            except OSError as e:
                os.write(2, f"bpfprof: cannot run {argv[0]}: {e.strerror}\n".encode())
                os._exit(127)
        os.close(gate_read)
        self._gate = gate_write
        self.exit_status: Optional[int] = None

    def release(self) -> None:
        os.write(self._gate, b"x")
        os.close(self._gate)

    def finish(self) -> None:
        """Stopped before the command ended: it ends too, as under perf record."""
        if not self.poll():
            os.kill(self.pid, signal.SIGTERM)
            self.exit_status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])

    def poll(self) -> bool:
        """True once the command has exited."""
        if self.exit_status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit_status = os.waitstatus_to_exitcode(status)
        return self.exit_status is not None


class Recorder:
    def __init__(self, sampler: Sampler, warn: Callable[[str], None] = lambda message: None,
                 types: Sequence[str] = ("cpu",), on_oom: Callable[[int, str, Profile], None] = lambda *_: None):
        """`sampler`: the probe, not started yet (a stand-in with its methods, in tests).
        `types`: the profiles to make, of "cpu", "block", "wall", "memory" and "faults";
        the sampler's config must sample CPU for cpu and wall, follow off-CPU time for
        block and wall, memory for memory and faults for faults. `on_oom(pid, comm,
        profile)`: the OOM killer chose a process, which held the memory in `profile`."""
        config = self.config = sampler.config
        self._sampler = sampler
        # One open file per binary keeps it readable after its process exits.
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.failures = Failures(warn)
        self._native = NativeSymbolizer(PYTHON_DATA_SYMBOLS, self.failures)
        # Each kind of interpreter the BPF side walks.
        self._interpreters: List[InterpreterProcesses] = []
        self._tasks: Optional[TaskSampler] = None  # asyncio tasks awaiting, for the wall profile
        if config.python:
            python = PythonProcesses(self._sampler, self._native, self.failures)
            self._interpreters.append(python)
            if "wall" in types:
                self._tasks = TaskSampler(python, self.failures, config.frequency)
        self._events = EventReader(self._sampler, self.failures, self._interpreters)
        self._unwinding = NativeUnwinding(self._sampler, self._native, self.failures) if config.native_unwind else None
        told = [told.on_snapshot for told in (*self._interpreters, self._unwinding) if told is not None]
        self._processes = ProcessTable(self._native, on_snapshot=told, see_again=self._sampler.see_again,
                                      failures=self.failures)
        self._events_due = 0.0
        self._kernel = KernelSymbols()
        self._resolver = StackResolver(self._processes, self._native, self._kernel, self._interpreters,
                                       between_frames=self._take_events_when_due)
        self._live_targets = set(config.pids)
        self._stop = False
        self.sampling_since: Optional[float] = None  # time.monotonic() when run() began sampling
        self.stop_requested_at: Optional[float] = None  # time.monotonic() of SIGINT/SIGTERM
        self._types = types
        self._on_oom = on_oom
        self.profiles: Dict[str, Profile] = self._new_profiles()  # as -t names them

    def _new_profiles(self, now: int = 0) -> Dict[str, Profile]:
        now, hz = now or time.time_ns(), self.config.frequency
        makers = {"cpu": lambda: cpu_profile(hz, now), "block": lambda: block_profile(now),
                  "wall": lambda: wall_profile(hz, now), "memory": lambda: memory_profile(now),
                  "faults": lambda: faults_profile(self.config.fault_period, now)}
        return {t: makers[t]() for t in self._types}

    def take_profiles(self) -> Dict[str, Profile]:
        """What was drained so far; the recording goes on into new, empty profiles that
        start where these end."""
        self._add_memory_held(live=True)
        now = time.time_ns()
        taken, self.profiles = self.profiles, self._new_profiles(now)
        for profile in taken.values():
            profile.duration_ns = now - profile.start_ns
        self._sampler.prune_offcpu_stacks()
        return taken

    def status(self) -> Dict[str, int]:
        """Gauges of the recording so far, for an agent's metrics."""
        return {"processes": self._processes.num_live(), "processes_seen": self._processes.num_seen,
                "binaries": self._native.num_binaries(), "frames": self._native.num_frames(),
                "open_files": self._native.num_open_files(), "memory_ranges": self._sampler.memory_ranges_held}

    def cache_bytes(self) -> Dict[str, int]:
        """Bytes held by the symbol caches, about: "native" and each interpreter's."""
        return {"native": self._native.num_bytes(), **{i.name: i.num_bytes() for i in self._interpreters}}

    def losses(self) -> Dict[str, int]:
        """Reason -> samples or events lost so far, only those that happened."""
        return {reason: n for reason, n in self._sampler.losses().items() if n}

    def _apply(self, arrivals: List[Arrival]) -> None:
        for event, early in arrivals:
            self._on_event(event, early)

    def _on_event(self, event: ProcessEvent, early: Optional[ProcFiles]) -> None:
        with self.failures.contain("process", str(event.pid)):
            self._apply_event(event, early)

    def _apply_event(self, event: ProcessEvent, early: Optional[ProcFiles]) -> None:
        if event.kind == "PROCESS_SEEN":
            self._processes.snapshot(event.pid, event.comm, early)
        elif event.kind == "PROCESS_EXEC":  # the event thread told the interpreters
            if self._unwinding:
                self._unwinding.forget(event.pid)
            self._processes.on_exec(event.pid)
        elif event.kind == "OOM_VICTIM":
            self._report_oom(event.pid)
        elif event.kind == "PROCESS_EXIT":
            if self._unwinding:
                self._unwinding.forget(event.pid)
            self._processes.on_exit(event.pid)
            self._live_targets.discard(event.pid)

    def _take_events_when_due(self) -> None:
        """In a drain: new processes are read every EVENTS_IN_DRAIN_S, between samples and
        between the frames of one (naming a binary's first frames can take 100 ms)."""
        if time.monotonic() >= self._events_due:
            self._apply(self._events.take(0))
            self._events_due = time.monotonic() + EVENTS_IN_DRAIN_S

    def _drain(self) -> None:
        self._apply(self._events.take(0))  # snapshots first, so every sample finds its process
        exited = self._processes.exited()
        ended_threads = [interpreters.ended_threads() for interpreters in self._interpreters]
        self._events_due = time.monotonic() + EVENTS_IN_DRAIN_S
        drained = self._sampler.drain()
        self._processes.on_code_mapped(drained.code_mapped)
        cpu_period = 1_000_000_000 // self.config.frequency
        faults = self.config.fault_period
        # Each kind of raw sample, and the values it adds to each profile type.
        for samples, values_by_type in (
            (drained.cpu, lambda s: {"cpu": [s.count, s.count * cpu_period], "wall": [s.count * cpu_period]}),
            (drained.block, lambda s: {"block": [s.count, s.delay_ns]}),
            (drained.wall, lambda s: {"wall": [s.delay_ns]}),
            (drained.alloc, lambda s: {"memory": [s.count, s.bytes, 0, 0]}),
            (drained.faults, lambda s: {"faults": [s.count * faults, s.count * faults * PAGE_SIZE]}),
        ):
            self._add_samples(self.profiles, samples, values_by_type)
        self._add_task_waits()
        if self._sampler.memory_ended():  # named while their processes are known
            self._add_memory_held(live=False)
        for interpreters, ended in zip(self._interpreters, ended_threads):
            interpreters.drop_names(ended)
        for pid in self._processes.end_drain(exited):
            self._resolver.forget(pid)
        self._native.drop_inflated()
        self._native.close_idle()

    def _add_samples(self, profiles: Dict[str, Profile], samples: List[RawSample],
                     values_by_type: Callable[[RawSample], Dict[str, List[int]]]) -> None:
        for sample in samples:
            with self.failures.contain("sample", f"of process {sample.pid}"):
                stack, labels = self._resolver.resolve(sample)
                for kind, values in values_by_type(sample).items():
                    if kind in profiles:
                        profiles[kind].add(stack, labels, values)
            self._take_events_when_due()

    def _add_task_waits(self) -> None:
        """The time asyncio tasks awaited since the last drain, at their await chains on
        their loops' threads, labelled with the task."""
        if self._tasks is None:
            return
        waits, dropped = self._tasks.take()
        if dropped:
            self.failures.add("sample", "asyncio tasks", TooLarge(f"{dropped} waits of tasks past the "
                                                                  f"{MAX_TASK_WAITS} distinct stacks kept per drain"))
        for wait, waited_ns in waits.items():
            with self.failures.contain("sample", f"of process {wait.pid}"):
                labels = self._resolver.labels(wait.pid, wait.tid, wait.thread_name, (("task", printable(wait.task)),))
                self.profiles["wall"].add(wait.stack, labels, [waited_ns])

    def _add_memory_held(self, live: bool) -> None:
        """Memory held, in use in the memory profile: by process images that ended since
        it was last read, and with `live` by those still running (at the end of an interval)."""
        if "memory" not in self.profiles:
            return
        held = self._sampler.read_memory()
        self._add_samples(self.profiles, held.ended + (held.live if live else []), _in_use)

    def _report_oom(self, pid: int) -> None:
        """The OOM killer chose the process: what it holds now goes to on_oom at once."""
        if "memory" not in self.profiles:
            return
        profile = memory_profile(time.time_ns())
        self._add_samples({"memory": profile}, self._sampler.read_memory(pid).live, _in_use)
        self._on_oom(pid, self._processes.get(pid, "").comm, profile)

    def request_stop(self, *_args) -> None:
        self._stop = True
        if self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        self._events.wake()

    def run(
        self,
        duration: Optional[float] = None,
        command: Optional[Sequence[str]] = None,
        on_drain: Optional[Callable[[], None]] = None,
    ) -> Recording:
        """Record until the duration ends, the command or every target process exits, or
        SIGINT/SIGTERM; whatever was collected is returned in every case. The duration
        counts from when sampling starts: loading the BPF program can take seconds when
        the compiler's libraries are out of the page cache."""
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        child = None
        try:
            self._sampler.start(self._events.on_event, self._events.on_stack)
            self._events.start()
            if self._tasks is not None:
                self._tasks.start()
            if self.config.kernel_stacks:
                self._kernel.load_in_background()
            self.profiles = self._new_profiles()  # from the first sample on
            self.sampling_since = time.monotonic()
            for pid in self.config.pids:  # read (and find CPython in) the targets before their first sample
                self._processes.snapshot(pid)
            if command:
                child = Command(command)
                if self._unwinding:
                    self._unwinding.skip_until_exec(child.pid)
                self._sampler.add_targets([child.pid])
                child.release()
            next_drain = self.sampling_since + DRAIN_INTERVAL_S
            end = self.sampling_since + duration if duration is not None else float("inf")
            while not self._stop:
                # Woken by events, a stop or what is due next: not on a short beat, as each
                # wake-up costs (0.1 ms of CPU on a cloud VM).
                due = min(next_drain, end, time.monotonic() + COMMAND_POLL_S if child is not None else end)
                self._apply(self._events.take(due - time.monotonic()))
                now = time.monotonic()
                if now >= end or self.failures.dead_thread:
                    break
                if child is not None and child.poll():
                    break
                if self.config.pids and not self._live_targets:
                    break
                if now >= next_drain:
                    self._drain()
                    while next_drain <= time.monotonic():  # on a fixed beat: an agent's cuts do not drift
                        next_drain += DRAIN_INTERVAL_S
                    if on_drain:
                        on_drain()
            self._events.stop()
            if self._tasks is not None:
                self._tasks.stop()
            self._drain()
            self._add_memory_held(live=True)
            losses = self.losses()
            offcpu = self._sampler.offcpu_stats()
            unwind_ends = self._sampler.unwind_ends()
        finally:
            self._events.stop()
            if self._tasks is not None:
                self._tasks.stop()
            if self._unwinding:
                self._unwinding.close()
            self._sampler.close()
            self._native.close()
            for interpreters in self._interpreters:
                interpreters.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        end_ns = time.time_ns()
        for profile in self.profiles.values():
            profile.duration_ns = end_ns - profile.start_ns
        if child is not None:
            child.finish()
        return Recording(
            profiles=self.profiles,
            losses=losses,
            offcpu=offcpu,
            num_processes=self._processes.num_seen,
            unreadable_processes=self._processes.num_unreadable,
            failures=self.failures.counts(),
            failure_examples=self.failures.examples(),
            dead_thread=self.failures.dead_thread,
            exit_status=child.exit_status if child else None,
            unwind=self._unwinding.stats() if self._unwinding else None,
            unwind_ends=unwind_ends,
            task_reads=(self._tasks.num_reads, self._tasks.num_task_samples) if self._tasks is not None else (0, 0),
        )
