"""`bpfprof agent -t memory` keeps its accounting over time: what processes hold as they
exit is counted in the interval they exit in, and their ranges then leave the kernel's
map, whose size the metrics show."""

from __future__ import annotations

import subprocess

import pytest

from test_agent import agent_in, free_port, scrape, scrape_after_cuts  # noqa: F401 (agent_in is a fixture)
from samples import read_samples

pytestmark = pytest.mark.usefixtures("bpf_ready")

MiB = 1 << 20
PROCESSES, HELD_MIB = 100, 4
INUSE_SPACE = 3  # alloc_objects, alloc_space, inuse_objects, inuse_space


def test_memory_held_at_exit_is_counted_once_and_freed(agent_in, tmp_path, build_c):  # noqa: F811
    leaver = build_c("memory_leaver")
    port = free_port()
    out = tmp_path / "profiles"
    agent = agent_in("-t", "memory", "--output-dir", str(out), "--interval", "1s", "--metrics-addr", f"127.0.0.1:{port}")
    agent.wait_for("agent started")
    before = scrape_after_cuts(agent, port, lambda m: True)[("bpfprof_memory_ranges", ())]
    for _ in range(PROCESSES):
        subprocess.run([str(leaver), str(HELD_MIB)], check=True)
    # The ranges the processes left (three or more each) are gone from the map within a few cuts.
    metrics = scrape_after_cuts(agent, port, lambda m: m[("bpfprof_memory_ranges", ())] <= before + PROCESSES,
                                most=10)
    agent.stop()
    lost = {dict(labels)["reason"]: n for (name, labels), n in metrics.items() if name == "bpfprof_lost_total"}
    # (a stack collision loses a stack, not the range's accounting)
    assert not any(lost.get(f"LOSS_MEMORY_{what}_FULL") for what in ("RANGES", "CALLS", "HOLES")), lost
    held = {}  # pid -> the sizes in use it was counted with, over every interval
    for f in out.glob("*.memory.pb.gz"):
        for s in read_samples(f):
            if s.labels["comm"] == "memory_leaver" and s.values[INUSE_SPACE]:
                held.setdefault(s.labels["pid"], []).append(s.values[INUSE_SPACE])
    assert len(held) == PROCESSES
    # Each process's mapping (and what its loader mapped), counted in one interval only.
    assert all(HELD_MIB * MiB <= sum(sizes) < (HELD_MIB + 1) * MiB for sizes in held.values()), held
