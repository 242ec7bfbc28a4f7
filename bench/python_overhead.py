"""How much bpfprof slows a CPU-bound Python program when attached to it, beside py-spy.

A fixed amount of single-threaded Python work (recursive calls and small-object churn,
sized to take about --seconds with no profiler) is timed by the program itself. It runs
with no profiler and under each profiler at 99 Hz, the order rotated every round:

  bpfprof               `bpfprof record -p PID -F 99`
  py-spy                `py-spy record --pid PID --rate 99`, py-spy's default mode, which
                        stops the program while it reads each sample
  py-spy --nonblocking  the same with --nonblocking: reads the program while it runs

Before the timed work the program waits: once the profiler is attached and idle, it spins
for a second (bpfprof reads a process when it first samples it), and only when the
profiler is idle again does the timed work start. So the slowdown is the steady state;
what the profiler spent before is shown apart as its start-up CPU.

Printed per profiler: the median time and slowdown of the work, the profiler's own CPU
while the work ran (as a share of one core), its CPU seconds before the work, its RSS as
the work ended and its peak RSS, and the samples per second it wrote inside the work; then
bpfprof against each py-spy mode as ratios.

    sudo .venv/bin/python bench/python_overhead.py [--rounds 3] [--seconds 15] [--python /path/to/python3]
                                                  [--build NAME=PYTHON]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

from _proc import add_build_option, bpfprof_builds, check_tools, cpu_seconds, memory_mb, run_main, running, start

DEFAULT_PYTHON = "/root/.pyenv/versions/3.12.1/bin/python3"
RATE = 99
QUIET = 0.1  # a profiler using less than this share of a core has settled

JOB = r'''
"""A fixed amount of CPU-bound Python; prints the seconds it took."""
import signal, sys, time

signal.signal(signal.SIGINT, signal.SIG_DFL)  # stopped by the benchmark: no traceback


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def words(i):
    return sorted(str(i * k) for k in range(60))


def job(rounds):
    total = 0
    for i in range(rounds):
        total += fib(16)
        total += len(words(i))
    return total


def warm_up(seconds):
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fib(16)


rounds = int(sys.argv[1])
sys.stdin.readline()  # "warm": the profiler, if any, has started
warm_up(1.0)  # on CPU, so a profiler that reads a process when first sampled does it now
print("warm", flush=True)
sys.stdin.readline()  # "go": the profiler has settled
start = time.perf_counter()
job(rounds)
print(time.perf_counter() - start, flush=True)
sys.stdin.readline()  # held until released, so the profiler is measured while it still runs
'''


@dataclass
class Run:
    seconds: float  # the work, wall clock
    cpu: float = 0.0  # profiler CPU / elapsed while the work ran
    startup: float = 0.0  # profiler CPU seconds before the work: BPF compile, reading the target
    rss: float = 0.0  # MB resident as the work ended
    peak: float = 0.0  # MB, VmHWM up to the profiler's exit
    rate: float = 0.0  # samples written per second of work


def job_samples(path: Path) -> int:
    """Samples taken inside job(), the timed work (warm-up and start-up left out)."""
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit() and any(frame.startswith("job (") for frame in stack.split(";")):
            total += int(count)
    return total


def settle(profiler: subprocess.Popen, name: str, limit: float = 30) -> None:
    """Wait until the profiler has used less than QUIET of a core over two half-seconds."""
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


def profiler_commands(py_spy: str, builds: List[str]) -> Dict[str, Callable[[int, str], List[str]]]:
    commands: Dict[str, Callable[[int, str], List[str]]] = {
        name: lambda pid, out, bpfprof=bpfprof: [*bpfprof, "record", "-F", str(RATE), "-p", str(pid), "-o", out]
        for name, bpfprof in bpfprof_builds(builds).items()
    }
    py_spy_record = [py_spy, "record", "--rate", str(RATE), "--format", "raw"]
    commands["py-spy"] = lambda pid, out: [*py_spy_record, "--pid", str(pid), "-o", out]
    commands["py-spy --nonblocking"] = lambda pid, out: [*py_spy_record, "--nonblocking", "--pid", str(pid), "-o", out]
    return commands


def run_job(python: str, job: Path, rounds: int, name: str, commands, tmp: Path) -> Run:
    """One timed run of the job, under the named profiler or none."""
    target = start([python, str(job), str(rounds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    profiler = None
    if name != "none":
        out, log = tmp / "out.folded", tmp / "profiler.log"
        out.unlink(missing_ok=True)
        argv = commands[name](target.pid, str(out))
        with open(log, "w") as log_file:
            profiler = start(argv, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            settle(profiler, name)  # started: BPF compiled, attached
            target.stdin.write("warm\n")
            target.stdin.flush()
            target.stdout.readline()
            settle(profiler, name)  # done with what the warm-up made it read
        except RuntimeError:
            raise RuntimeError(f"{name} exited at start: {' '.join(argv)}\n    {log.read_text().strip()}")
        cpu_before, t_before = cpu_seconds(profiler.pid), time.monotonic()
    else:
        target.stdin.write("warm\n")
        target.stdin.flush()
        target.stdout.readline()
    target.stdin.write("go\n")
    target.stdin.flush()
    answer = target.stdout.readline()
    if not answer.strip():
        raise RuntimeError(f"the job ended without reporting its time (exit {target.wait()})")
    run = Run(seconds=float(answer))
    if profiler:
        run.startup = cpu_before
        run.cpu = (cpu_seconds(profiler.pid) - cpu_before) / (time.monotonic() - t_before)
        run.rss = memory_mb(profiler.pid, "VmRSS:")
    target.stdin.close()  # the job exits; so does the profiler, after writing its output
    target.wait()
    running.remove(target)
    if profiler:
        deadline = time.monotonic() + 60
        while profiler.poll() is None and time.monotonic() < deadline:
            run.peak = max(run.peak, memory_mb(profiler.pid, "VmHWM:"))
            time.sleep(0.05)
        if profiler.poll() is None:
            raise RuntimeError(f"{name} did not exit within 60 s of its target")
        running.remove(profiler)
        if profiler.returncode != 0 or not out.exists():
            raise RuntimeError(f"{name} failed (exit {profiler.returncode}): {' '.join(argv)}\n    "
                               + "\n    ".join(log.read_text().strip().splitlines()[-8:]))
        run.rate = job_samples(out) / run.seconds
    return run


def calibrate(python: str, job: Path, seconds: float, tmp: Path) -> int:
    trial = 1000
    took = run_job(python, job, trial, "none", {}, tmp).seconds
    return max(1, int(trial * seconds / took))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15, help="length of the work without a profiler")
    parser.add_argument("--python", default=DEFAULT_PYTHON, help="the CPython that runs the job")
    add_build_option(parser)
    args = parser.parse_args()

    commands = profiler_commands(check_tools(args.python), args.build)

    with tempfile.TemporaryDirectory(prefix="bpfprof-overhead-") as d:
        tmp = Path(d)
        job = tmp / "overhead_job.py"
        job.write_text(JOB)
        rounds = calibrate(args.python, job, args.seconds, tmp)
        version = subprocess.run([args.python, "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        names = ["none", *commands]
        results: Dict[str, List[Run]] = {name: [] for name in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                results[name].append(run_job(args.python, job, rounds, name, commands, tmp))

    base = statistics.median(r.seconds for r in results["none"])
    print(f"job: CPython {version}, {rounds} rounds of work, {base:.2f} s median with no profiler "
          f"(range {min(r.seconds for r in results['none']):.2f}-{max(r.seconds for r in results['none']):.2f}); "
          f"{args.rounds} runs each, {RATE} Hz, {os.cpu_count()} CPUs")
    print(f"{'profiler':<22} {'job s':>7} {'range s':>12} {'slowdown':>9} {'CPU/core':>9} {'start CPU':>10} "
          f"{'RSS':>9} {'peak RSS':>9} {'samples/s':>10}")
    median = {}
    for name in commands:
        runs = results[name]
        median[name] = {
            "seconds": statistics.median(r.seconds for r in runs),
            "cpu": statistics.median(r.cpu for r in runs),
        }
        slow = median[name]["seconds"] / base - 1
        median[name]["slowdown"] = slow
        spread = f"{min(r.seconds for r in runs):.2f}-{max(r.seconds for r in runs):.2f}"
        print(f"{name:<22} {median[name]['seconds']:7.2f} {spread:>12} {100 * slow:8.2f}% "
              f"{100 * median[name]['cpu']:8.2f}% {statistics.median(r.startup for r in runs):9.2f}s "
              f"{max(r.rss for r in runs):7.1f}MB "
              f"{max(r.peak for r in runs):7.1f}MB {statistics.median(r.rate for r in runs):10.1f}")
    print("py-spy: its default mode, which stops the program while reading each sample; "
          "py-spy --nonblocking: reads it while it runs")
    b = median["bpfprof"]
    for other in ("py-spy", "py-spy --nonblocking"):
        o = median[other]
        slowdowns = (f", slowdown {100 * b['slowdown']:.2f}% vs {100 * o['slowdown']:.2f}%"
                     + (f" (x{b['slowdown'] / o['slowdown']:.2f})" if o["slowdown"] > 0.005 else ""))
        cpu = f", own CPU x{b['cpu'] / o['cpu']:.2f}" if o["cpu"] > 0 else ""
        print(f"bpfprof / {other}: job time x{b['seconds'] / o['seconds']:.3f}{slowdowns}{cpu}")


if __name__ == "__main__":
    run_main(main, "python_overhead")
