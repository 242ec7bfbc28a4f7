"""Memory and page faults through real BPF: a C program and a Python program that hold,
churn, map and touch known amounts in known functions, and a program the OOM killer ends
in a memory-limited cgroup made for it."""

from __future__ import annotations

import signal
import subprocess
from typing import Dict

import pytest

from bpfprof.collector.output.pprof import read_pprof
from conftest import FIXTURES, bpfprof_command, profiler_has_read, pyenv_python
from pprof_check import check_with_go
from samples import read_samples

pytestmark = pytest.mark.usefixtures("bpf_ready")

MiB = 1 << 20
PAGE = 4096
MEMORY_TYPES = ["alloc_objects", "alloc_space", "inuse_objects", "inuse_space"]


def under(path, function: str) -> Dict[str, int]:
    """Each sample type's total over the stacks that pass through function."""
    profile = read_pprof(str(path))
    types = [profile.string_table[t.type] for t in profile.sample_type]
    totals = dict.fromkeys(types, 0)
    for sample in read_samples(path):
        if function in sample.functions:
            for kind, value in zip(types, sample.values):
                totals[kind] += value
    return totals


def sample_types(path):
    profile = read_pprof(str(path))
    return ([(profile.string_table[t.type], profile.string_table[t.unit]) for t in profile.sample_type],
            profile.string_table[profile.default_sample_type])


class Recording:
    """bpfprof record -p of a fixture that says "ready PID", works when told to on its
    stdin, says "done ..." and exits when its stdin closes. The profiler reads the fixture
    (as it does a -p target at once) before it is told to work, so that every stack of
    its work is whole."""

    def __init__(self, record_args, fixture_argv, python=False, before_recording=lambda pid: None):
        """before_recording(pid) is called once the fixture is ready, before bpfprof starts."""
        self.profiler = None
        self.fixture = subprocess.Popen(fixture_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        word, pid = self.fixture.stdout.readline().split()
        assert word == "ready"
        self.pid = int(pid)
        before_recording(self.pid)
        self.profiler = subprocess.Popen([*bpfprof_command(), "record", *record_args, "-p", pid],
                                         stderr=subprocess.PIPE, text=True)
        self._python = python

    def work(self) -> str:
        """Once the profiler has read the fixture, tells it to work; what it says when done."""
        profiler_has_read(self.profiler, self.pid, self._python)
        self.fixture.stdin.write("go\n")
        self.fixture.stdin.flush()
        return self.fixture.stdout.readline()

    def stop_profiler(self) -> str:
        """SIGINT to the profiler, while the fixture still holds what it has; its stderr."""
        self.profiler.send_signal(signal.SIGINT)
        _, stderr = self.profiler.communicate(timeout=120)
        assert self.profiler.returncode == 0, stderr
        return stderr

    def end(self) -> str:
        """The fixture's stdin closes and it exits (if it has not), then the profiler ends
        with it; the profiler's stderr."""
        self.fixture.stdin.close()
        self.fixture.wait(timeout=60)
        _, stderr = self.profiler.communicate(timeout=120)
        return stderr

    def kill(self) -> None:
        for process in (self.fixture, self.profiler):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def recording():
    started = []

    def start(*args, **kwargs) -> Recording:
        started.append(Recording(*args, **kwargs))
        return started[-1]

    yield start
    for r in started:
        r.kill()


def test_c_memory_held_churned_and_mapped_and_pages_touched(build_c, recording, tmp_path):
    """The fixture exits before the recording ends: in use is what it held when it exited."""
    r = recording(["-t", "memory", "-t", "faults", "-o", str(tmp_path / "out.pb.gz")], [build_c("memory")])
    assert r.work() == "done\n"
    stderr = r.end()
    assert (r.fixture.returncode, r.profiler.returncode) == (0, 0), stderr
    memory, faults = tmp_path / "out.memory.pb.gz", tmp_path / "out.faults.pb.gz"
    assert sample_types(memory) == ([(t, "count" if t.endswith("objects") else "bytes") for t in MEMORY_TYPES],
                                    "inuse_space")
    assert sample_types(faults) == ([("faults", "count"), ("fault_space", "bytes")], "fault_space")

    held = under(memory, "hold_buffers")  # each buffer: 4 MiB and a page for malloc's header
    assert (held["alloc_objects"], held["alloc_space"]) == (50, 50 * (4 * MiB + PAGE)), held
    assert (held["inuse_objects"], held["inuse_space"]) == (50, 50 * (4 * MiB + PAGE)), held
    heap = under(memory, "grow_heap")  # brk, in steps of malloc's choosing
    assert heap["inuse_space"] == pytest.approx(64 * MiB, rel=0.1), heap
    churned = under(memory, "churn")
    assert (churned["alloc_objects"], churned["alloc_space"]) == (2000, 2000 * MiB), churned
    assert (churned["inuse_objects"], churned["inuse_space"]) == (0, 0), churned
    region = under(memory, "map_region")
    assert (region["alloc_objects"], region["alloc_space"], region["inuse_space"]) == (1, 256 * MiB, 256 * MiB)
    partial = under(memory, "partial_unmap")
    assert (partial["alloc_objects"], partial["alloc_space"], partial["inuse_space"]) == (1, 64 * MiB, 32 * MiB)
    grown = under(memory, "grow_region")  # the mapping, then its growth
    assert (grown["alloc_objects"], grown["alloc_space"], grown["inuse_space"]) == (2, 48 * MiB, 48 * MiB)
    shrunk = under(memory, "shrink_region")
    assert (shrunk["alloc_space"], shrunk["inuse_space"]) == (32 * MiB, 8 * MiB), shrunk
    assert under(memory, "touch_region")["alloc_space"] == 0
    committed = under(memory, "commit_reservation")  # the parts made writable, not the reservation
    assert (committed["alloc_objects"], committed["alloc_space"], committed["inuse_space"]) == (3, 48 * MiB, 48 * MiB)
    spanned = under(memory, "unmap_span")
    assert (spanned["alloc_objects"], spanned["alloc_space"], spanned["inuse_space"]) == (3, 48 * MiB, 16 * MiB)
    released = under(memory, "release_heap")
    assert released["alloc_space"] >= 32 * MiB and released["inuse_space"] <= 256 * 1024, released

    # Faults are sampled 1 in 64: 25600 faults give 400 samples on average, 20 the
    # standard deviation; 25% off is 5 standard deviations.
    touched = under(faults, "touch_region")
    assert touched["fault_space"] == pytest.approx(100 * MiB, rel=0.25), touched
    assert touched["fault_space"] == touched["faults"] * PAGE
    assert under(faults, "hold_buffers")["fault_space"] == pytest.approx(200 * MiB, rel=0.25)
    assert under(faults, "map_region")["fault_space"] <= MiB
    assert under(faults, "churn")["fault_space"] <= MiB
    check_with_go(memory, expect=["hold_buffers", "partial_unmap"])
    check_with_go(faults, expect=["touch_region"])


def test_fault_period_one_counts_every_fault(build_c, recording, tmp_path):
    out = tmp_path / "faults.pb.gz"
    r = recording(["-t", "faults", "--fault-period", "1", "-o", str(out)], [build_c("memory")])
    assert r.work() == "done\n"
    stderr = r.end()
    assert (r.fixture.returncode, r.profiler.returncode) == (0, 0), stderr
    # One fault a page, and now and then one more on a page already touched (the kernel
    # may take a page away for a moment, to move it, say, leaving it absent): at most 1%.
    touched = under(out, "touch_region")
    assert 100 * MiB // PAGE <= touched["faults"] <= 100 * MiB // PAGE * 1.01, touched
    assert touched["fault_space"] == touched["faults"] * PAGE
    held = under(out, "hold_buffers")["faults"]  # the buffers and malloc's headers: 1025 pages each
    assert 50 * 1025 <= held <= 50 * 1025 * 1.01
    assert under(out, "map_region")["faults"] == 0
    check_with_go(out, expect=["touch_region"])


@pytest.mark.parametrize("minor", [8, 12, 13])
def test_python_small_objects_in_use_at_the_end(minor, recording, tmp_path):
    """Recorded with -p and stopped while the process still holds its objects: in use
    is what is mapped when the recording ends. The arenas of the objects (1 MiB each
    from 3.10, 256 KiB before) and the list's array are mapped by build_small_objects."""
    out = tmp_path / "python.pb.gz"
    script = FIXTURES / "python" / "memory_small_objects.py"
    r = recording(["-t", "memory", "-o", str(out)], [pyenv_python(minor), str(script)], python=True)
    word, size = r.work().split()
    assert word == "done"
    stderr = r.stop_profiler()
    built = under(out, "build_small_objects")
    assert built["inuse_space"] == pytest.approx(int(size), rel=0.25), (built, size, stderr)
    assert built["alloc_space"] >= built["inuse_space"]
    check_with_go(out, expect=["build_small_objects"])


def test_oom_victim_in_use_written_at_once(build_c, memory_cgroup, recording, tmp_path):
    """fill_memory mallocs and writes 4 MiB buffers in a 64 MiB cgroup until the OOM
    killer ends it; what it held then is written beside the output."""
    cgroup = memory_cgroup(64 * MiB)
    out = tmp_path / "out.pb.gz"
    r = recording(["-t", "memory", "-o", str(out)], [build_c("memory"), "fill"], before_recording=cgroup.add)
    assert r.work() == ""  # killed before it is done
    stderr = r.end()
    assert (r.fixture.returncode, r.profiler.returncode) == (-signal.SIGKILL, 0), stderr
    victim = tmp_path / f"out.oom-{r.pid}.memory.pb.gz"
    assert f"bpfprof: the OOM killer chose {r.pid} (memory): its memory in use -> {victim}" in stderr
    samples = read_samples(victim)
    types = [t for t, _ in sample_types(victim)[0]]
    inuse = types.index("inuse_space")
    top = max(samples, key=lambda s: s.values[inuse])
    assert "fill_memory" in top.functions, top.functions
    filled = under(victim, "fill_memory")["inuse_space"]
    assert filled >= 0.9 * sum(s.values[inuse] for s in samples)
    assert filled >= 56 * MiB  # the limit, less what the rest of the process holds
    assert out.exists()  # the recording itself, as ever
    check_with_go(victim, expect=["fill_memory"])
