"""The BPF program and the collector agree: the layouts the collector reads and writes are
those bcc compiled from bpf/, and the collector's walk of a CPython thread gives the very
frames, code checks and stack key that the BPF walker gives."""

from __future__ import annotations

import ctypes
import subprocess
import time

import pytest

from bpfprof.bpf import BUFFERED_MAPS
from bpfprof.collector.probe import sampler as probe
from bpfprof.collector.probe.kernel_headers import find_kernel_headers
from bpfprof.collector.probe.sampler import Sampler, SamplerConfig, python_stack_key
from bpfprof.collector.processes.python import PYTHON_DATA_SYMBOLS, PythonProcesses
from bpfprof.collector.processes.table import Process, parse_maps
from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.interpreters.python.layouts import LAYOUTS
from bpfprof.symbolizer.interpreters.python.threads import (FRAME_SHIM, STACK_DEPTH, thread_states, walk_frames,
                                                            walker_fields)
from bpfprof.symbolizer.native.symbolizer import NativeSymbolizer
from conftest import pyenv_python

pytestmark = pytest.mark.usefixtures("bpf_ready")

# Blocks twice on stdin: first while the collector reads the process, then inside
# waits_here(), where the BPF walker takes its stack as it leaves the CPU.
BLOCKING_SCRIPT = """
import sys
def waits_here():
    sys.stdin.readline()
def caller():
    waits_here()
print("ready", flush=True)
sys.stdin.readline()
caller()
"""


@pytest.fixture
def sampler(monkeypatch):
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "")  # the sampler sets it: restored for the other tests
    started = []

    def start(config: SamplerConfig) -> Sampler:
        started.append(Sampler(config, find_kernel_headers()))
        started[-1].start(lambda event: None)
        return started[-1]

    yield start
    for s in started:
        s.close()


def test_collector_layouts_are_the_compiled_ones(sampler):
    bpf = sampler(SamplerConfig(block=True, wall=True, python=True, native_unwind=True))._bpf
    assert ctypes.sizeof(bpf["unwind_rows"].Leaf) == probe._UNWIND_ROW_SIZE
    assert ctypes.sizeof(bpf["unwind_mappings"].Leaf) == probe._UNWIND_MAPPING_SIZE
    assert ctypes.sizeof(bpf["native_stacks_0"].Leaf) == probe._NATIVE_STACK_SIZE
    assert len(bpf["native_stacks_0"].Leaf().pcs) == probe.NATIVE_STACK_DEPTH
    frames = type(bpf["python_stacks_0"].Leaf().frames)
    assert len(frames()) == STACK_DEPTH
    assert probe._unpacker(frames._type_).size == ctypes.sizeof(frames._type_)
    assert [name for name, _ in frames._type_._fields_] == ["code", "instr", "check", "flags"]
    fields = {name for name, _ in bpf["python_processes"].Leaf._fields_ if not name.startswith("__pad")}
    assert fields == set(walker_fields(LAYOUTS[(3, 12)], 0, None))
    assert bpf["losses"].max_entries == probe.NUM_LOSS_REASONS
    assert bpf["unwind_ends"].max_entries == len(probe.UNWIND_ENDS)
    assert bpf["offcpu_stats"].max_entries == len(probe.OFFCPU_STATS)


def test_every_buffered_pair_is_in_its_array(sampler):
    """Samples reach the maps of each buffer through an array of the pair, which the
    collector fills once the program is loaded (by map ids, read back)."""
    bpf = sampler(SamplerConfig(block=True, wall=True))._bpf
    assert {"counts", "stacks", "python_stacks", "native_stacks", "block", "wall"} <= set(BUFFERED_MAPS)
    for pair in BUFFERED_MAPS:
        ids = [bpf[pair][ctypes.c_int(buffer)].value for buffer in (0, 1)]
        assert 0 not in ids and ids[0] != ids[1], pair


def test_features_that_are_off_keep_one_entry_maps(sampler):
    bpf = sampler(SamplerConfig(python=False, native_unwind=False))._bpf
    off = ("python_processes", "python_threads", "python_stacks_0", "unwind_rows", "unwind_mappings",
           "native_stacks_1", "offcpu_starts", "offcpu_stacks", "block_0", "wall_1")
    assert {name: bpf[name].max_entries for name in off} == dict.fromkeys(off, 1)
    assert bpf["counts_0"].max_entries == SamplerConfig().map_size


def test_collector_and_bpf_walk_a_blocked_thread_alike(sampler):
    """The collector walks a thread that is away for the frames it left with (for blocks
    that began before the process was read); it must record them as the BPF walker does,
    code checks and stack key included, or those frames would not be named."""
    s = sampler(SamplerConfig(cpu=False, block=True, python=True, native_unwind=False))
    child = subprocess.Popen([pyenv_python(12), "-c", BLOCKING_SCRIPT], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    native = NativeSymbolizer(PYTHON_DATA_SYMBOLS)
    pythons = PythonProcesses(s, native, Failures())
    try:
        assert child.stdout.readline() == "ready\n"
        with open(f"/proc/{child.pid}/maps") as maps:
            pythons.on_snapshot(Process(child.pid, "python3.12", parse_maps(child.pid, maps.read())[0]))
        interpreter = pythons.get(child.pid)
        assert interpreter is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        starts = s._bpf["offcpu_starts"]
        deadline = time.monotonic() + 30
        while True:  # until the thread is away again, in waits_here(), with the stack BPF took
            start = starts.get(starts.Key(child.pid))
            stack = start and _frames_of(s, start.key.python_stack)
            if stack and len(stack) > 2:
                break
            assert time.monotonic() < deadline, "the BPF walker took no stack in waits_here()"
            time.sleep(0.01)
        (tstate, _, _), = thread_states(interpreter.memory, interpreter.layout, interpreter.runtime)
        walked = walk_frames(interpreter.memory, interpreter.layout, tstate)
        assert walked == stack
        assert python_stack_key(walked) == start.key.python_stack
        code = [probe.RawPythonFrame(c, i, k, False) for c, i, k, flags in walked if not flags & FRAME_SHIM]
        names = [frame.name for frame, _ in interpreter.frames(code, False)]
        assert names[:2] == ["waits_here", "caller"]
    finally:
        child.kill()
        child.wait()
        pythons.close()
        native.close()


def _frames_of(s: Sampler, key: int):
    stacks = s._bpf["offcpu_python_stacks"]
    stack = stacks.get(stacks.Key(key)) if key else None
    if stack is None:
        return None
    return [(f.code, f.instr, f.check, f.flags) for f in stack.frames[:stack.depth]]
