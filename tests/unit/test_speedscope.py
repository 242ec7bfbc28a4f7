"""speedscope's file format: one sampled profile per thread, frames shared, stacks root
first, weights in the profile's unit."""

from __future__ import annotations

import json

from bpfprof.collector.output.pprof import write_pprof
from bpfprof.collector.profile import Labels, block_profile, cpu_profile
from bpfprof.symbolizer.frames import Frame, FrameKind, Module
from conftest import run_bpfprof

APP = Module("/usr/bin/app")
MAIN = Frame(FrameKind.NATIVE, "main", APP, 0x1100, "app.c", 30, 28)
WORK = Frame(FrameKind.NATIVE, "work", APP, 0x1200)
READ = Frame(FrameKind.KERNEL, "ksys_read", Module("[kernel.kallsyms]"), 0xFFFFFFFF81000000)
CALC = Frame(FrameKind.PYTHON, "calc", None, 0, "app.py", 41, 39)
T1 = Labels(pid=10, tid=10, comm="app", thread="main")
T2 = Labels(pid=10, tid=11, comm="app", thread="worker")


def convert(tmp_path, profile):
    source, out = tmp_path / "in.pb.gz", tmp_path / "out.speedscope.json"
    write_pprof(profile, str(source))
    result = run_bpfprof("report", str(source), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def stacks(document, profile):
    frames = document["shared"]["frames"]
    return {tuple(frames[i]["name"] for i in sample): weight
            for sample, weight in zip(profile["samples"], profile["weights"])}


def test_one_profile_per_thread_with_root_first_stacks(tmp_path):
    profile = cpu_profile(hz=100, start_ns=0)
    profile.add((READ, WORK, MAIN), T1, [3, 30_000_000])
    profile.add((CALC, MAIN), T1, [1, 10_000_000])
    profile.add((WORK, MAIN), T2, [6, 60_000_000])
    document = convert(tmp_path, profile)
    assert document["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    worker, main = document["profiles"]  # most time first
    assert worker["name"] == "app (10) worker (11)" and main["name"] == "app (10) main (10)"
    for p in (worker, main):
        assert p["type"] == "sampled" and p["unit"] == "nanoseconds"
        assert len(p["samples"]) == len(p["weights"]) and p["endValue"] == sum(p["weights"]) and p["startValue"] == 0
    assert stacks(document, main) == {("main", "work", "ksys_read [k]"): 30_000_000, ("main", "calc"): 10_000_000}
    assert stacks(document, worker) == {("main", "work"): 60_000_000}
    frames = {f["name"]: f for f in document["shared"]["frames"]}
    assert len(frames) == len(document["shared"]["frames"])  # each function once
    assert frames["calc"] == {"name": "calc", "file": "app.py", "line": 39}
    assert frames["work"] == {"name": "work", "file": "app"}


def test_counts_have_no_unit(tmp_path):
    profile = block_profile(start_ns=0)
    profile.add((WORK, MAIN), T1, [2, 5_000_000])
    document = convert(tmp_path, profile)
    assert document["profiles"][0]["unit"] == "nanoseconds" and document["profiles"][0]["weights"] == [5_000_000]
    source = tmp_path / "in.pb.gz"
    out = tmp_path / "count.speedscope.json"
    assert run_bpfprof("report", str(source), "--type", "contentions", "-o", str(out)).returncode == 0
    assert json.loads(out.read_text())["profiles"][0]["unit"] == "none"
