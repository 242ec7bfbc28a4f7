"""The collector's sampler of asyncio tasks on a live CPython (pyenv 3.12): the time between
two reads goes half to where each task awaited at the first and half to where at the
second, at its await chain on its loop's thread; a process no longer walked is let go,
its tasks keeping the half before."""

from __future__ import annotations

import json
from types import SimpleNamespace

from conftest import pyenv_python
from test_asyncio_tasks import SCRIPT
from test_python_thread_names import Running, process_layout

from bpfprof.collector.processes.asyncio_tasks import TaskSampler
from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.interpreters.python.code_objects import PythonSymbolizer

MS = 1_000_000


def test_each_read_gives_each_awaiting_task_its_time():
    python = pyenv_python(12)
    with Running(python, SCRIPT) as running:
        reported = json.loads(running.first_line)
        pid = running.process.pid
        interpreter = SimpleNamespace(pid=pid, layout=process_layout(running.memory, running.runtime, python),
                                      runtime=running.runtime, symbols=PythonSymbolizer())
        processes = SimpleNamespace(interpreters={pid: interpreter})  # as PythonProcesses holds them
        failures = Failures()
        sampler = TaskSampler(processes, failures, hz=99)
        sampler.sample(0.05)
        sampler.sample(0.03)
        waits, dropped = sampler.take()
        processes.interpreters.clear()
        sampler.sample(0.01)
        after, _ = sampler.take()
        sampler.sample(0.01)
        assert sampler.take() == ({}, 0)
        assert not sampler._followed  # its memory closed
    assert dropped == 0 and not failures.counts()
    by_task = {wait.task: (wait, waited) for wait, waited in waits.items()}
    assert by_task.keys() == {"fetcher", "sleeper", reported["unnamed"], "remote"}
    fetcher, waited = by_task["fetcher"]
    assert [frame.name for frame in fetcher.stack] == ["sleep", "fetch_page", "fetcher"]
    assert waited == 55 * MS and {waited} == {waited for _, waited in by_task.values()}  # 25 + 15 + 15
    assert set(after.values()) == {5 * MS} and set(after) == set(waits)
    assert fetcher.pid == fetcher.tid == pid
    remote, _ = by_task["remote"]
    assert remote.pid == pid != remote.tid
