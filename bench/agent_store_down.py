"""The profile store goes away for ten minutes and comes back: the agent must not crash, its
memory must stay bounded while profiles pile up, and pushing must resume by itself.

Two agents push to one Pyroscope stand-in on loopback:
  default      `--interval 15s --push-queue 60`: 15 minutes of profiles held, so a
               ten-minute outage loses nothing
  small queue  `--interval 5s --push-queue 30`: 2.5 minutes held, so the outage drops
               the oldest (counted in bpfprof_pushes_dropped_total)

Timeline: the store is up for --before minutes, down for --down minutes (connections
refused), then up for --after minutes. Every 30 s it prints each agent's resident memory
and push queue depth; at the end, per agent: requests the store received before, during and
after the outage, the agent's own counts of pushes, failed attempts and drops, the peak
memory, and how long after the store came back the first push arrived.

    sudo .venv/bin/python bench/agent_store_down.py [--before 1] [--down 10] [--after 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict

from _proc import ToolMissing, memory_mb, run_main, start, stop_all
from _store import LoopbackStore, free_port

AGENTS = {"default": ("15s", "60"), "small queue": ("5s", "30")}


def scrape(port: int) -> Dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#") and "{" not in line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=float, default=1)
    parser.add_argument("--down", type=float, default=10)
    parser.add_argument("--after", type=float, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise ToolMissing("needs root: run it with sudo")
    tmp = Path(tempfile.mkdtemp(prefix="bpfprof-store-down-"))
    stores = {name: LoopbackStore() for name in AGENTS}  # one each, to count each agent's pushes
    ports = {name: free_port() for name in AGENTS}
    for store in stores.values():
        store.up()
    agents = {
        name: start([sys.executable, "-m", "bpfprof", "agent", "--push-url", stores[name].url,
                     "--interval", interval, "--push-queue", queue, "--metrics-addr", f"127.0.0.1:{ports[name]}",
                     "--log-file", str(tmp / f"{name.replace(' ', '-')}.log")])
        for name, (interval, queue) in AGENTS.items()
    }
    began = time.monotonic()
    phases = [("up", args.before), ("down", args.down), ("up again", args.after)]
    received: Dict[str, Dict[str, int]] = {name: {} for name in AGENTS}
    peak = {name: 0.0 for name in AGENTS}
    back_at = None
    first_after: Dict[str, float] = {}
    print(f"{'min':>5}  " + "  ".join(f"{name}: RSS MB, queue" for name in AGENTS), flush=True)
    for phase, minutes in phases:
        before = {name: store.requests for name, store in stores.items()}
        if phase == "down":
            for store in stores.values():
                store.down()
        elif phase == "up again":
            for store in stores.values():
                store.up()
            back_at = time.monotonic()
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            time.sleep(min(30.0, max(0.0, end - time.monotonic())))
            cells = []
            for name, agent in agents.items():
                if agent.poll() is not None:
                    raise RuntimeError(f"agent {name!r} exited (status {agent.returncode}) while the store was {phase}")
                rss = memory_mb(agent.pid, "VmRSS:")
                peak[name] = max(peak[name], rss)
                cells.append(f"{rss:.0f}, {scrape(ports[name]).get('bpfprof_push_queue_depth', 0):.0f}")
                if back_at and name not in first_after and stores[name].requests > before[name]:
                    first_after[name] = time.monotonic() - back_at
            print(f"{(time.monotonic() - began) / 60:5.1f}  {phase:<8} " + "  ".join(cells), flush=True)
        for name, store in stores.items():
            received[name][phase] = store.requests - before[name]
    print()
    for name, agent in agents.items():
        metrics = scrape(ports[name])
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=30)
        print(f"{name}: store received {received[name]['up']} requests before, {received[name]['down']} during, "
              f"{received[name]['up again']} after the outage (first within "
              f"{first_after.get(name, float('nan')):.0f} s, checked every 30 s); agent: "
              f"{metrics.get('bpfprof_pushes_total', 0):.0f} pushed, "
              f"{metrics.get('bpfprof_push_failures_total', 0):.0f} failed attempts, "
              f"{metrics.get('bpfprof_pushes_dropped_total', 0):.0f} dropped, "
              f"queue {metrics.get('bpfprof_push_queue_depth', 0):.0f} at the end; peak RSS {peak[name]:.0f} MB; "
              f"exit status {code}")
    stop_all()


if __name__ == "__main__":
    run_main(main, "agent_store_down")
