"""Process events read on a thread of their own.

A process that lives 30 ms is gone before a busy drain ends, so the sampler's ring
buffers are polled on a separate thread, which reads the process's /proc files as each
event arrives, and lets each kind of interpreter recognise a new process (or drop one at
its exec) and read what must be read while it runs: the names of new threads, the code
objects of new stacks. The recorder
applies the events, in order, on its own thread.
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import List, Optional, Sequence, Tuple

from bpfprof.collector.processes.interpreters import InterpreterProcesses
from bpfprof.collector.processes.table import ProcFiles, read_proc_files
from bpfprof.collector.probe.sampler import ProcessEvent, Sampler
from bpfprof.symbolizer.containment import Failures

# The ring buffers wake the thread as each event comes, so the poll's timeout only sets
# how often interpreters with work pending (new threads to name) get to it, and how soon
# stop() is answered. Every wake-up costs: about 0.1 ms of CPU on a cloud VM.
_SCAN_POLL_MS = 50
_IDLE_POLL_MS = 250
_SWITCH_INTERVAL_S = 0.001
# Events after which the process's maps are worth reading at once. Not an exec: the new
# image's libraries are not mapped yet, and most processes are never sampled at all (its
# first sample sends PROCESS_SEEN).
_READ_EARLY = frozenset({"PROCESS_SEEN"})

Arrival = Tuple[ProcessEvent, Optional[ProcFiles]]


class EventReader:
    """Start the sampler with `on_event` as its callback, then start() this; take()
    returns what arrived, each event with the /proc files read when it came."""

    def __init__(self, sampler: Sampler, failures: Failures, interpreters: Sequence[InterpreterProcesses] = ()) -> None:
        self._sampler = sampler
        self._failures = failures
        self._interpreters = interpreters
        # A SimpleQueue: wake() puts to it from a signal handler.
        self._arrived: "queue.SimpleQueue[Optional[Arrival]]" = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def on_event(self, event: ProcessEvent) -> None:
        if event.kind == "PYTHON_THREAD":
            for interpreters in self._interpreters:
                interpreters.on_thread_found(event.pid)
            return
        early = None
        with self._failures.contain("process", str(event.pid)):
            early = read_proc_files(event.pid) if event.kind in _READ_EARLY else None
            for interpreters in self._interpreters:
                if event.kind == "PROCESS_EXEC":
                    interpreters.on_exec(event.pid)
                elif early is not None:
                    interpreters.on_first_read(event.pid, early)
        self._arrived.put((event, early))  # whatever happened above, the recorder hears of it

    def on_stack(self, pid: int, frames: Sequence) -> None:
        with self._failures.contain("process", str(pid)):
            for interpreters in self._interpreters:
                interpreters.on_stack(pid, frames)

    def start(self) -> None:
        # A drain keeps the recorder's thread busy for up to a second; let this thread
        # have the interpreter within a millisecond of an event rather than five.
        sys.setswitchinterval(_SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._failures.keep_running, args=("events", self._run),
                                        name="bpfprof-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                busy = any(interpreters.has_work() for interpreters in self._interpreters)
                self._poll(_SCAN_POLL_MS if busy else _IDLE_POLL_MS)
        finally:
            self.wake()  # a recorder waiting in take() looks at the failures again

    def _poll(self, timeout_ms: int) -> None:
        self._sampler.poll(timeout_ms)
        for interpreters in self._interpreters:
            interpreters.work()

    def take(self, timeout: float) -> List[Arrival]:
        """What arrived so far, waiting up to timeout seconds for the first (or a wake())."""
        try:
            arrivals = [self._arrived.get(timeout=timeout) if timeout > 0 else self._arrived.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                arrivals.append(self._arrived.get_nowait())
            except queue.Empty:
                return [a for a in arrivals if a is not None]

    def wake(self) -> None:
        """End a take() that is waiting; safe in a signal handler."""
        self._arrived.put(None)

    def stop(self) -> None:
        """Stop the thread; events still in the ring buffer are read on this one."""
        if self._thread is not None:
            self._stopping.set()
            self._thread.join()
            self._thread = None
            self._poll(0)
