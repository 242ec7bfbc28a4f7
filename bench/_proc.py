"""What the benchmarks share: starting the processes they measure, stopping them on
Ctrl-C or at the end, and reading their CPU time and memory from /proc."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUIET = 0.1  # a profiler using less than this share of a core has settled

# Everything started here runs in a session of its own, so Ctrl-C reaches only the
# benchmark, which then stops them (profilers still write their output).
running: List[subprocess.Popen] = []


def start(argv: List[str], **kwargs) -> subprocess.Popen:
    p = subprocess.Popen(argv, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)
    running.append(p)
    return p


def stop_all() -> None:
    for p in running:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGINT)
    deadline = time.monotonic() + 5
    for p in running:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    running.clear()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime of all its threads


def memory_mb(pid: int, field: str) -> float:
    """VmRSS: resident now; VmHWM: the peak so far (for bpfprof, while clang compiles)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def settle(profiler: subprocess.Popen, name: str, limit: float = 30) -> None:
    """Wait until the profiler has used less than QUIET of a core over two half-seconds
    (it has settled: compiled, attached, done reading what it found)."""
    deadline, quiet = time.monotonic() + limit, 0
    while quiet < 2:
        before = cpu_seconds(profiler.pid)
        time.sleep(0.5)
        if profiler.poll() is not None:
            raise RuntimeError(f"{name} exited at start")
        quiet = quiet + 1 if cpu_seconds(profiler.pid) - before < QUIET * 0.5 else 0
        if time.monotonic() > deadline:
            print(f"note: {name} still busy {limit:.0f} s after starting; timing anyway", file=sys.stderr)
            return


class ToolMissing(Exception):
    pass


def find_py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found:
        return found
    print("py-spy not found: installing it into this venv (pip install py-spy)", file=sys.stderr)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"])
    if pip.returncode == 0 and beside.exists():
        return str(beside)
    raise ToolMissing(f"py-spy is missing and could not be installed: try {sys.executable} -m pip install py-spy")


def run_main(main, name: str) -> None:
    """Run a benchmark's main(): Ctrl-C stops what it started, and a missing tool or a
    failed run is one line on stderr, not a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        stop_all()
        print("\ninterrupted: everything started was stopped", file=sys.stderr)
        sys.exit(130)
    except ToolMissing as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        stop_all()
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(1)


def check_python(python: str) -> None:
    """What a benchmark of CPython programs needs, or ToolMissing: root, the CPython to run
    and bpfprof."""
    if os.geteuid() != 0:
        raise ToolMissing("needs root (BPF, and py-spy reading another process): run it with sudo")
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise ToolMissing(f"no Python at {python}: pass --python /path/to/python3")
    if importlib.util.find_spec("bpfprof") is None:
        raise ToolMissing(f"bpfprof is not importable by {sys.executable}: run scripts/setup first")


def check_tools(python: str) -> str:
    """What the Python benchmarks beside py-spy need (check_python), and py-spy, whose path
    is returned."""
    check_python(python)
    return find_py_spy()


def add_build_option(parser) -> None:
    parser.add_argument("--build", action="append", default=[], metavar="NAME=PYTHON",
                        help="also measure another bpfprof, the one PYTHON runs as `-m bpfprof` (another "
                             "checkout's .venv/bin/python), listed as 'bpfprof NAME'; repeatable")


def bpfprof_builds(builds: List[str]) -> Dict[str, List[str]]:
    """The command that runs each bpfprof measured: this one, then each --build."""
    commands = {"bpfprof": [sys.executable, "-m", "bpfprof"]}
    for build in builds:
        name, _, python = build.partition("=")
        if not name or not os.access(python, os.X_OK):
            raise ToolMissing(f"--build {build}: expected NAME=PYTHON, PYTHON an executable")
        commands[f"bpfprof {name}"] = [python, "-m", "bpfprof"]
    return commands


class BpfRun(NamedTuple):
    type: str  # the program's type, as bpftool names it: perf_event, tracepoint...
    run_ns: int  # time spent in the program (tail calls it made included)
    runs: int


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """The kernel's accounting of BPF run time (kernel.bpf_stats_enabled), on while this lasts."""
    switch = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = switch.read_text().strip()
    switch.write_text("1")
    try:
        yield
    finally:
        switch.write_text(before)


def bpf_runs() -> Dict[int, BpfRun]:
    """Program id -> its run time and runs so far, of every BPF program loaded."""
    shown = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise ToolMissing(f"bpftool prog show failed: {shown.stderr.strip()} (apt-get install bpftool)")
    return {p["id"]: BpfRun(p["type"], p.get("run_time_ns", 0), p.get("run_cnt", 0)) for p in json.loads(shown.stdout)}


def bpf_spent(before: Dict[int, BpfRun], after: Dict[int, BpfRun], new_since: Dict[int, BpfRun],
              kind: str = "") -> BpfRun:
    """Run time and runs between two bpf_runs() of the programs loaded after `new_since`
    was taken (one profiler's), of one type if given."""
    ns = runs = 0
    for program, end in after.items():
        if program not in new_since and program in before and (not kind or end.type == kind):
            ns += end.run_ns - before[program].run_ns
            runs += end.runs - before[program].runs
    return BpfRun(kind, ns, runs)
