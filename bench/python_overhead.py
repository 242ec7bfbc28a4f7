"""How much bpfprof slows a CPU-bound Python program when attached to it, beside py-spy,
on several CPythons side by side.

A fixed amount of single-threaded Python work (recursive calls and small-object churn,
sized to take about --seconds with no profiler) is timed by the program itself. On each
CPython (--python, repeatable; by default pyenv's 3.6, 3.7 and 3.12 and the sid chroot's
3.14 and 3.15, those present) it runs with no profiler and under each profiler at 99 Hz,
the order rotated every round:

  bpfprof               `bpfprof record -p PID -F 99`
  py-spy                `py-spy record --pid PID --rate 99`, py-spy's default mode, which
                        stops the program while it reads each sample
  py-spy --nonblocking  the same with --nonblocking: reads the program while it runs

Before the timed work the program waits: once the profiler is attached and idle, it spins
for a second (bpfprof reads a process when it first samples it), and only when the
profiler is idle again does the timed work start. So the slowdown is the steady state;
what the profiler spent before is shown apart as its start-up CPU.

The program is given to the interpreter with -c, so a CPython in a chroot of its own (the
sid chroot's, run through tests/fixtures/sid/python3.N like a container) runs it too.

Printed per CPython and profiler: the median time and slowdown of the work, the profiler's
own CPU while the work ran (as a share of one core), the time bpfprof's sampling BPF
programs ran per sample (the kernel's bpf_stats; their runs are the perf events of every
CPU, the target's and the others'), its CPU seconds before the work, its RSS as the work
ended and its peak RSS, and the samples per second it wrote inside the work; then bpfprof
against each py-spy mode as ratios, or "unsupported" where py-spy cannot read that
CPython. Last, one line per CPython side by side.

    sudo .venv/bin/python bench/python_overhead.py [--rounds 3] [--seconds 15] [--python /path/to/python3 ...]
                                                  [--build NAME=PYTHON]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from _proc import (add_build_option, bpf_runs, bpf_spent, bpf_stats, bpfprof_builds, check_python, cpu_seconds,
                   find_py_spy, memory_mb, run_main, running, settle, start, stop_all)

PYENV = Path("/root/.pyenv/versions")
PYENV_MINORS = (6, 7, 12)
SID_ROOT = Path(os.environ.get("BPFPROF_SID_ROOT", "/var/cache/bpfprof/sid-python"))  # as tests/conftest.py
SID_LAUNCHERS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sid"
SID_MINORS = (14, 15)
RATE = 99

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
    bpf_ns: float = 0.0  # bpfprof's sampling BPF programs, per run, while the work ran


def job_samples(path: Path) -> int:
    """Samples taken inside job(), the timed work (warm-up and start-up left out)."""
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit() and any(frame.startswith("job (") for frame in stack.split(";")):
            total += int(count)
    return total


def profiler_commands(py_spy: str, builds: List[str]) -> Dict[str, Callable[[int, str], List[str]]]:
    commands: Dict[str, Callable[[int, str], List[str]]] = {
        name: lambda pid, out, bpfprof=bpfprof: [*bpfprof, "record", "-F", str(RATE), "-p", str(pid), "-o", out]
        for name, bpfprof in bpfprof_builds(builds).items()
    }
    py_spy_record = [py_spy, "record", "--rate", str(RATE), "--format", "raw"]
    commands["py-spy"] = lambda pid, out: [*py_spy_record, "--pid", str(pid), "-o", out]
    commands["py-spy --nonblocking"] = lambda pid, out: [*py_spy_record, "--nonblocking", "--pid", str(pid), "-o", out]
    return commands


def default_pythons() -> List[str]:
    """pyenv's 3.6, 3.7 and 3.12 and the sid chroot's 3.14 and 3.15, those installed."""
    found = [str(p) for m in PYENV_MINORS for p in sorted(PYENV.glob(f"3.{m}.*/bin/python3"))[-1:]]
    if os.path.exists("/usr/bin/unshare"):
        found += [str(SID_LAUNCHERS / f"python3.{m}") for m in SID_MINORS
                  if (SID_ROOT / "usr/bin" / f"python3.{m}").exists()]
    return found


def run_job(python: str, rounds: int, name: str, commands, tmp: Path) -> Run:
    """One timed run of the job, under the named profiler or none."""
    target = start([python, "-c", JOB, str(rounds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    profiler = None
    if name != "none":
        loaded = bpf_runs()
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
        cpu_before, t_before, bpf_before = cpu_seconds(profiler.pid), time.monotonic(), bpf_runs()
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
        if name.startswith("bpfprof"):
            sampling = bpf_spent(bpf_before, bpf_runs(), loaded, kind="perf_event")
            run.bpf_ns = sampling.run_ns / sampling.runs if sampling.runs else 0.0
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


def calibrate(python: str, seconds: float, tmp: Path) -> int:
    trial = 1000
    took = run_job(python, trial, "none", {}, tmp).seconds
    return max(1, int(trial * seconds / took))


@dataclass
class Measured:
    """One CPython's runs: the job's, under each profiler; a profiler that could not read
    this CPython has the reason instead."""
    version: str
    rounds: int
    runs: Dict[str, List[Run]]
    unsupported: Dict[str, str]


def measure(python: str, commands, args, tmp: Path) -> Measured:
    version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    rounds = calibrate(python, args.seconds, tmp)
    names = ["none", *commands]
    measured = Measured(version, rounds, {name: [] for name in names}, {})
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if name in measured.unsupported:
                continue
            try:
                measured.runs[name].append(run_job(python, rounds, name, commands, tmp))
            except RuntimeError as e:
                if not name.startswith("py-spy"):
                    raise
                stop_all()
                measured.unsupported[name] = str(e).splitlines()[-1].strip()
    return measured


def median_of(runs: List[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def print_measured(m: Measured, commands) -> Dict[str, Optional[float]]:
    """The table of one CPython; returns each profiler's slowdown (None: unsupported)."""
    none = m.runs["none"]
    base = median_of(none, "seconds")
    print(f"\njob: CPython {m.version}, {m.rounds} rounds of work, {base:.2f} s median with no profiler "
          f"(range {min(r.seconds for r in none):.2f}-{max(r.seconds for r in none):.2f}); "
          f"{len(none)} runs each, {RATE} Hz, {os.cpu_count()} CPUs")
    print(f"{'profiler':<22} {'job s':>7} {'range s':>12} {'slowdown':>9} {'CPU/core':>9} {'BPF ns':>10} "
          f"{'start CPU':>10} {'RSS':>9} {'peak RSS':>9} {'samples/s':>10}")
    slowdown: Dict[str, Optional[float]] = {}
    for name in commands:
        if name in m.unsupported:
            print(f"{name:<22} unsupported: {m.unsupported[name]}")
            slowdown[name] = None
            continue
        runs = m.runs[name]
        slowdown[name] = median_of(runs, "seconds") / base - 1
        bpf = f"{median_of(runs, 'bpf_ns'):10.0f}" if name.startswith("bpfprof") else f"{'-':>10}"
        spread = f"{min(r.seconds for r in runs):.2f}-{max(r.seconds for r in runs):.2f}"
        print(f"{name:<22} {median_of(runs, 'seconds'):7.2f} {spread:>12} {100 * slowdown[name]:8.2f}% "
              f"{100 * median_of(runs, 'cpu'):8.2f}% {bpf} {median_of(runs, 'startup'):9.2f}s "
              f"{max(r.rss for r in runs):7.1f}MB {max(r.peak for r in runs):7.1f}MB {median_of(runs, 'rate'):10.1f}")
    b = m.runs["bpfprof"]
    for other in ("py-spy", "py-spy --nonblocking"):
        if other in m.unsupported:
            print(f"bpfprof / {other}: py-spy: unsupported")
            continue
        o = m.runs[other]
        slowdowns = (f", slowdown {100 * slowdown['bpfprof']:.2f}% vs {100 * slowdown[other]:.2f}%"
                     + (f" (x{slowdown['bpfprof'] / slowdown[other]:.2f})" if slowdown[other] > 0.005 else ""))
        cpu = f", own CPU x{median_of(b, 'cpu') / median_of(o, 'cpu'):.2f}" if median_of(o, "cpu") > 0 else ""
        print(f"bpfprof / {other}: job time x{median_of(b, 'seconds') / median_of(o, 'seconds'):.3f}{slowdowns}{cpu}")
    return slowdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15, help="length of the work without a profiler")
    parser.add_argument("--python", action="append", default=[],
                        help="a CPython that runs the job; repeatable (default: pyenv's 3.6, 3.7, 3.12 and the "
                             "sid chroot's 3.14, 3.15, those present)")
    add_build_option(parser)
    args = parser.parse_args()
    pythons = args.python or default_pythons()
    for python in pythons:
        check_python(python)
    commands = profiler_commands(find_py_spy(), args.build)

    with tempfile.TemporaryDirectory(prefix="bpfprof-overhead-") as d, bpf_stats():
        measured = {python: measure(python, commands, args, Path(d)) for python in pythons}

    print("py-spy: its default mode, which stops the program while reading each sample; "
          "py-spy --nonblocking: reads it while it runs;\nBPF ns: the time bpfprof's sampling BPF programs take "
          "per run (per sample)")
    slowdowns = {python: print_measured(m, commands) for python, m in measured.items()}

    print(f"\n{'CPython':<10} {'bpfprof slowdown':>17} {'CPU/core':>9} {'BPF ns/sample':>14} "
          f"{'py-spy slowdown':>16} {'--nonblocking':>14}")
    for python, m in measured.items():
        s = slowdowns[python]
        py_spy = [f"{100 * s[n]:.2f}%" if s[n] is not None else "unsupported"
                  for n in ("py-spy", "py-spy --nonblocking")]
        print(f"{m.version:<10} {100 * s['bpfprof']:16.2f}% {100 * median_of(m.runs['bpfprof'], 'cpu'):8.2f}% "
              f"{median_of(m.runs['bpfprof'], 'bpf_ns'):14.0f} {py_spy[0]:>16} {py_spy[1]:>14}")


if __name__ == "__main__":
    run_main(main, "python_overhead")
