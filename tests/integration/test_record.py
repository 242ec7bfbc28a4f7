"""`bpfprof record` against real programs with known stacks, through real BPF."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import bpfprof_command, run_bpfprof, sampler_programs, sampling_started
from pprof_check import check_with_go
from samples import read_samples, share

pytestmark = pytest.mark.usefixtures("bpf_ready")


def of_comm(samples, comm):
    mine = [s for s in samples if s.labels.get("comm") == comm]
    assert mine, f"no samples of {comm}; comms seen: {sorted({s.labels.get('comm') for s in samples})}"
    return mine


def test_command_call_chain_in_order(build_c, tmp_path):
    chain = build_c("chain")
    out = tmp_path / "chain.pb.gz"
    result = run_bpfprof("record", "-F", "199", "-o", str(out), "--", str(chain), "3")
    assert result.returncode == 0, result.stderr
    samples = of_comm(read_samples(out), "chain")
    assert sum(s.count for s in samples) >= 3 * 199 * 0.8
    assert share(samples, lambda s: s.has_chain("main", "chain_a", "chain_b", "chain_c")) >= 0.95
    assert all(s.labels["pid"] > 0 and s.labels["tid"] > 0 for s in samples)
    # Samples from before the exec took the new name (the fork on its way to exec, the exec
    # itself) have the name of the bpfprof that forked the command for their thread.
    forker = os.path.basename(sys.executable)[:15]
    assert {s.labels["thread"] for s in samples} <= {"chain", forker}
    check_with_go(out, expect=["chain_c"])


@pytest.mark.parametrize("extension", [".html", ".speedscope.json"])
def test_record_writes_a_flame_graph_page_or_speedscope(build_c, tmp_path, extension):
    out = tmp_path / f"chain{extension}"
    result = run_bpfprof("record", "-o", str(out), "--", str(build_c("chain")), "1")
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    if extension == ".html":
        assert text.startswith("<!DOCTYPE html>") and "chain_c" in text and "<script src" not in text
    else:
        document = json.loads(text)
        frames = [f["name"] for f in document["shared"]["frames"]]
        assert {"main", "chain_a", "chain_b", "chain_c"} <= set(frames)
        assert document["profiles"][0]["name"].startswith("chain (")


def test_command_mode_follows_children_and_nothing_else(build_c, tmp_path):
    chain = build_c("chain")
    outsider = tmp_path / "outsider"
    shutil.copy(chain, outsider)
    spinner = subprocess.Popen([str(outsider), "600"])
    out = tmp_path / "tree.pb.gz"
    try:
        result = run_bpfprof("record", "-o", str(out), "--", "sh", "-c", f"{chain} 2 & {chain} 2; wait")
    finally:
        spinner.kill()
        spinner.wait()
    assert result.returncode == 0, result.stderr
    samples = read_samples(out)
    assert len({s.labels["pid"] for s in of_comm(samples, "chain")}) == 2
    assert {s.labels["comm"] for s in samples} <= {"chain", "sh", "python3", "bpfprof"}  # before exec: our fork


def test_command_exit_status_passes_through(tmp_path):
    result = run_bpfprof("record", "-o", str(tmp_path / "x.pb.gz"), "--", "sh", "-c", "exit 3")
    assert result.returncode == 3, result.stderr
    assert re.search(r"bpfprof: \d+ samples, 0 lost, \d+ processes", result.stderr)


def test_syscall_heavy_process_has_kernel_frames(build_c, tmp_path):
    out = tmp_path / "sys.pb.gz"
    result = run_bpfprof("record", "-o", str(out), "--", str(build_c("syscalls")), "3")
    assert result.returncode == 0, result.stderr
    samples = of_comm(read_samples(out), "syscalls")
    syscall = re.compile(r"^(__x64_sys|ksys|vfs)_(read|write)$")
    assert share(samples, lambda s: any(syscall.match(f) for f in s.functions)) >= 0.5
    assert share(samples, lambda s: "copy_zero_to_null" in s.functions) >= 0.9
    check_with_go(out, expect=["copy_zero_to_null"])


def test_no_kernel_leaves_kernel_frames_out(build_c, tmp_path):
    out = tmp_path / "user.folded"
    result = run_bpfprof("record", "--no-kernel", "-o", str(out), "--", str(build_c("syscalls")), "2")
    assert result.returncode == 0, result.stderr
    lines = [l for l in out.read_text().splitlines() if l.startswith("syscalls;")]
    assert lines and not any("_[k]" in l for l in lines)


def test_short_lived_processes_are_named(build_c, tmp_path):
    binary = build_c("short_lived")
    out = tmp_path / "all.pb.gz"
    before = sampler_programs()  # others may run too
    profiler = subprocess.Popen([*bpfprof_command(), "record", "-a", "-d", "600", "-o", str(out)],
                                stderr=subprocess.PIPE, text=True)
    try:
        sampling_started(profiler, before)
        for _ in range(150):
            subprocess.run([str(binary), "30"], check=True)
    finally:
        profiler.send_signal(signal.SIGINT)
        _, stderr = profiler.communicate(timeout=60)
    assert profiler.returncode == 0, stderr
    samples = of_comm(read_samples(out), "short_lived")
    assert sum(s.count for s in samples) >= 150 * 0.03 * 99 * 0.5
    assert share(samples, lambda s: s.has_chain("main", "short_lived_spin")) >= 0.9
    check_with_go(out, expect=["short_lived_spin"])


def test_binary_only_visible_in_private_mount_namespace(build_c, tmp_path):
    chain = build_c("chain")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    script = f"mount -t tmpfs none {hidden} && cp {chain} {hidden}/hidden_chain && exec {hidden}/hidden_chain 3"
    out = tmp_path / "ns.pb.gz"
    result = run_bpfprof("record", "-o", str(out), "--",
                         "unshare", "--mount", "--propagation", "private", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert not (hidden / "hidden_chain").exists()  # only inside the namespace
    samples = of_comm(read_samples(out), "hidden_chain")
    assert share(samples, lambda s: s.has_chain("main", "chain_a", "chain_b", "chain_c")) >= 0.9


def test_pid_target_and_stop_when_it_exits(build_c, tmp_path):
    # The target waits for a line before it becomes the spinner (same pid), so that it
    # spins only once the profiler samples.
    target = subprocess.Popen(["sh", "-c", f"read line && exec {build_c('chain')} 2"], stdin=subprocess.PIPE)
    out = tmp_path / "pid.pb.gz"
    before = sampler_programs()  # others may run too
    profiler = subprocess.Popen([*bpfprof_command(), "record", "-p", str(target.pid), "-d", "3600", "-o", str(out)],
                                stderr=subprocess.PIPE, text=True)
    try:
        sampling_started(profiler, before)
        target.stdin.write(b"go\n")
        target.stdin.close()
        assert target.wait(timeout=60) == 0
        _, stderr = profiler.communicate(timeout=60)  # stops when the process exits, not after -d 3600
    finally:
        for process in (target, profiler):
            process.kill()
            process.wait()
    assert profiler.returncode == 0, stderr
    samples = read_samples(out)
    assert {s.labels["pid"] for s in samples} == {target.pid}
    assert share(samples, lambda s: "chain_c" in s.functions) >= 0.9


def test_sigint_writes_what_was_collected_and_detaches(build_c, tmp_path):
    out = tmp_path / "int.pb.gz"
    before = sampler_programs()  # others may run too
    profiler = subprocess.Popen([*bpfprof_command(), "record", "-a", "-d", "60", "-o", str(out)],
                                stderr=subprocess.PIPE, text=True)
    try:
        mine = sampling_started(profiler, before)
        subprocess.run([str(build_c("chain")), "2"], check=True)  # 2 s of CPU sampled
        profiler.send_signal(signal.SIGINT)
        _, stderr = profiler.communicate(timeout=30)
    finally:
        profiler.kill()
        profiler.wait()
    assert profiler.returncode == 0, stderr
    assert "Traceback" not in stderr
    samples = read_samples(out)
    assert sum(s.count for s in samples if "chain_c" in s.functions) >= 2 * 99 * 0.8
    assert mine and not mine & sampler_programs()
