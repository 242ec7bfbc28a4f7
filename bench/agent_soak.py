"""The continuous agent left running: its own CPU and memory over a long soak of the whole
machine while thousands of short-lived processes come and go, beside bcc's `profile` and
`perf record` sampling the same machine at the same rate in the same run.

The machine's work for the length of the soak:
  churn      a shell loop starting ~30 short-lived processes a second (true, echo, sleep)
  pythons    a new CPython process every 2 s, each running for ~0.3 s (pyenv's and Debian's)
  steady     one long-running Python process busy about a third of the time

The profilers, all whole-system at 19 Hz, for the whole soak:
  bpfprof agent    `bpfprof agent --interval 15s --output-dir ... --push-url ... --metrics-addr ...`,
                   pushing to a Pyroscope stand-in on loopback
  bcc profile      `profile-bpfcc -F 19 -a -f` (stacks counted in the kernel, printed at the end)
  perf record      `perf record -F 19 -a -g`

With `-t TYPE` the agents make those profiles (repeatable, as the agent takes it; its own
default, cpu, without). With -t memory or -t faults the machine also runs
  memory     one long-running Python process obtaining and touching 1-8 MiB buffers ten
             times a second, holding the last 16, and building and dropping small objects

At 2, 5, 30 and 60 minutes (or the checkpoints within --minutes) it prints each profiler's
CPU (share of one core, since the start and since the previous checkpoint) and resident
memory, and for each agent the processes it has seen, profiles written and losses from its
metrics; then bpfprof against the others as ratios. At the end each agent gets SIGTERM and
the time it takes to exit is printed. With --build another bpfprof's agent runs beside this
one's. With -t memory or -t faults, each checkpoint also gives each agent's losses by reason,
the memory ranges it holds (its metrics) and the entries in its memory and fault maps
(counted by bpftool), and the end puts them side by side: accounting holds when nothing is
lost, ranges and map entries stay bounded and RSS stays flat.

    sudo .venv/bin/python bench/agent_soak.py [--minutes 60] [-t cpu -t memory] [--build NAME=PYTHON]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

from _proc import ToolMissing, add_build_option, bpfprof_builds, cpu_seconds, memory_mb, run_main, start, stop_all
from _store import LoopbackStore, free_port
from cpu_overhead import headers_for_bcc_tools

WARM_UP_S = 30  # compiled, attached, first profiles cut: measured from here
CHURN = "while :; do /bin/true; /bin/echo x >/dev/null; /bin/sleep 0.1; done"
PYTHON_CHILD = "import time; end = time.monotonic() + 0.3\nwhile time.monotonic() < end: sum(range(1000))"
STEADY = """
import signal, time
signal.signal(signal.SIGINT, signal.SIG_DFL)
def work():
    end = time.monotonic() + 0.1
    while time.monotonic() < end:
        sum(i * i for i in range(1000))
while True:
    work()
    time.sleep(0.2)
"""


MEMORY_CHURN = """
import random, signal, time
signal.signal(signal.SIGINT, signal.SIG_DFL)
held = []
while True:
    held = held[-15:] + [b"x" * (random.randint(1, 8) << 20)]
    words = [str(i) for i in range(20000)]
    time.sleep(0.1)
"""
# The agent's BPF maps that -t memory and -t faults fill, by the names the kernel keeps
# (at most 15 characters).
MEMORY_MAPS = ("memory_", "alloc_", "faults_")


def pythons() -> List[str]:
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    return found + ["/usr/bin/python3"]


def python_loop(interpreters: List[str]) -> str:
    """A shell loop starting one short CPython every 2 s, going round the interpreters."""
    runs = "; ".join(f"{p} -c '{PYTHON_CHILD}'; /bin/sleep 1.7" for p in interpreters)
    return f"while :; do {runs}; done"


def scrape(port: int) -> Dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    values: Dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            base = name.split("{")[0]
            if base != name:
                values[name] = float(value)  # one labelled series, as `base{label="..."}`
            values[base] = values.get(base, 0.0) + float(value)
    return values


def losses(metrics: Dict[str, float]) -> Dict[str, float]:
    """Reason -> losses, of those that happened."""
    return {name.split('"')[1]: value for name, value in metrics.items()
            if name.startswith("bpfprof_lost_total{") and value}


def map_entries(pid: int) -> Dict[str, int]:
    """Entries in each of the process's BPF maps of memory and faults (found through its
    descriptors), as bpftool counts them."""
    ids = []
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            ids += [int(line.split()[1]) for line in info.read_text().splitlines() if line.startswith("map_id:")]
    entries = {}
    for map_id in sorted(set(ids)):
        shown = subprocess.run(["bpftool", "-j", "map", "show", "id", str(map_id)], capture_output=True, text=True)
        if shown.returncode != 0:
            continue
        described = json.loads(shown.stdout)
        if described["name"].startswith(MEMORY_MAPS) and described["type"] in ("hash", "stack_trace"):
            dumped = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)], capture_output=True, text=True)
            entries[described["name"]] = len(json.loads(dumped.stdout)) if dumped.returncode == 0 else -1
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("-t", "--type", dest="types", action="append", default=[], metavar="TYPE",
                        help="a profile the agents make, repeatable (default: the agent's own, cpu)")
    add_build_option(parser)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise ToolMissing("needs root: run it with sudo")
    for tool in ("profile-bpfcc", "perf"):
        if shutil.which(tool) is None:
            raise ToolMissing(f"{tool} is missing (apt-get install bpfcc-tools linux-perf)")
    memory = bool({"memory", "faults"} & set(args.types))
    if memory and shutil.which("bpftool") is None:
        raise ToolMissing("bpftool is missing (apt-get install bpftool)")
    checkpoints = [m for m in (2, 5, 30, 60) if m < args.minutes] + [args.minutes]
    seconds = args.minutes * 60
    tmp = Path(tempfile.mkdtemp(prefix="bpfprof-soak-"))
    store = LoopbackStore()
    store.up()
    with headers_for_bcc_tools():
        ports = {}  # each agent's metrics
        profilers = {}
        for build, bpfprof in bpfprof_builds(args.build).items():
            name, ports[name], out = f"{build} agent", free_port(), tmp / build.replace(" ", "-")
            out.mkdir()
            profilers[name] = start([*bpfprof, "agent", "--output-dir", str(out / "profiles"), "--interval", "15s",
                                     "--metrics-addr", f"127.0.0.1:{ports[name]}", "--push-url", store.url,
                                     "--log-file", str(out / "agent.log"),
                                     *(option for kind in args.types for option in ("-t", kind))])
        profilers.update({
            "bcc profile": start(["profile-bpfcc", "-F", "19", "-a", "-f", str(int(seconds + WARM_UP_S + 60))],
                                 stdout=open(tmp / "bcc.folded", "w"), stderr=subprocess.DEVNULL),
            "perf record": start(["perf", "record", "-F", "19", "-a", "-g", "-o", str(tmp / "perf.data")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        })
        start(["sh", "-c", CHURN])
        start(["sh", "-c", python_loop(pythons())], stdout=subprocess.DEVNULL)
        start([sys.executable, "-c", STEADY])
        if memory:
            start([sys.executable, "-c", MEMORY_CHURN])
        time.sleep(WARM_UP_S)
        for name, p in profilers.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited at start (status {p.returncode})")
        began = time.monotonic()
        first = {name: cpu_seconds(p.pid) for name, p in profilers.items()}
        previous, previous_t = dict(first), began
        print(f"soak of {args.minutes:g} min, whole system at 19 Hz, {os.cpu_count()} CPUs, agents "
              f"-t {' -t '.join(args.types) or 'cpu'}; CPU as % of one core (since start / since last), RSS MB; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        rows = []
        accounting: Dict[str, List[dict]] = {name: [] for name in ports}  # per checkpoint: what -t memory keeps
        for minute in checkpoints:
            time.sleep(max(0.0, began + minute * 60 - time.monotonic()))
            now = time.monotonic()
            row = {"minute": minute}
            for name, p in profilers.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited during the soak (status {p.returncode})")
                cpu = cpu_seconds(p.pid)
                row[name] = (100 * (cpu - first[name]) / (now - began),
                             100 * (cpu - previous[name]) / (now - previous_t), memory_mb(p.pid, "VmRSS:"))
                previous[name] = cpu
            previous_t = now
            rows.append(row)
            print(f"{minute:5g} min  " + "  ".join(
                f"{name}: {row[name][0]:.2f}% / {row[name][1]:.2f}%, {row[name][2]:.0f} MB" for name in profilers)
                + f"  | {store.requests} pushes ({store.series} series)", flush=True)
            for name, port in ports.items():
                metrics = scrape(port)
                print(f"         {name}: {metrics.get('bpfprof_processes_seen_total', 0):.0f} processes seen, "
                      f"{metrics.get('bpfprof_profiles_written_total', 0):.0f} profiles, "
                      f"{metrics.get('bpfprof_lost_total', 0):.0f} lost, "
                      f"{metrics.get('bpfprof_symbol_cache_frames', 0):.0f} frames cached", flush=True)
                if memory:
                    held = {"lost": losses(metrics), "ranges": metrics.get("bpfprof_memory_ranges", 0),
                            "maps": map_entries(profilers[name].pid), "rss": row[name][2]}
                    accounting[name].append(held)
                    print(f"         {name}: lost {held['lost'] or 'nothing'}; {held['ranges']:.0f} memory ranges "
                          f"held; map entries {held['maps']}; load average {os.getloadavg()[0]:.2f}", flush=True)
        for name in ports:
            sent = time.monotonic()
            profilers[name].send_signal(signal.SIGTERM)
            code = profilers[name].wait(timeout=30)
            print(f"{name}: SIGTERM to exit {time.monotonic() - sent:.2f} s, status {code}")
        stop_all()
    last = rows[-1]
    for name in ports:
        ours_cpu, _, ours_rss = last[name]
        for other in ("bcc profile", "perf record"):
            cpu, _, rss = last[other]
            print(f"{name} vs {other}: CPU x{ours_cpu / cpu:.2f}, RSS x{ours_rss / rss:.2f}"
                  if cpu and rss else f"{name} vs {other}: {other} used no measurable CPU")
    for name, held in accounting.items():
        if held:
            print_accounting(name, held)
    shutil.rmtree(tmp, ignore_errors=True)


def print_accounting(agent: str, held: List[dict]) -> None:
    """What -t memory kept at each checkpoint: losses, ranges held, map entries, RSS."""
    ranges = ", ".join(f"{h['ranges']:.0f}" for h in held)
    rss = ", ".join(f"{h['rss']:.0f}" for h in held)
    print(f"{agent}: lost {held[-1]['lost'] or 'nothing'}; memory ranges held at the checkpoints {ranges}; "
          f"RSS {rss} MB ({held[-1]['rss'] - held[0]['rss']:+.0f} MB from the first checkpoint)")
    for map_name in sorted(held[-1]["maps"]):
        print(f"  map {map_name}: {', '.join(str(h['maps'].get(map_name, 0)) for h in held)} entries")


if __name__ == "__main__":
    run_main(main, "agent_soak")
