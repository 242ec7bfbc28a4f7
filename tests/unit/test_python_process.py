"""One CPython process's thread discovery (symbolizer/interpreters/python/process.py),
against live processes under every installed interpreter and a stand-in for the BPF
side: the walker is told where the thread states are (for <= 3.10, once the pthread tid
offset is learnt), threads get their names, threads already away get the Python stack
they left with, and threads that end are told of."""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

from bpfprof.collector.probe.sampler import RawPythonFrame
from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.interpreters.python.code_objects import PythonSymbolizer
from bpfprof.symbolizer.interpreters.python.process import PythonProcess
from bpfprof.symbolizer.interpreters.python.threads import FRAME_SHIM
from bpfprof.symbolizer.process_memory import ProcessMemory
from test_python_thread_names import Running, process_layout

# Two threads that wait, each in its own function, and one that ends when told; every
# thread reports its tid (through gettid, syscall 186, before 3.8) and name, then the main
# thread waits on stdin.
SCRIPT = r"""
import ctypes, json, sys, threading

get_native_id = getattr(threading, "get_native_id", lambda: ctypes.CDLL(None).syscall(186))

reports = []
ready = threading.Barrier(4)
lock = threading.Lock()
lock.acquire()
finish = threading.Event()

def waits_on_lock():
    reports.append((get_native_id(), threading.current_thread().name))
    ready.wait()
    lock.acquire()

def waits_on_event():
    reports.append((get_native_id(), threading.current_thread().name))
    ready.wait()
    finish.wait()

for target, name in ((waits_on_lock, "locked-out"), (waits_on_event, "event-waiter"),
                     (waits_on_event, "short-lived")):
    threading.Thread(target=target, name=name, daemon=True).start()
ready.wait()
print(json.dumps({"main": get_native_id(), "threads": dict((name, tid) for tid, name in reports)}),
      flush=True)
sys.stdin.readline()
finish.set()
sys.stdin.readline()
"""


class Walker:
    """The BPF side as a PythonProcess sees it: every thread is away since its tid."""

    follows_offcpu_python = True

    def __init__(self) -> None:
        self.fields: List[Dict[str, int]] = []
        self.late: Dict[int, Tuple[int, Sequence[Tuple[int, int, int, int]]]] = {}

    def set_python_process(self, pid: int, fields: Dict[str, int]) -> None:
        self.fields.append(fields)

    def offcpu_start_ns(self, tid: int) -> Optional[int]:
        return tid

    def set_late_python_stack(self, tid: int, start_ns: int, frames) -> None:
        self.late[tid] = (start_ns, frames)


def functions(process: PythonProcess, frames) -> List[str]:
    code = [RawPythonFrame(c, i, k, False) for c, i, k, flags in frames if not flags & FRAME_SHIM]
    return [frame.name for frame, _ in process.frames(code, False)]


def test_threads_found_named_and_walked_where_they_wait(python):
    with Running(python, SCRIPT) as running:
        told = json.loads(running.first_line)
        memory = ProcessMemory(running.process.pid)
        layout = process_layout(memory, running.runtime, python)
        walker = Walker()
        process = PythonProcess(running.process.pid, layout, running.runtime, running.binary, memory,
                                PythonSymbolizer(), walker, Failures())
        try:
            process.scan()
            process.start_walker()
            threads = told["threads"]
            assert process.threads == {told["main"], *threads.values()}
            assert {process.thread_name(tid) for tid in threads.values()} == set(threads)
            fields = walker.fields[-1]
            assert fields["runtime"] == running.runtime
            assert fields["tstate_native_thread_id"] >= 0 or fields["pthread_tid"] >= 0
            assert set(walker.late) == process.threads
            assert functions(process, walker.late[threads["locked-out"]][1])[0] == "waits_on_lock"
            assert "waits_on_event" in functions(process, walker.late[threads["event-waiter"]][1])

            running.process.stdin.write(b"finish\n")
            running.process.stdin.flush()
            ended = threads["event-waiter"], threads["short-lived"]
            deadline = time.monotonic() + 30
            while any(os.path.exists(f"/proc/{running.process.pid}/task/{tid}") for tid in ended):
                assert time.monotonic() < deadline, "the threads told to finish did not end"
                os.sched_yield()
            process.scan()
            assert process.take_ended() == set(ended)
            assert process.take_ended() == set()
            process.drop_names(set(ended))
            assert process.thread_name(threads["locked-out"]) == "locked-out"
            assert process.thread_name(threads["short-lived"]) is None
        finally:
            process.close()
