"""asyncio tasks read out of live CPython processes (3.11-3.13 under pyenv, 3.14 and 3.15
of the sid chroot, read with the offsets they publish): a script starts
named tasks awaiting known coroutines, on the main thread's loop and on a second loop in a
thread, and prints the idents of both threads; `TaskReader` must find each awaiting task
with its name, its loop's thread and its await chain, leave out the running one, and stay
within a bounded number of reads. Also: garbage where the tasks should be gives a clean
error or nothing, never a hang."""

from __future__ import annotations

import json
import random

import pytest
from conftest import SID_MINORS, pyenv_python, sid_python
from test_python_thread_names import CountingMemory, Running, process_layout

from bpfprof.collector.processes.asyncio_tasks import published_asyncio_layout
from bpfprof.symbolizer.interpreters.python.asyncio_layouts import ASYNCIO_LAYOUTS, asyncio_layout_for
from bpfprof.symbolizer.interpreters.python.asyncio_tasks import TaskReader
from bpfprof.symbolizer.interpreters.python.code_objects import PythonSymbolizer
from bpfprof.symbolizer.process_memory import UnreadableMemory

MINORS = tuple(sorted(minor for _, minor in ASYNCIO_LAYOUTS))
PYTHONS = [*(pytest.param("pyenv", m, id=f"pyenv-3.{m}") for m in MINORS),
           *(pytest.param("sid", m, id=f"sid-3.{m}") for m in SID_MINORS)]

# The newest of each kind of reading: tabled, and from the offsets the process publishes.
NEWEST = [pytest.param("pyenv", MINORS[-1], id=f"pyenv-3.{MINORS[-1]}"),
          pytest.param("sid", SID_MINORS[-1], id=f"sid-3.{SID_MINORS[-1]}")]


def python_of(kind: str, minor: int) -> str:
    return sid_python(minor) if kind == "sid" else pyenv_python(minor)


SCRIPT = r"""
import asyncio, json, sys, threading

async def fetch_page():
    await asyncio.sleep(3600)

async def fetcher():
    await fetch_page()

async def nap():
    await asyncio.sleep(3600)

async def sleeper():
    await nap()

def remote_loop(ready):
    async def serve():
        await asyncio.sleep(3600)
    loop = asyncio.new_event_loop()
    loop.create_task(serve(), name="remote")
    loop.call_soon(ready.set)
    loop.run_forever()

async def main():
    ready = threading.Event()
    threading.Thread(target=remote_loop, args=(ready,), name="loop-thread", daemon=True).start()
    tasks = [asyncio.create_task(fetcher(), name="fetcher"), asyncio.create_task(sleeper(), name="sleeper"),
             asyncio.create_task(nap())]
    await asyncio.sleep(0.01)
    await asyncio.get_running_loop().run_in_executor(None, ready.wait)
    idents = {t.name: t.ident for t in threading.enumerate()}
    print(json.dumps({"main": idents["MainThread"], "remote": idents["loop-thread"], "unnamed": tasks[2].get_name()}),
          flush=True)
    sys.stdin.read()  # main() runs until stdin closes, its loop's other tasks awaiting

asyncio.run(main(), debug=False)
"""

# A read of a process takes, about: a few for sys.modules (searched once), one per task
# for its weak reference, one for the task, and per coroutine of its chain four (the
# coroutine, its code object twice, what it awaits), and for each loop a few dozen (its
# _thread_id attribute).
READS_PER_MODULE = 3
READS_PER_TASK = 4 + 4 * 3
READS_PER_LOOP = 64


def task_reader(running: Running, python: str, memory) -> TaskReader:
    """A reader of the running script's tasks, through `memory`: tabled up to 3.13, from
    the offsets the process publishes from 3.14 on."""
    layout = process_layout(running.memory, running.runtime, python)
    asyncio = asyncio_layout_for(layout.version) or published_asyncio_layout(running.memory, running.runtime)
    assert asyncio is not None
    return TaskReader(memory, layout, asyncio, running.runtime)


def chains(reader: TaskReader, symbols: PythonSymbolizer):
    """{task name: (loop thread, [qualname of each coroutine, innermost first])}."""
    found = {}
    for task in reader.awaiting_tasks():
        frames = [symbols.get_frame(reader.memory, reader.layout, code, instr, check) for code, instr, check in task.chain]
        found[task.name] = (task.loop_thread, [f.name for f in frames], frames)
    return found


@pytest.mark.parametrize("kind, minor", PYTHONS)
def test_awaiting_tasks_of_a_live_process(kind, minor):
    python = python_of(kind, minor)
    with Running(python, SCRIPT) as running:
        reported = json.loads(running.first_line)
        memory = CountingMemory(running.memory, 1 << 20)
        reader = task_reader(running, python, memory)
        found = chains(reader, PythonSymbolizer())
        first_reads, memory.reads = memory.reads, 0
        again = chains(reader, PythonSymbolizer())
    main, remote = reported["main"], reported["remote"]
    assert found.keys() == {"fetcher", "sleeper", reported["unnamed"], "remote"}  # main() runs: left out
    assert found["fetcher"][:2] == (main, ["sleep", "fetch_page", "fetcher"])
    assert found["sleeper"][:2] == (main, ["sleep", "nap", "sleeper"])
    assert found[reported["unnamed"]][:2] == (main, ["sleep", "nap"])
    assert found["remote"][:2] == (remote, ["sleep", "remote_loop.<locals>.serve"])
    fetch_page = found["fetcher"][2][1]
    assert fetch_page.file == "<string>" and fetch_page.line == 5  # at its await
    assert {name: chain[:2] for name, chain in again.items()} == {name: chain[:2] for name, chain in found.items()}
    assert memory.reads <= 2 * READS_PER_LOOP + 4 * READS_PER_TASK + 16  # sys.modules is not searched again
    assert first_reads <= memory.reads + READS_PER_MODULE * 2000


@pytest.mark.parametrize("kind, minor", NEWEST)
def test_a_process_without_asyncio(kind, minor):
    python = python_of(kind, minor)
    with Running(python, "import sys; print(1, flush=True); sys.stdin.read()") as running:
        layout = process_layout(running.memory, running.runtime, python)
        if layout.version >= (3, 14):
            # The interpreter's own offsets are there (3.15 builds _asyncio in), no tasks are.
            asyncio = published_asyncio_layout(running.memory, running.runtime)
        else:
            asyncio = asyncio_layout_for(layout.version)
        assert TaskReader(running.memory, layout, asyncio, running.runtime).awaiting_tasks() == []


@pytest.mark.parametrize("kind, minor", NEWEST)
def test_a_process_that_is_gone(kind, minor):
    python = python_of(kind, minor)
    with Running(python, SCRIPT) as running:
        reader = task_reader(running, python, running.memory)
        running.process.kill()
        running.process.wait()
        with pytest.raises(UnreadableMemory):
            reader.awaiting_tasks()


class ScribbledMemory(CountingMemory):
    """A live process's memory with the words of every object past the interpreter's own
    lists (tasks, coroutines, sets, frames) replaced by random ones from a fixed seed."""

    def __init__(self, inner, budget, seed):
        super().__init__(inner, budget)
        self.random = random.Random(seed)

    def read(self, address, size):
        data = super().read(address, size)
        if self.reads > 40:  # sys.modules and the interpreter read right, then garbage
            return bytes(self.random.getrandbits(8) for _ in range(size))
        return data


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("kind, minor", NEWEST)
def test_garbage_gives_an_error_or_nothing_within_bounded_reads(kind, minor, seed):
    python = python_of(kind, minor)
    with Running(python, SCRIPT) as running:
        memory = ScribbledMemory(running.memory, 200_000, seed)
        reader = task_reader(running, python, memory)
        try:
            tasks = reader.awaiting_tasks()
        except UnreadableMemory:
            return
        assert all(len(task.chain) <= 64 for task in tasks)
