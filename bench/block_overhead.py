"""Cost of recording off-CPU time (`-t block`, `-t wall`) on context-switch-heavy machines,
beside bcc's offcputime and perf recording every sched_switch.

Two works, each a fixed number of rounds sized to take about --seconds with no profiler:

  ping-pong   one pair of threads per CPU bouncing a byte over two pipes: every switch
              is a block (both threads block once per round trip)
  yield       two threads pinned to each CPU calling sched_yield: every switch is a
              preemption, not a block, at well over a million switches per second

Each runs with no profiler and under each whole-system profiler in turn, the order
rotated every round:

  bpfprof block         `bpfprof record -a -t block` (every block of 1 us or more)
  bpfprof min 100us     the same with --min-block 100
  bpfprof wall          `bpfprof record -a -t wall` (a stack at every switch)
  offcputime            bcc's `offcputime-bpfcc -f` (needs kprobes; reported when it cannot run)
  perf sched_switch     `perf record -e sched:sched_switch -a -g`, every switch with its stack

Printed per work and profiler: the median time of the work and its slowdown, the
machine's context switches per second while it ran (from /proc/stat), the profiler's own
CPU (share of one core), the time its BPF programs ran per context switch (the kernel's
bpf_stats), and for bpfprof what it saw and lost; then bpfprof against the others as
ratios of slowdown.

    sudo .venv/bin/python bench/block_overhead.py [--rounds 3] [--seconds 10] [--build NAME=PYTHON]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from _proc import add_build_option, bpf_runs, bpf_spent, bpf_stats, bpfprof_builds, cpu_seconds, run_main
from cpu_overhead import headers_for_bcc_tools

PING_PONG_C = r"""
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
static long rounds;
struct pair { int there[2], back[2]; };
static void *ping(void *arg) {
    struct pair *p = arg; char c = 'x';
    for (long i = 0; i < rounds; i++)
        if (write(p->there[1], &c, 1) != 1 || read(p->back[0], &c, 1) != 1) break;
    return NULL;
}
static void *pong(void *arg) {
    struct pair *p = arg; char c;
    for (long i = 0; i < rounds; i++)
        if (read(p->there[0], &c, 1) != 1 || write(p->back[1], &c, 1) != 1) break;
    return NULL;
}
int main(int argc, char **argv) {
    rounds = atol(argv[1]);
    int pairs = atoi(argv[2]);
    pthread_t threads[2 * pairs];
    struct pair p[pairs];
    for (int i = 0; i < pairs; i++) {
        if (pipe(p[i].there) || pipe(p[i].back)) return 1;
        pthread_create(&threads[2 * i], NULL, ping, &p[i]);
        pthread_create(&threads[2 * i + 1], NULL, pong, &p[i]);
    }
    for (int i = 0; i < 2 * pairs; i++) pthread_join(threads[i], NULL);
    return 0;
}
"""

YIELD_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
static long rounds;
static void *yielder(void *arg) {
    cpu_set_t cpu; CPU_ZERO(&cpu); CPU_SET((long)arg, &cpu);
    sched_setaffinity(0, sizeof cpu, &cpu);
    for (long i = 0; i < rounds; i++) sched_yield();
    return NULL;
}
int main(int argc, char **argv) {
    rounds = atol(argv[1]);
    int cpus = atoi(argv[2]);
    pthread_t threads[2 * cpus];
    for (long i = 0; i < 2 * cpus; i++) pthread_create(&threads[i], NULL, yielder, (void *)(i / 2));
    for (int i = 0; i < 2 * cpus; i++) pthread_join(threads[i], NULL);
    return 0;
}
"""

WORKS = {"ping-pong": PING_PONG_C, "yield": YIELD_C}


SETTLE_S = 5  # before each timed run: a profiler is compiled and attached by then

def profilers(tmp: Path, builds: List[str]) -> Dict[str, List[str]]:
    commands = {}
    for build, bpfprof in bpfprof_builds(builds).items():
        record = [*bpfprof, "record", "-a", "-o", f"{tmp}/out.pb.gz"]
        commands[f"{build} block"] = [*record, "-t", "block"]
        commands[f"{build} min 100us"] = [*record, "-t", "block", "--min-block", "100"]
        commands[f"{build} wall"] = [*record, "-t", "wall"]
    commands["offcputime"] = ["offcputime-bpfcc", "-f"]
    commands["perf sched_switch"] = ["perf", "record", "-e", "sched:sched_switch", "-a", "-g", "-q", "-o",
                                     f"{tmp}/perf.data"]
    return commands


def build(tmp: Path, name: str) -> Path:
    src, binary = tmp / f"{name}.c", tmp / name
    src.write_text(WORKS[name])
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(binary), str(src)], check=True)
    return binary


def context_switches() -> int:
    with open("/proc/stat") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("ctxt "))


def run_work(work: Path, rounds: int) -> Tuple[float, float]:
    """(wall seconds, context switches per second) of one run."""
    switches, started = context_switches(), time.monotonic()
    subprocess.run([str(work), str(rounds), str(os.cpu_count() or 1)], check=True)
    seconds = time.monotonic() - started
    return seconds, (context_switches() - switches) / seconds


def under(argv: List[str], work: Path, rounds: int) -> Tuple[Optional[Tuple[float, float, float, float]], str]:
    """((work seconds, switches/s, profiler CPU share, its BPF ns per switch), its stderr),
    or (None, why) if it could not start."""
    log = tempfile.TemporaryFile(mode="w+")
    loaded = bpf_runs()
    profiler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(SETTLE_S)  # compiled and attached
    if profiler.poll() is not None:
        log.seek(0)
        lines = log.read().strip().splitlines()
        return None, lines[-1] if lines else f"exited with {profiler.returncode}"
    cpu_before, t_before, bpf_before = cpu_seconds(profiler.pid), time.monotonic(), bpf_runs()
    seconds, rate = run_work(work, rounds)
    cpu = (cpu_seconds(profiler.pid) - cpu_before) / (time.monotonic() - t_before)
    bpf = bpf_spent(bpf_before, bpf_runs(), loaded)
    profiler.send_signal(signal.SIGINT)
    profiler.wait()
    log.seek(0)
    return (seconds, rate, cpu, bpf.run_ns / (rate * seconds)), log.read()


def what_bpfprof_saw(stderr: str) -> str:
    seen = re.search(r"(\d+) times a thread blocked, (\d+) shorter", stderr)
    lost = re.search(r"(\d+) lost", stderr)
    lost_text = f"lost {lost.group(1) if lost else '?'}"
    if seen:
        return f"blocks seen {seen.group(1)}, left out under --min-block {seen.group(2)}, {lost_text}"
    return lost_text


def measure(tmp: Path, name: str, rounds: int, seconds: float, builds: List[str]) -> None:
    work = build(tmp, name)
    trips = 200_000
    base_seconds, _ = run_work(work, trips)
    trips = int(trips * seconds / base_seconds)
    commands = {name: argv for name, argv in profilers(tmp, builds).items() if shutil.which(argv[0])}
    results: Dict[str, List[Tuple[float, float, float, float]]] = {name: [] for name in ["none", *commands]}
    notes: Dict[str, str] = {}
    for r in range(rounds):
        order = ["none", *commands]
        order = order[r % len(order):] + order[: r % len(order)]
        for profiler in order:
            if profiler == "none":
                time.sleep(SETTLE_S)  # the same idle start as a profiled run
                results[profiler].append((*run_work(work, trips), 0.0, 0.0))
                continue
            if profiler in notes and not results[profiler]:
                continue  # could not start before
            result, stderr = under(commands[profiler], work, trips)
            if result is None:
                notes[profiler] = f"could not run: {stderr}"
                continue
            results[profiler].append(result)
            if profiler.startswith("bpfprof"):
                notes[profiler] = what_bpfprof_saw(stderr)

    base = statistics.median(r[0] for r in results["none"])
    base_rate = statistics.median(r[1] for r in results["none"])
    print(f"\n{name}: {os.cpu_count()} CPUs, {trips} rounds per thread, {base:.2f} s median and "
          f"{base_rate / 1e3:.0f}k context switches/s without a profiler, {rounds} rounds")
    print(f"{'profiler':<26} {'work s':>7} {'slowdown':>9} {'switches/s':>11} {'CPU/core':>9} {'BPF ns/switch':>14}")
    slowdowns = {}
    for profiler in commands:
        runs = results[profiler]
        if not runs:
            print(f"{profiler:<26} {notes.get(profiler, 'no runs')}")
            continue
        median = statistics.median(r[0] for r in runs)
        slowdowns[profiler] = median / base - 1
        print(f"{profiler:<26} {median:7.2f} {100 * slowdowns[profiler]:8.1f}% "
              f"{statistics.median(r[1] for r in runs) / 1e3:10.0f}k {100 * statistics.median(r[2] for r in runs):8.1f}%"
              f" {statistics.median(r[3] for r in runs):14.0f}"
              + (f"   {notes[profiler]}" if profiler in notes else ""))
    for ours in ("bpfprof block", "bpfprof wall"):
        for other in slowdowns:
            if not other.startswith("bpfprof") and ours in slowdowns and slowdowns[other] > 0:
                print(f"{ours} / {other}: slowdown x{slowdowns[ours] / slowdowns[other]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10, help="length of each work without a profiler")
    parser.add_argument("--work", choices=sorted(WORKS), action="append", help="only this work (repeatable)")
    add_build_option(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d, headers_for_bcc_tools(), bpf_stats():
        for name in args.work or list(WORKS):
            measure(Path(d), name, args.rounds, args.seconds, args.build)

if __name__ == "__main__":
    run_main(main, "block_overhead")
