"""What reading asyncio tasks costs in `bpfprof record -t wall -p PID`: an asyncio program
of N tasks that mostly await asyncio.sleep, with no profiler and under bpfprof.

Each of N tasks (--tasks, default 10, 100 and 1000) runs a fixed number of steps: a little
Python work, then `await asyncio.sleep(0.1)` two coroutines down, so at any moment nearly
every task awaits. The program times the steps itself, wall clock and its own CPU, after a
second of the same steps that bpfprof has to find the tasks in. On each CPython (--python,
repeatable; by default pyenv's 3.12 and the sid chroot's 3.14, when present) each N runs
with no profiler and under `bpfprof record -t wall -F 99 -p PID`, in turn, --rounds times.

Printed per CPython and N: the program's wall time and CPU time for the steps and their
slowdown under bpfprof (the median of the rounds), bpfprof's CPU while the steps ran (a
share of one core), the time its BPF programs ran (a share of one core; the kernel's
bpf_stats), and the awaiting tasks its asyncio sampler saw per second while there were
tasks, from its summary, and that over N: the sampler's reads per second (at most 99, and
fewer past some N, as it paces itself to about 2% of a CPU).

    sudo .venv/bin/python bench/asyncio_overhead.py [--rounds 3] [--seconds 10] [--tasks N ...] [--python PY ...]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from _proc import bpf_runs, bpf_spent, bpf_stats, check_python, cpu_seconds, run_main, running, settle, start
from python_overhead import SID_LAUNCHERS, SID_ROOT

PYENV_PYTHON = "/root/.pyenv/versions/3.12.1/bin/python3"
SLEEP_S = 0.1
RATE = 99

PROGRAM = r'''
"""N asyncio tasks stepping: a little work, then a sleep two coroutines down. Prints the
wall and CPU seconds of the timed steps."""
import asyncio, signal, sys, time

signal.signal(signal.SIGINT, signal.SIG_DFL)  # stopped by the benchmark: no traceback
SLEEP_S = float(sys.argv[3])


async def pause():
    await asyncio.sleep(SLEEP_S)


async def step(i):
    sum(k * k for k in range(100 + i % 7))
    await pause()


async def worker(steps):
    for i in range(steps):
        await step(i)


async def run(tasks, steps):
    await asyncio.gather(*(asyncio.create_task(worker(steps), name=f"worker-{n}") for n in range(tasks)))


tasks, steps = int(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()  # "warm": the profiler, if any, has started
asyncio.run(run(tasks, max(1, int(1.0 / SLEEP_S))))  # a second of tasks, for the profiler to find
print("warm", flush=True)
sys.stdin.readline()  # "go": the profiler has settled
wall, cpu = time.perf_counter(), time.process_time()
asyncio.run(run(tasks, steps))
print(time.perf_counter() - wall, time.process_time() - cpu, flush=True)
sys.stdin.readline()  # held until released, so the profiler is measured while it still runs
'''

TASKS_SEEN = re.compile(r"asyncio tasks read \d+ times .*?, (\d+) awaiting tasks seen")


@dataclass
class Run:
    wall: float  # the steps, wall clock
    cpu: float  # the program's CPU for the steps
    profiler_cpu: float = 0.0  # bpfprof's CPU / elapsed while the steps ran
    bpf: float = 0.0  # bpfprof's BPF programs' run time / elapsed while the steps ran
    task_samples: float = 0.0  # awaiting tasks seen per second the tasks existed


def default_pythons() -> List[str]:
    found = [PYENV_PYTHON] if os.path.exists(PYENV_PYTHON) else []
    if os.path.exists("/usr/bin/unshare") and (SID_ROOT / "usr/bin/python3.14").exists():
        found.append(str(SID_LAUNCHERS / "python3.14"))
    return found


def send(target: subprocess.Popen, line: str) -> str:
    target.stdin.write(line + "\n")
    target.stdin.flush()
    return target.stdout.readline()


def run_program(python: str, tasks: int, steps: int, profiled: bool, tmp: Path) -> Run:
    """One timed run of the program, under bpfprof or none."""
    target = start([python, "-c", PROGRAM, str(tasks), str(steps), str(SLEEP_S)],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    profiler: Optional[subprocess.Popen] = None
    log = tmp / "bpfprof.log"
    if profiled:
        loaded = bpf_runs()
        argv = [sys.executable, "-m", "bpfprof", "record", "-t", "wall", "-F", str(RATE), "-p", str(target.pid),
                "-o", str(tmp / "wall.pb.gz")]
        with open(log, "w") as log_file:
            profiler = start(argv, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            settle(profiler, "bpfprof")
            send(target, "warm")
            settle(profiler, "bpfprof")
        except RuntimeError:
            raise RuntimeError(f"bpfprof exited at start: {' '.join(argv)}\n    {log.read_text().strip()}")
        cpu_before, t_before, bpf_before = cpu_seconds(profiler.pid), time.monotonic(), bpf_runs()
    else:
        send(target, "warm")
    answer = send(target, "go").split()
    if len(answer) != 2:
        raise RuntimeError(f"the program ended without reporting its time (exit {target.wait()})")
    run = Run(wall=float(answer[0]), cpu=float(answer[1]))
    if profiler:
        elapsed = time.monotonic() - t_before
        run.profiler_cpu = (cpu_seconds(profiler.pid) - cpu_before) / elapsed
        run.bpf = bpf_spent(bpf_before, bpf_runs(), loaded).run_ns / 1e9 / elapsed
    target.stdin.close()
    target.wait()
    running.remove(target)
    if profiler:
        if profiler.wait(60) != 0:
            raise RuntimeError(f"bpfprof failed (exit {profiler.returncode}):\n    {log.read_text().strip()}")
        running.remove(profiler)
        found = TASKS_SEEN.search(log.read_text())
        if found:  # tasks exist in the warm second and the steps
            run.task_samples = int(found.group(1)) / (1.0 + run.wall)
    return run


def steps_for(seconds: float) -> int:
    return max(1, int(seconds / SLEEP_S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10, help="length of the steps without a profiler")
    parser.add_argument("--tasks", type=int, action="append", default=[], help="N; repeatable (default 10, 100, 1000)")
    parser.add_argument("--python", action="append", default=[],
                        help="a CPython 3.11+; repeatable (default: pyenv's 3.12 and the sid chroot's 3.14)")
    args = parser.parse_args()
    pythons, counts = args.python or default_pythons(), args.tasks or [10, 100, 1000]
    for python in pythons:
        check_python(python)

    results: Dict[Tuple[str, int], Dict[bool, List[Run]]] = {}
    versions = {}
    with tempfile.TemporaryDirectory(prefix="bpfprof-asyncio-") as d, bpf_stats():
        for python in pythons:
            versions[python] = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                              capture_output=True, text=True, check=True).stdout.strip()
            for tasks in counts:
                runs: Dict[bool, List[Run]] = {False: [], True: []}
                for r in range(args.rounds):
                    for profiled in ((False, True) if r % 2 == 0 else (True, False)):
                        runs[profiled].append(run_program(python, tasks, steps_for(args.seconds), profiled, Path(d)))
                results[(python, tasks)] = runs

    def median(runs: List[Run], field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs)

    print(f"{args.rounds} runs each, steps of {SLEEP_S} s sleep, {RATE} Hz, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'CPython':<8} {'tasks':>6} {'wall s':>7} {'slowdown':>9} {'CPU s':>7} {'CPU +':>8} "
          f"{'bpfprof CPU':>12} {'BPF CPU':>8} {'reads/s':>8} {'task samples/s':>15}")
    for (python, tasks), runs in results.items():
        none, under = runs[False], runs[True]
        print(f"{versions[python]:<8} {tasks:6d} {median(none, 'wall'):7.2f} "
              f"{100 * (median(under, 'wall') / median(none, 'wall') - 1):8.2f}% {median(none, 'cpu'):7.2f} "
              f"{100 * (median(under, 'cpu') / median(none, 'cpu') - 1):7.2f}% "
              f"{100 * median(under, 'profiler_cpu'):11.2f}% {100 * median(under, 'bpf'):7.2f}% "
              f"{median(under, 'task_samples') / tasks:8.1f} {median(under, 'task_samples'):15.0f}")
    print("wall s, CPU s: the program's, no profiler; slowdown, CPU +: under bpfprof; bpfprof CPU, BPF CPU: "
          "shares of one core while the steps ran; task samples/s: awaiting tasks the sampler saw per second "
          "tasks existed; reads/s: that over N")


if __name__ == "__main__":
    run_main(main, "asyncio_overhead")
