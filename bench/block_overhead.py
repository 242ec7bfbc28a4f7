"""Cost of recording blocking delay (`-t block`) on a context-switch-heavy machine, beside
bcc's offcputime and perf recording every sched_switch.

The work: one pair of threads per CPU bouncing a byte over two pipes, a fixed number of
round trips (each blocks both threads once), sized to take about --seconds with no
profiler. It runs with no profiler and under each whole-system profiler in turn, the
order rotated every round:

  bpfprof               `bpfprof record -a -t block` (every block of 1 us or more)
  bpfprof min 100us     the same with --min-block 100
  offcputime            bcc's `offcputime-bpfcc -f` (needs kprobes; reported when it cannot run)
  perf sched_switch     `perf record -e sched:sched_switch -a -g`, every switch with its stack

Printed per profiler: the median time of the work and its slowdown, the machine's context
switches per second while it ran (from /proc/stat), the profiler's own CPU (share of one
core), and for bpfprof the blocks it saw, left out under --min-block, and lost; then
bpfprof against the others as ratios of slowdown.

    sudo .venv/bin/python bench/block_overhead.py [--rounds 3] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from _proc import cpu_seconds, run_main
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


def profilers(tmp: Path) -> Dict[str, List[str]]:
    bpfprof = [sys.executable, "-m", "bpfprof", "record", "-a", "-t", "block", "-o", f"{tmp}/block.pb.gz"]
    return {
        "bpfprof": bpfprof,
        "bpfprof min 100us": [*bpfprof, "--min-block", "100"],
        "offcputime": ["offcputime-bpfcc", "-f"],
        "perf sched_switch": ["perf", "record", "-e", "sched:sched_switch", "-a", "-g", "-q", "-o", f"{tmp}/perf.data"],
    }


def build(tmp: Path) -> Path:
    src, binary = tmp / "ping_pong.c", tmp / "ping_pong"
    src.write_text(PING_PONG_C)
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


def under(argv: List[str], work: Path, rounds: int) -> Tuple[Optional[Tuple[float, float, float]], str]:
    """((work seconds, switches/s, profiler CPU share), its stderr), or (None, why) if it could not start."""
    log = tempfile.TemporaryFile(mode="w+")
    profiler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(5)  # compiled and attached
    if profiler.poll() is not None:
        log.seek(0)
        lines = log.read().strip().splitlines()
        return None, lines[-1] if lines else f"exited with {profiler.returncode}"
    cpu_before, t_before = cpu_seconds(profiler.pid), time.monotonic()
    seconds, rate = run_work(work, rounds)
    cpu = (cpu_seconds(profiler.pid) - cpu_before) / (time.monotonic() - t_before)
    profiler.send_signal(signal.SIGINT)
    profiler.wait()
    log.seek(0)
    return (seconds, rate, cpu), log.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10, help="length of the work without a profiler")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as d, headers_for_bcc_tools():
        tmp = Path(d)
        work = build(tmp)
        trips = 200_000
        seconds, _ = run_work(work, trips)
        trips = int(trips * args.seconds / seconds)
        commands = {name: argv for name, argv in profilers(tmp).items() if shutil.which(argv[0])}
        results: Dict[str, List[Tuple[float, float, float]]] = {name: [] for name in ["none", *commands]}
        notes: Dict[str, str] = {}
        for r in range(args.rounds):
            order = ["none", *commands]
            order = order[r % len(order):] + order[: r % len(order)]
            for name in order:
                if name == "none":
                    results[name].append((*run_work(work, trips), 0.0))
                    continue
                if name in notes and not results[name]:
                    continue  # could not start before
                result, stderr = under(commands[name], work, trips)
                if result is None:
                    notes[name] = f"could not run: {stderr}"
                    continue
                results[name].append(result)
                if name.startswith("bpfprof"):
                    seen = re.search(r"(\d+) times a thread blocked, (\d+) shorter", stderr)
                    lost = re.search(r"(\d+) lost", stderr)
                    if seen:
                        notes[name] = (f"blocks seen {seen.group(1)}, left out under --min-block {seen.group(2)}, "
                                       f"lost {lost.group(1) if lost else '?'}")

        base = statistics.median(r[0] for r in results["none"])
        base_rate = statistics.median(r[1] for r in results["none"])
        print(f"work: {os.cpu_count()} ping-pong pairs, {trips} round trips each, {base:.2f} s median and "
              f"{base_rate / 1e3:.0f}k context switches/s without a profiler, {args.rounds} rounds")
        print(f"{'profiler':<18} {'work s':>7} {'slowdown':>9} {'switches/s':>11} {'CPU/core':>9}")
        slowdowns = {}
        for name in commands:
            runs = results[name]
            if not runs:
                print(f"{name:<18} {notes.get(name, 'no runs')}")
                continue
            median = statistics.median(r[0] for r in runs)
            slowdowns[name] = median / base - 1
            print(f"{name:<18} {median:7.2f} {100 * slowdowns[name]:8.1f}% "
                  f"{statistics.median(r[1] for r in runs) / 1e3:10.0f}k {100 * statistics.median(r[2] for r in runs):8.1f}%"
                  + (f"   {notes[name]}" if name in notes else ""))
        for other in slowdowns:
            if not other.startswith("bpfprof") and "bpfprof" in slowdowns and slowdowns[other] > 0:
                print(f"bpfprof / {other}: slowdown x{slowdowns['bpfprof'] / slowdowns[other]:.2f}")


if __name__ == "__main__":
    run_main(main, "block_overhead")
