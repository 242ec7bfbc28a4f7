"""How closely bpfprof's Python frames match where a Python program really spends its CPU, beside py-spy.

A CPU-bound script (written to a temporary folder) calls a few leaf functions from a
driver loop, steering their CPU shares towards roughly 50/25/15/10 %, and times every call
with its own thread's CPU clock (time.thread_time_ns): that is the truth, written as JSON
when the script ends. The script runs once under `bpfprof record -F 99 -- python ...` and
once under `py-spy record --rate 99 -- python ...`. Each sample counts for the deepest of
the script's leaf functions on its stack (samples with none are left out); a function's
share of those samples is compared with its share of the CPU measured in that same run.
Then the same again with the script's two-thread variant: each thread calls one function
of its own, one of them sleeping between calls, so their shares differ (about 85/15).

Each run is repeated --rounds times, since one run's sampling noise is about as large
as the errors compared. Printed: one table per script (truth %, each profiler's %, each
profiler's |error| in percentage points, all means over the rounds), then PASS/FAIL for
"every function within 3 points of truth in every round" per profiler and "bpfprof's
largest error no worse than py-spy's" (each round's largest error, averaged). It exits 0 whatever the
verdicts; only a crash or a missing tool makes it fail.

    sudo .venv/bin/python bench/python_accuracy.py [--seconds 20] [--rounds 3] [--python /path/to/python3]
                                                   [--no-threads] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List

from _proc import check_tools, run_main, running

DEFAULT_PYTHON = "/root/.pyenv/versions/3.12.1/bin/python3"
RATE = 99
TOLERANCE_PP = 3.0

WORKLOAD = r'''
"""Leaf functions timed by their own thread's CPU clock; the totals are the truth."""
import json, random, signal, sys, threading, time

signal.signal(signal.SIGINT, signal.SIG_DFL)  # stopped by the benchmark: no traceback


def crunch_ints(n):
    s = 0
    for i in range(n):
        s += i * i % 7
    return s


def join_strings(n):
    parts = []
    for i in range(n):
        parts.append(str(i))
    length = len("-".join(parts))
    # Freed here rather than as the frame is popped: that work would already be on the
    # caller's stack for a sampler, yet inside this function for the truth's clock.
    del parts
    return length


def count_keys(n):
    d = {}
    for i in range(n):
        k = i & 1023
        d[k] = d.get(k, 0) + 1
    return len(d)


def sum_floats(n):
    x = 0.0
    for i in range(n):
        x += (i * 0.5) ** 0.5
    return x


TARGET = {crunch_ints: 0.50, join_strings: 0.25, count_keys: 0.15, sum_floats: 0.10}
UNIT = {crunch_ints: 20000, join_strings: 15000, count_keys: 15000, sum_floats: 20000}  # ~1-2 ms each
spent = {}  # function name -> CPU ns inside it
lock = threading.Lock()
# 3.6 has the thread's CPU clock in float seconds only (exact to the ns for days).
thread_ns = getattr(time, "thread_time_ns", lambda: int(time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID) * 1e9))


def timed(fn, rng):
    n = int(UNIT[fn] * rng.uniform(0.5, 1.5))  # uneven lengths: no rhythm for a sampler to lock onto
    start = thread_ns()
    fn(n)
    cpu = thread_ns() - start
    with lock:
        spent[fn.__name__] = spent.get(fn.__name__, 0) + cpu


def mixed(deadline):
    """Call whichever function is furthest below its target share."""
    rng = random.Random(1)
    while time.monotonic() < deadline:
        total = sum(spent.values()) or 1
        fn = max(TARGET, key=lambda f: TARGET[f] - spent.get(f.__name__, 0) / total)
        timed(fn, rng)


def one_function(fn, deadline, pause):
    rng = random.Random(fn.__name__)
    while time.monotonic() < deadline:
        timed(fn, rng)
        if pause:
            time.sleep(pause)  # lets go of the GIL: this thread gets the smaller share


mode, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + seconds
if mode == "single":
    mixed(deadline)
else:
    threads = [threading.Thread(target=one_function, args=(crunch_ints, deadline, 0)),
               threading.Thread(target=one_function, args=(join_strings, deadline, 0.004))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
with open(out, "w") as f:
    json.dump({"cpu_ns": spent, "python": sys.version.split()[0]}, f)
'''
WORKLOAD_NAME = "accuracy_workload.py"

# `qualname (file.py)` from bpfprof, `func (path/file.py:LINE)` from py-spy; native and
# kernel frames have no " (file)" suffix.
PYTHON_FRAME = re.compile(r"^(?P<name>\S.*) \((?P<file>[^()]+?)(?::\d+)?\)$")


def profiler_commands(py_spy: str) -> Dict[str, Callable[[str, List[str]], List[str]]]:
    return {
        "bpfprof": lambda out, cmd: [sys.executable, "-m", "bpfprof", "record", "-F", str(RATE), "-o", out, "--", *cmd],
        "py-spy": lambda out, cmd: [py_spy, "record", "--rate", str(RATE), "--format", "raw", "-o", out, "--", *cmd],
    }


def run_profiled(name: str, argv: List[str], out: Path, log: Path, timeout: float) -> None:
    with open(log, "w") as errors:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errors, stderr=subprocess.STDOUT,
                             start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        running.append(p)
        try:
            status = p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name} did not finish within {timeout:.0f} s: {' '.join(argv)}")
        running.remove(p)
    if status != 0 or not out.exists():
        tail = "\n    ".join(log.read_text().strip().splitlines()[-8:])
        raise RuntimeError(f"{name} failed (exit {status}): {' '.join(argv)}\n    {tail}")


def frame_function(frame: str, workload_file: str):
    """The function name of a Python frame in the workload's file, else None."""
    m = PYTHON_FRAME.match(frame)
    if m and os.path.basename(m["file"]) == workload_file:
        return m["name"].rsplit(".", 1)[-1]
    return None


def attribute(folded: Path, functions: List[str]) -> Counter:
    """Samples per workload function (the deepest one on each stack); also 'total' and
    'no python' (samples with no Python frame of any file)."""
    counts = Counter()
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        counts["total"] += n
        frames = stack.split(";")
        if not any(PYTHON_FRAME.match(f) for f in frames):
            counts["no python"] += n
        names = [frame_function(f, WORKLOAD_NAME) for f in frames]
        deepest = next((f for f in reversed(names) if f in functions), None)
        if deepest:
            counts[deepest] += n
    return counts


def compare(title: str, mode: str, args, tmp: Path, commands) -> None:
    """Run the script under each profiler, args.rounds times; print the table (means over
    the rounds) and the verdicts."""
    names = list(commands)
    truth: Dict[str, List[Dict[str, float]]] = {n: [] for n in names}  # per round: function -> share of CPU
    found: Dict[str, List[Dict[str, float]]] = {n: [] for n in names}  # per round: function -> share of samples
    counts: Dict[str, Counter] = {n: Counter() for n in names}  # summed over the rounds
    python_version = "?"
    for round_ in range(args.rounds):
        for name, command in commands.items():
            stem = f"{name}-{mode}-{round_}"
            truth_file, out = tmp / f"truth-{stem}.json", tmp / f"{stem}.folded"
            argv = command(str(out), [args.python, str(tmp / WORKLOAD_NAME), mode, str(args.seconds), str(truth_file)])
            run_profiled(name, argv, out, tmp / f"{stem}.log", timeout=args.seconds + 120)
            measured = json.loads(truth_file.read_text())
            python_version = measured["python"]
            truth[name].append(shares(measured["cpu_ns"]))
            run_counts = attribute(out, list(measured["cpu_ns"]))
            counts[name] += run_counts
            found[name].append(shares({fn: run_counts[fn] for fn in measured["cpu_ns"]}))

    functions = sorted(truth[names[0]][0], key=truth[names[0]][0].get, reverse=True)
    # errors[profiler][round][function], in percentage points
    errors = {n: [{fn: 100 * abs(f.get(fn, 0) - t[fn]) for fn in functions} for t, f in zip(truth[n], found[n])]
              for n in names}
    worst = {n: [max(e.values()) for e in errors[n]] for n in names}  # per round

    def mean(values) -> float:
        return statistics.mean(values)

    print(f"\n{title}: {args.rounds} rounds of {args.seconds:.0f} s per profiler, {RATE} Hz, "
          f"CPython {python_version}; means over the rounds")
    print(f"{'function':<14} {'truth % (' + '/'.join(names) + ' runs)':>27}"
          + "".join(f" {n + ' %':>10}" for n in names) + "".join(f" {'|err| ' + n:>14}" for n in names))
    for fn in functions:
        print(f"{fn:<14} {' / '.join(f'{100 * mean(t[fn] for t in truth[n]):.1f}' for n in names):>27}"
              + "".join(f" {100 * mean(f.get(fn, 0) for f in found[n]):10.1f}" for n in names)
              + "".join(f" {mean(e[fn] for e in errors[n]):14.1f}" for n in names))
    label = "(mean of each round's)"
    print(f"{'max |err|':<14} {label:>27}" + " " * 11 * len(names)
          + "".join(f" {mean(worst[n]):14.1f}" for n in names))
    for n in names:
        named = sum(counts[n][fn] for fn in functions)
        print(f"  {n}: {counts[n]['total']} samples, {named} in these functions, "
              f"{counts[n]['no python']} with no Python frame at all; largest error per round: "
              + ", ".join(f"{w:.1f}" for w in worst[n]) + " pp")
    fewest = min(sum(counts[n][fn] for fn in functions) for n in names) // args.rounds
    top = mean(t[functions[0]] for t in truth[names[0]])
    print(f"  sampling noise alone (1 s.d.) for a {100 * top:.0f} % share over the {fewest} samples of one run: "
          f"{100 * math.sqrt(top * (1 - top) / max(fewest, 1)):.1f} pp")
    for n in names:
        print(f"{'PASS' if max(worst[n]) <= TOLERANCE_PP else 'FAIL'}  {n}: every function within "
              f"{TOLERANCE_PP:.0f} pp of truth in every round (largest error {max(worst[n]):.1f} pp)")
    b, s = mean(worst["bpfprof"]), mean(worst["py-spy"])
    print(f"{'PASS' if b <= s else 'FAIL'}  bpfprof's largest error ({b:.1f} pp, mean over rounds) "
          f"no worse than py-spy's ({s:.1f} pp)")


def shares(amounts: Dict[str, float]) -> Dict[str, float]:
    total = sum(amounts.values())
    return {k: (v / total if total else 0.0) for k, v in amounts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="length of each profiled run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per profiler and script")
    parser.add_argument("--python", default=DEFAULT_PYTHON, help="the CPython that runs the workload")
    parser.add_argument("--no-threads", action="store_true", help="skip the two-thread script")
    parser.add_argument("--keep", metavar="DIR", help="keep the script, profiles and truths in DIR")
    args = parser.parse_args()

    commands = profiler_commands(check_tools(args.python))

    with tempfile.TemporaryDirectory(prefix="bpfprof-accuracy-") as d:
        tmp = Path(args.keep or d)
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / WORKLOAD_NAME).write_text(WORKLOAD)
        compare("one thread, four functions", "single", args, tmp, commands)
        if not args.no_threads:
            compare("two threads, one function each", "threads", args, tmp, commands)


if __name__ == "__main__":
    run_main(main, "python_accuracy")
