"""Overhead of whole-system CPU profiling at 99 Hz, bpfprof beside perf and bcc's profile.

A fixed amount of CPU-bound work (one copy per CPU) is timed with no profiler and under
each profiler in turn, the order rotated per round; reported are each profiler's median
slowdown of that work, its own CPU (steady state, after start-up), RSS and peak RSS, and
the time its BPF program ran per sample (the kernel's bpf_stats).
Also: time from `bpfprof record` start to the moment sampling runs (compile included).

    sudo .venv/bin/python bench/cpu_overhead.py [--rounds 3] [--seconds 20] [--build NAME=PYTHON]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

from _proc import add_build_option, bpf_runs, bpf_spent, bpf_stats, bpfprof_builds, cpu_seconds, memory_mb, run_main

HERE = Path(__file__).parent
SETTLE_S = 4  # before each timed run: a profiler is compiled and attached by then

WORK_C = r"""
#include <stdlib.h>
volatile unsigned long sink;
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    for (long i = 0; i < n; i++) sink += i * i;
    return 0;
}
"""


def build_work(tmp: Path) -> Path:
    src, binary = tmp / "work.c", tmp / "work"
    src.write_text(WORK_C)
    subprocess.run(["gcc", "-O1", "-o", str(binary), str(src)], check=True)
    return binary


def calibrate(work: Path, seconds: float) -> int:
    n = 50_000_000
    started = time.monotonic()
    subprocess.run([str(work), str(n)], check=True)
    return int(n * seconds / (time.monotonic() - started))


def run_work(work: Path, n: int) -> float:
    """Wall seconds for one copy per CPU to finish n iterations each."""
    started = time.monotonic()
    copies = [subprocess.Popen([str(work), str(n)]) for _ in range(os.cpu_count() or 1)]
    for c in copies:
        c.wait()
    return time.monotonic() - started


def profilers(builds: List[str]) -> Dict[str, Callable[[Path], List[str]]]:
    """Each profiler's command, given a directory for its output."""
    commands: Dict[str, Callable[[Path], List[str]]] = {
        name: lambda out, bpfprof=bpfprof: [*bpfprof, "record", "-a", "-F", "99", "-o", f"{out}/b.pb.gz"]
        for name, bpfprof in bpfprof_builds(builds).items()
    }
    commands["perf"] = lambda out: ["perf", "record", "-a", "-g", "-F", "99", "-q", "-o", f"{out}/perf.data"]
    commands["bcc-profile"] = lambda out: ["profile-bpfcc", "-F", "99", "-f"]
    return commands


def under_profiler(name: str, argv: List[str], work: Path, n: int):
    """(work seconds, profiler CPU as a fraction of one core, RSS MB while sampling, peak RSS MB,
    BPF ns per sample)."""
    loaded = bpf_runs()
    # SIGINT stops every profiler, even when this benchmark runs in the background,
    # where the shell started it with SIGINT ignored.
    profiler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(SETTLE_S)  # compiled, attached, first drain done
    if profiler.poll() is not None:
        raise SystemExit(f"{name} exited at start: {' '.join(argv)}")
    cpu_before, t_before, bpf_before = cpu_seconds(profiler.pid), time.monotonic(), bpf_runs()
    seconds = run_work(work, n)
    cpu = (cpu_seconds(profiler.pid) - cpu_before) / (time.monotonic() - t_before)
    samples = bpf_spent(bpf_before, bpf_runs(), loaded, kind="perf_event")
    steady = memory_mb(profiler.pid, "VmRSS:")
    profiler.send_signal(signal.SIGINT)
    peak = 0.0
    while profiler.poll() is None:  # until it has written its output and exited
        peak = max(peak, memory_mb(profiler.pid, "VmHWM:"))
        time.sleep(0.05)
    return seconds, cpu, steady, peak, samples.run_ns / samples.runs if samples.runs else 0.0


@contextlib.contextmanager
def headers_for_bcc_tools():
    """bcc's own tools look for kernel headers only in /lib/modules/RELEASE/{build,source}.
    Where the running kernel has none, point them at the stand-in bpfprof found, for the
    length of the benchmark."""
    from bpfprof.collector.probe.kernel_headers import find_kernel_headers

    modules = Path("/lib/modules") / os.uname().release
    headers = find_kernel_headers()
    if modules.exists() or headers.source is None:
        yield
        return
    modules.mkdir(parents=True)
    try:
        (modules / "build").symlink_to(headers.build)
        (modules / "source").symlink_to(headers.source)
        yield
    finally:
        shutil.rmtree(modules)


def time_to_first_sample(bpfprof: List[str], tmp: Path) -> float:
    """From starting `record` to its command running, which happens once sampling is on."""
    started = time.monotonic()
    out = subprocess.run(
        [*bpfprof, "record", "-o", f"{tmp}/start.folded", "--",
         sys.executable, "-c", "import time; print(time.monotonic())"],
        capture_output=True, text=True, check=True,
    )
    return float(out.stdout.split()[0]) - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20, help="length of the work without a profiler")
    add_build_option(parser)
    args = parser.parse_args()
    commands = profilers(args.build)
    names = [n for n in commands if shutil.which(commands[n](Path("."))[0])]

    with tempfile.TemporaryDirectory() as d, headers_for_bcc_tools(), bpf_stats():
        tmp = Path(d)
        work = build_work(tmp)
        n = calibrate(work, args.seconds)
        results = {name: [] for name in ["none", *names]}
        for r in range(args.rounds):
            order = ["none", *names]
            order = order[r % len(order):] + order[: r % len(order)]
            for name in order:
                if name == "none":
                    time.sleep(SETTLE_S)  # the same idle start as a profiled run
                    results[name].append((run_work(work, n), 0.0, 0.0, 0.0, 0.0))
                else:
                    results[name].append(under_profiler(name, commands[name](tmp), work, n))

        base = statistics.median(r[0] for r in results["none"])
        print(f"work: {os.cpu_count()} copies, {base:.2f} s median without a profiler, {args.rounds} rounds")
        print(f"{'profiler':<16} {'slowdown':>9} {'CPU/core':>9} {'RSS':>9} {'peak RSS':>9} {'BPF ns/sample':>14}")
        for name in names:
            slow = statistics.median(r[0] for r in results[name]) / base - 1
            cpu = statistics.median(r[1] for r in results[name])
            steady = max(r[2] for r in results[name])
            peak = max(r[3] for r in results[name])
            per_sample = statistics.median(r[4] for r in results[name])
            print(f"{name:<16} {100 * slow:8.2f}% {100 * cpu:8.2f}% {steady:7.1f}MB {peak:7.1f}MB "
                  + (f"{per_sample:14.0f}" if per_sample else f"{'-':>14}"))
        for name, bpfprof in bpfprof_builds(args.build).items():
            starts = [time_to_first_sample(bpfprof, tmp) for _ in range(3)]
            print(f"{name} start to first sample: median {statistics.median(starts):.2f} s "
                  f"(min {min(starts):.2f}, max {max(starts):.2f})")


if __name__ == "__main__":
    run_main(main, "cpu_overhead")
