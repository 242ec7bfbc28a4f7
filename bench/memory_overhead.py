"""How much `-t memory` and `-t faults` slow an allocation-heavy program, beside bcc's memleak.

Two programs, each timing its own work (wall and CPU time of the process):

  C        a malloc-heavy loop (compiled here): each iteration replaces 1000 of 4096 live
           blocks with new ones of mixed sizes (90% of 16 B-1 KiB, 9.98% of 4-64 KiB,
           0.02% of 128 KiB-1 MiB, these touched page by page, the others at their first
           byte) and keeps 256 B for good (growth). M_MMAP_THRESHOLD is fixed at glibc's
           initial 128 KiB, so every large block is an mmap and a munmap (left dynamic,
           glibc raises it at the first free of one and the heap absorbs them), and the
           heap grows and shrinks through brk
  Python   CPython (pyenv 3.12) building and dropping lists, dicts and class instances
           (obmalloc's 1 MiB arenas, lists of more than 64 items from malloc), keeping a
           few objects and 16 KiB each round

Each runs with no profiler and under each profiler, attached by PID after the program
has started, the order rotated every round:

  bpfprof memory   `bpfprof record -t memory -p PID`
  bpfprof faults   `bpfprof record -t faults -p PID` (page faults sampled 1 in 64)
  memleak          bcc's `memleak-bpfcc -p PID` (a uprobe on every malloc, free, mmap...)

memleak slows the C program about a hundredfold, so its runs are capped in time: every
program stops after --seconds of work under memleak (4 x --seconds otherwise, which a fixed
amount of work sized to --seconds never reaches), and slowdowns compare time per
iteration. The program waits before the timed work until the profiler has started and
gone idle, then works for a second and waits again until it is idle: the slowdown is the
steady state.

Printed per program and profiler: the median time per iteration and slowdown by wall and
by CPU time of the program, the profiler's own CPU while the work ran (share of one core),
its RSS then, the time its BPF programs ran during the work (kernel bpf_stats, as a share
of the work's wall time; memleak's included) and what bpfprof saw and lost; then
memleak's slowdown over bpfprof memory's, and the targets. --json FILE writes the same.

    sudo .venv/bin/python bench/memory_overhead.py [--rounds 5] [--seconds 5] [--python /path/to/python3]
                                                  [--program C|Python] [--json FILE] [--build NAME=PYTHON]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

from _proc import (ToolMissing, add_build_option, bpf_runs, bpf_spent, bpf_stats, bpfprof_builds, check_python,
                   cpu_seconds, memory_mb, run_main, running, start)
from cpu_overhead import headers_for_bcc_tools
from python_overhead import DEFAULT_PYTHON, settle

WARM_UP_S = 1.0
LONGEST = 4  # uncapped runs stop after this many times --seconds: never, unless something is wrong

# Both programs: argv = iterations, cap in seconds. They read "warm" on stdin, work for
# WARM_UP_S and print "warm"; read "go", work, print "iterations wall cpu"; then wait for
# stdin to close before exiting, so the profiler is measured while still attached.
ALLOC_C = r"""
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SLOTS 4096
#define PAGE 4096
static void *slot[SLOTS];
static void *kept;
static unsigned long rng = 88172645463325252UL;

static unsigned long next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static double now(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void iteration(void) {
    for (int i = 0; i < 1000; i++) {
        unsigned long r = next() % 10000, s = next() % SLOTS;
        size_t size = r < 9000 ? 16 + next() % 1024
                    : r < 9998 ? 4096 + next() % (60 * 1024)
                    : 128 * 1024 + next() % (896 * 1024);
        free(slot[s]);
        char *block = slot[s] = malloc(size);
        block[0] = 1;
        if (size >= 128 * 1024)
            for (size_t at = PAGE; at < size; at += PAGE) block[at] = 1;
    }
    void **keep = malloc(256);  /* a chain that only grows */
    *keep = kept;
    kept = keep;
}

static void wait_for(const char *word) {
    char line[64];
    if (!fgets(line, sizeof line, stdin) || strncmp(line, word, strlen(word))) exit(1);
}

int main(int argc, char **argv) {
    long iterations = atol(argv[1]);
    double cap = atof(argv[2]);
    mallopt(M_MMAP_THRESHOLD, 128 * 1024);
    wait_for("warm");
    for (double end = now(CLOCK_MONOTONIC) + WARM_UP_S; now(CLOCK_MONOTONIC) < end;) iteration();
    printf("warm\n");
    fflush(stdout);
    wait_for("go");
    double wall = now(CLOCK_MONOTONIC), cpu = now(CLOCK_PROCESS_CPUTIME_ID), end = wall + cap;
    long done = 0;
    while (done < iterations && now(CLOCK_MONOTONIC) < end) {
        iteration();
        done++;
    }
    printf("%ld %f %f\n", done, now(CLOCK_MONOTONIC) - wall, now(CLOCK_PROCESS_CPUTIME_ID) - cpu);
    fflush(stdout);
    while (getchar() != EOF) {}
    return 0;
}
"""

ALLOC_PY = """
import signal, sys, time

signal.signal(signal.SIGINT, signal.SIG_DFL)  # stopped by the benchmark: no traceback


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


def iteration(i, kept):
    points = [Point(k, i) for k in range(2000)]
    index = {f"key{k}": [k, str(k)] for k in range(2000)}
    rows = [[k] * 80 for k in range(1000)]
    numbers = list(range(40_000))
    kept.append((points[::500], bytes(16384)))
    return len(points) + len(index) + len(rows) + len(numbers)


iterations, cap = int(sys.argv[1]), float(sys.argv[2])
kept = []
sys.stdin.readline()
end = time.monotonic() + WARM_UP_S
while time.monotonic() < end:
    iteration(0, kept)
print("warm", flush=True)
sys.stdin.readline()
wall, cpu = time.monotonic(), time.process_time()
end, done = wall + cap, 0
while done < iterations and time.monotonic() < end:
    iteration(done, kept)
    done += 1
print(done, time.monotonic() - wall, time.process_time() - cpu, flush=True)
sys.stdin.read()
"""


@dataclass
class Run:
    iterations: int
    wall: float  # seconds of the timed work
    cpu: float  # CPU seconds of the program in it
    profiler_cpu: float = 0.0  # profiler CPU / elapsed while the work ran
    rss: float = 0.0  # MB resident as the work ended
    bpf: float = 0.0  # BPF run time of the profiler's programs / the work's wall time
    seen: str = ""  # what bpfprof reported seeing and losing

    @property
    def per_iteration(self) -> float:
        return self.wall / self.iterations

    @property
    def cpu_per_iteration(self) -> float:
        return self.cpu / self.iterations


def programs(tmp: Path, python: str) -> Dict[str, List[str]]:
    src, binary = tmp / "alloc.c", tmp / "alloc"
    src.write_text(ALLOC_C)
    subprocess.run(["gcc", "-O1", f"-DWARM_UP_S={WARM_UP_S}", "-o", str(binary), str(src)], check=True)
    script = tmp / "alloc.py"
    script.write_text(ALLOC_PY.replace("WARM_UP_S", str(WARM_UP_S)))
    return {"C": [str(binary)], "Python": [python, str(script)]}


def profilers(tmp: Path, builds: List[str]) -> Dict[str, List[str]]:
    """Each profiler's command, without the PID it is given last."""
    commands = {}
    for build, bpfprof in bpfprof_builds(builds).items():
        for kind in ("memory", "faults"):
            commands[f"{build} {kind}"] = [*bpfprof, "record", "-t", kind, "-o", f"{tmp}/{kind}.pb.gz", "-p"]
    commands["memleak"] = ["memleak-bpfcc", "-p"]
    return commands


def what_bpfprof_saw(log: str) -> str:
    """From its summary: "5105 allocations of 2.5 GB, 48.9 MB in use at the end, 0 lost"."""
    found = re.search(r"^bpfprof: (.*?\d+ lost)", log, re.MULTILINE)
    return found.group(1) if found else ""


def run_program(argv: List[str], iterations: int, cap: float, name: str, profiler_argv: Optional[List[str]],
                tmp: Path) -> Run:
    """One timed run of the program, under the named profiler or none."""
    target = start([*argv, str(iterations), str(cap)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    profiler = log = None
    loaded = bpf_runs()
    if profiler_argv:
        log = tmp / "profiler.log"
        with open(log, "w") as log_file:
            profiler = start([*profiler_argv, str(target.pid)], stdout=log_file, stderr=subprocess.STDOUT)
        try:
            settle(profiler, name)  # compiled, attached
        except RuntimeError:
            raise RuntimeError(f"{name} exited at start:\n    {log.read_text().strip()}")
    target.stdin.write("warm\n")
    target.stdin.flush()
    target.stdout.readline()
    if profiler:
        settle(profiler, name)  # done with what the warm-up gave it
        cpu_before, t_before = cpu_seconds(profiler.pid), time.monotonic()
    bpf_before = bpf_runs()
    target.stdin.write("go\n")
    target.stdin.flush()
    answer = target.stdout.readline().split()
    if len(answer) != 3:
        raise RuntimeError(f"{argv[-1]} ended without reporting its time (exit {target.wait()})")
    run = Run(int(answer[0]), float(answer[1]), float(answer[2]))
    if run.iterations == 0:
        raise RuntimeError(f"{argv[-1]} did no iteration within {cap:.0f} s under {name}")
    if profiler:
        run.profiler_cpu = (cpu_seconds(profiler.pid) - cpu_before) / (time.monotonic() - t_before)
        run.rss = memory_mb(profiler.pid, "VmRSS:")
        run.bpf = bpf_spent(bpf_before, bpf_runs(), loaded).run_ns / 1e9 / run.wall
    target.stdin.close()
    target.wait()
    running.remove(target)
    if profiler:
        if not name.startswith("bpfprof"):
            profiler.send_signal(signal.SIGINT)  # memleak goes on after its target
        profiler.wait(60)  # bpfprof exits with its target, once it has written its profile
        running.remove(profiler)
        if name.startswith("bpfprof"):
            if profiler.returncode != 0:
                raise RuntimeError(f"{name} failed (exit {profiler.returncode}):\n    "
                                   + "\n    ".join(log.read_text().strip().splitlines()[-8:]))
            run.seen = what_bpfprof_saw(log.read_text())
    return run


def calibrate(argv: List[str], seconds: float, tmp: Path) -> int:
    """Iterations taking about `seconds` with no profiler."""
    trial = run_program(argv, 10**9, min(2.0, seconds), "none", None, tmp)
    return max(1, int(seconds / trial.per_iteration))


def summary(runs: List[Run], base: List[Run]) -> Dict[str, float]:
    wall = statistics.median(r.per_iteration for r in runs)
    cpu = statistics.median(r.cpu_per_iteration for r in runs)
    return {
        "us_per_iteration": 1e6 * wall,
        "us_range": (1e6 * min(r.per_iteration for r in runs), 1e6 * max(r.per_iteration for r in runs)),
        "slowdown": wall / statistics.median(r.per_iteration for r in base) - 1,
        "cpu_slowdown": cpu / statistics.median(r.cpu_per_iteration for r in base) - 1,
        "profiler_cpu": statistics.median(r.profiler_cpu for r in runs),
        "rss_mb": max(r.rss for r in runs),
        "bpf_share": statistics.median(r.bpf for r in runs),
        "iterations": statistics.median(r.iterations for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5, help="length of each program's work without a profiler")
    parser.add_argument("--python", default=DEFAULT_PYTHON, help="the CPython that runs the Python program")
    parser.add_argument("--program", choices=("C", "Python"), action="append", help="only this program (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    add_build_option(parser)
    args = parser.parse_args()
    check_python(args.python)
    if shutil.which("memleak-bpfcc") is None:
        raise ToolMissing("memleak-bpfcc is missing (apt-get install bpfcc-tools)")

    report: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bpfprof-memory-") as d, headers_for_bcc_tools(), bpf_stats():
        tmp = Path(d)
        commands = profilers(tmp, args.build)
        for program, argv in programs(tmp, args.python).items():
            if args.program and program not in args.program:
                continue
            iterations = calibrate(argv, args.seconds, tmp)
            names = ["none", *commands]
            results: Dict[str, List[Run]] = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    cap = args.seconds if name == "memleak" else LONGEST * args.seconds
                    run = run_program(argv, iterations, cap, name, commands.get(name), tmp)
                    results[name].append(run)
            report[program] = {name: summary(runs, results["none"]) for name, runs in results.items()}
            for name, runs in results.items():
                report[program][name]["runs"] = [asdict(r) for r in runs]
            print_program(program, iterations, args, report[program])
    verdicts(report, args.build)
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "rounds": args.rounds, "cpus": os.cpu_count(),
                                         "load_average": os.getloadavg(), "programs": report}, indent=2))


def print_program(program: str, iterations: int, args, figures: Dict[str, dict]) -> None:
    base = figures["none"]
    memleak = figures.get("memleak")
    print(f"\n{program}: {iterations} iterations, {base['us_per_iteration']:.1f} us each with no profiler "
          f"(range {base['us_range'][0]:.1f}-{base['us_range'][1]:.1f}), "
          f"{args.rounds} runs each, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    if memleak:
        print(f"  memleak capped at {args.seconds:g} s of work: it ran {memleak['iterations']:.0f} of {iterations} "
              f"iterations (median); slowdowns compare time per iteration")
    print(f"  {'profiler':<20} {'us/iter':>10} {'range':>17} {'slowdown':>9} {'CPU slow':>9} {'prof CPU':>9} "
          f"{'RSS':>8} {'BPF/work':>9}  seen (last run)")
    for name, f in figures.items():
        if name == "none":
            continue
        spread = f"{f['us_range'][0]:.1f}-{f['us_range'][1]:.1f}"
        print(f"  {name:<20} {f['us_per_iteration']:10.1f} {spread:>17} {100 * f['slowdown']:8.2f}% "
              f"{100 * f['cpu_slowdown']:8.2f}% {100 * f['profiler_cpu']:8.2f}% {f['rss_mb']:6.1f}MB "
              f"{100 * f['bpf_share']:8.3f}%  {f['runs'][-1]['seen']}")


def verdicts(report: Dict[str, dict], builds: List[str]) -> None:
    """memleak against bpfprof memory, and the issue's targets: -t memory slows each program by
    2% at most, 50 times less than memleak, on at most 1% of a core."""
    print("\ntargets: bpfprof memory slowdown <= 2%, memleak / bpfprof memory >= 50x, collector CPU <= 1% of a core")
    for build in bpfprof_builds(builds):
        for program, figures in report.items():
            ours, memleak = figures[f"{build} memory"], figures["memleak"]
            ratio = (f"x{memleak['slowdown'] / ours['slowdown']:.0f}" if ours["slowdown"] > 0
                     else "bpfprof memory not measurably slower")
            print(f"  {build} memory, {program}: slowdown {100 * ours['slowdown']:.2f}% (CPU "
                  f"{100 * ours['cpu_slowdown']:.2f}%), memleak {100 * memleak['slowdown']:.0f}%: {ratio}; "
                  f"collector {100 * ours['profiler_cpu']:.2f}% of a core")


if __name__ == "__main__":
    run_main(main, "memory_overhead")
