"""Native stacks without frame pointers: how many samples of a known call chain carry the
whole chain, in order, under bpfprof (unwinding in BPF from .eh_frame, and by frame
pointers only), bcc's `profile` and `perf record` (frame pointers, and DWARF: perf copies
8 KiB of stack per sample and unwinds it afterwards), in one run.

The work: tests/fixtures/unwind/no_frame_pointers.c built with -O2 -fomit-frame-pointer,
`chain` mode: main -> level_1 -> ... -> level_8, spinning in level_8, --seconds long, once
per profiler, each sampling that process at 99 Hz. Printed per profiler: samples, the share
with the chain from main to level_8 whole and in order, and its own CPU from its start to
the work's end (start-up and bcc's compile included; as a share of one core); then bpfprof's share against each other's, as ratios.

    sudo .venv/bin/python bench/native_unwind.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from _proc import ToolMissing, cpu_seconds, run_main
from cpu_overhead import headers_for_bcc_tools

HERE = Path(__file__).parent
FIXTURE = HERE.parent / "tests" / "fixtures" / "unwind" / "no_frame_pointers.c"
CHAIN = ["main"] + [f"level_{n}" for n in range(1, 9)]  # root to leaf
HZ = "99"

Stacks = List[Tuple[List[str], int]]  # (functions root first, count)


def whole_chain(functions: List[str]) -> bool:
    n = len(CHAIN)
    return any(functions[i:i + n] == CHAIN for i in range(len(functions) - n + 1))


def read_folded(text: str) -> Stacks:
    stacks = []
    for line in text.splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append(([f.split(" (")[0] for f in frames.split(";")], int(count)))
    return stacks


def read_perf_script(text: str) -> Stacks:
    """`perf script` prints a header line per sample, then its frames leaf first."""
    stacks, frames = [], None
    for line in text.splitlines() + [""]:
        if not line.strip():
            if frames is not None:
                stacks.append((frames[::-1], 1))
            frames = None
        elif line[0] in " \t":
            if frames is not None:
                parts = line.split()
                frames.append(parts[1].split("+0x")[0] if len(parts) > 1 else "?")
        else:
            frames = []
    return stacks


def run_under(argv_for_pid: Callable[[int, Path], List[str]], work: Path, seconds: float, tmp: Path,
              settle: float = 1.0) -> Tuple[subprocess.Popen, float]:
    """Starts the work, then the profiler on its pid; returns the profiler (ended) and its CPU share."""
    job = subprocess.Popen([str(work), "chain", str(seconds + settle + 1)])
    profiler = subprocess.Popen(argv_for_pid(job.pid, tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    began = time.monotonic()
    job.wait()
    elapsed = time.monotonic() - began
    try:
        cpu = cpu_seconds(profiler.pid)
    except OSError:
        cpu = 0.0
    profiler.wait(timeout=60)
    return profiler, 100 * cpu / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise ToolMissing("needs root: run it with sudo")
    for tool in ("profile-bpfcc", "perf", "gcc"):
        if shutil.which(tool) is None:
            raise ToolMissing(f"{tool} is missing (apt-get install bpfcc-tools linux-perf gcc)")
    tmp = Path(tempfile.mkdtemp(prefix="bpfprof-unwind-"))
    work = tmp / "no_frame_pointers"
    flags = ["gcc", "-O2", "-g", "-fomit-frame-pointer"]
    subprocess.run([*flags, "-shared", "-fPIC", "-o", str(tmp / "libunwind_lib.so"), str(FIXTURE.parent / "unwind_lib.c")],
                   check=True)
    subprocess.run([*flags, "-o", str(work), str(FIXTURE), f"-L{tmp}", "-lunwind_lib", f"-Wl,-rpath,{tmp}"], check=True)
    seconds = args.seconds
    bpfprof = [sys.executable, "-m", "bpfprof", "record", "-F", HZ]
    profilers: Dict[str, Tuple[Callable[[int, Path], List[str]], Callable[[subprocess.Popen, Path], Stacks]]] = {
        "bpfprof (.eh_frame in BPF)": (
            lambda pid, t: bpfprof + ["--dwarf", "-p", str(pid), "-o", str(t / "dwarf.folded")],
            lambda p, t: read_folded((t / "dwarf.folded").read_text())),
        "bpfprof (frame pointers)": (
            lambda pid, t: bpfprof + ["--no-dwarf", "-p", str(pid), "-o", str(t / "fp.folded")],
            lambda p, t: read_folded((t / "fp.folded").read_text())),
        "bcc profile": (
            lambda pid, t: ["profile-bpfcc", "-F", HZ, "-f", "-p", str(pid), str(int(seconds + 1))],
            lambda p, t: read_folded(p.stdout.read())),
        "perf -g (frame pointers)": (
            lambda pid, t: ["perf", "record", "-F", HZ, "-g", "-p", str(pid), "-o", str(t / "fp.data")],
            lambda p, t: read_perf_script(_perf_script(t / "fp.data"))),
        "perf --call-graph dwarf": (
            lambda pid, t: ["perf", "record", "-F", HZ, "--call-graph", "dwarf", "-p", str(pid),
                            "-o", str(t / "dwarf.data")],
            lambda p, t: read_perf_script(_perf_script(t / "dwarf.data"))),
    }
    results = {}
    with headers_for_bcc_tools():
        for name, (argv, read) in profilers.items():
            profiler, cpu = run_under(argv, work, seconds, tmp)
            if profiler.returncode not in (0, None):
                print(f"{name}: exited with {profiler.returncode}: {profiler.stderr.read().strip()[-300:]}")
                continue
            stacks = read(profiler, tmp)
            total = sum(n for _, n in stacks)
            chained = sum(n for f, n in stacks if whole_chain(f))
            results[name] = chained / total if total else 0.0
            print(f"{name:28} {total:6d} samples  {100 * results[name]:6.1f}% with main..level_8 in order"
                  f"  own CPU {cpu:5.2f}% of a core", flush=True)
    ours = results.get("bpfprof (.eh_frame in BPF)")
    for name, value in results.items():
        if ours is not None and not name.startswith("bpfprof (") and value:
            print(f"bpfprof vs {name}: x{ours / value:.2f}")
    shutil.rmtree(tmp, ignore_errors=True)


def _perf_script(data: Path) -> str:
    return subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,tid,ip,sym"], capture_output=True,
                          text=True, check=True).stdout


if __name__ == "__main__":
    run_main(main, "native_unwind")
