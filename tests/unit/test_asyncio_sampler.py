"""The collector's sampler of asyncio tasks on a live CPython (pyenv 3.12, and the sid
chroot's 3.14 and 3.15, whose layout it finds in the binaries mapped): the time between
two reads goes half to where each task awaited at the first and half to where at the
second, at its await chain on its loop's thread; a process no longer walked is let go,
its tasks keeping the half before."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import SID_MINORS, pyenv_python, sid_python
from test_asyncio_tasks import SCRIPT
from test_python_thread_names import Running, process_layout

from bpfprof.collector.processes import asyncio_tasks
from bpfprof.collector.processes.asyncio_tasks import TaskSampler
from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.interpreters.python.code_objects import PythonSymbolizer

MS = 1_000_000


@pytest.mark.parametrize("kind, minor", [pytest.param("pyenv", 12, id="pyenv-3.12"),
                                         *(pytest.param("sid", m, id=f"sid-3.{m}") for m in SID_MINORS)])
def test_each_read_gives_each_awaiting_task_its_time(kind, minor):
    python = sid_python(minor) if kind == "sid" else pyenv_python(minor)
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
    assert (sampler.num_reads, sampler.num_task_samples) == (4, 2 * 4)  # the last two read no process
    by_task = {wait.task: (wait, waited) for wait, waited in waits.items()}
    assert by_task.keys() == {"fetcher", "sleeper", reported["unnamed"], "remote"}
    fetcher, waited = by_task["fetcher"]
    assert [frame.name for frame in fetcher.stack] == ["sleep", "fetch_page", "fetcher"]
    assert waited == 55 * MS and {waited} == {waited for _, waited in by_task.values()}  # 25 + 15 + 15
    assert set(after.values()) == {5 * MS} and set(after) == set(waits)
    assert fetcher.pid == fetcher.tid == pid
    remote, _ = by_task["remote"]
    assert remote.pid == pid != remote.tid


@pytest.mark.parametrize("minor", SID_MINORS, ids=lambda m: f"sid-3.{m}")
def test_asyncio_imported_late_is_found(minor, monkeypatch):
    """3.14 maps its _asyncio module, which holds the offsets, at the first import of
    asyncio: a process read before has no tasks, and is looked at again (here at once)."""
    monkeypatch.setattr(asyncio_tasks, "LOOK_AGAIN_S", 0.0)
    monkeypatch.setattr(asyncio_tasks, "LOOK_AGAIN_AT_MOST_S", 0.0)
    python = sid_python(minor)
    late = f"import sys\nprint(1, flush=True)\nsys.stdin.readline()\nexec({SCRIPT!r})"
    with Running(python, late) as running:
        pid = running.process.pid
        interpreter = SimpleNamespace(pid=pid, layout=process_layout(running.memory, running.runtime, python),
                                      runtime=running.runtime, symbols=PythonSymbolizer())
        sampler = TaskSampler(SimpleNamespace(interpreters={pid: interpreter}), Failures(), hz=99)
        sampler.sample(0.01)
        before, _ = sampler.take()
        running.process.stdin.write(b"\n")
        running.process.stdin.flush()
        assert running.process.stdout.readline()  # its tasks await
        sampler.sample(0.01)
        after, _ = sampler.take()
        sampler.stop()
    assert before == {}
    assert {wait.task for wait in after} >= {"fetcher", "sleeper", "remote"}
