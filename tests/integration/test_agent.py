"""`bpfprof agent` through real BPF: profiles cut every interval with nothing lost or counted
twice between them, labelled, kept on disk with retention, surviving a full disk, flushed
on SIGTERM, logs reopened on SIGHUP, metrics served."""

from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import socket
import stat
import subprocess
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bpfprof.collector.agent.health import STALLED_AFTER_S
from bpfprof.collector.output.pprof import from_pprof, read_pprof
from bpfprof.collector.output.pprof_schema import PprofProfile
from conftest import FIXTURES, bpfprof_command, profiler_has_read, pyenv_python
from pprof_check import check_with_go
from pyroscope_store import Store, decode_with_protoc, push_request_class
from samples import read_samples

pytestmark = pytest.mark.usefixtures("bpf_ready")

MS = 1_000_000
MiB = 1 << 20


class RunningAgent:
    """`bpfprof agent` logging to a file the test reads; always stopped at the end."""

    def __init__(self, tmp_path: Path, *args: str):
        self.log = tmp_path / "agent.log"
        self.process = subprocess.Popen([*bpfprof_command(), "agent", "--log-file", str(self.log), *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def entries(self, path: Path = None) -> List[Dict]:
        path = path or self.log
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_for(self, message: str, count: int = 1, timeout: float = 60, path: Path = None) -> Dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.entries(path) if e["msg"] == message]
            if len(found) >= count:
                return found[count - 1]
            if self.process.poll() is not None:
                pytest.fail(f"the agent exited ({self.process.returncode}) before {message!r}:\n"
                            f"{self.process.stderr.read()}\n{self.log.read_text() if self.log.exists() else ''}")
            time.sleep(0.1)
        pytest.fail(f"no {message!r} within {timeout} s:\n{self.log.read_text() if self.log.exists() else ''}")

    def stop(self) -> float:
        """SIGTERM; returns the seconds it took to exit, which it must do with status 0."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        took = time.monotonic() - sent
        assert code == 0, self.process.stderr.read()
        return took

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def agent_in(tmp_path):
    started = []

    def start(*args: str) -> RunningAgent:
        started.append(RunningAgent(tmp_path, *args))
        return started[-1]

    yield start
    for agent in started:
        agent.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> Dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_after_cuts(agent: RunningAgent, port: int, condition: Callable[[Dict], bool], most: int = 60) -> Dict:
    """The agent's metrics scraped after each interval cut until `condition` holds of them
    (a failure after `most` cuts)."""
    cuts = len([e for e in agent.entries() if e["msg"] == "interval cut"])
    for cut in range(cuts + 1, cuts + most + 1):
        agent.wait_for("interval cut", count=cut)
        metrics = scrape(port)
        if condition(metrics):
            return metrics
    pytest.fail(f"not so after {most} interval cuts: {metrics}")


def unix_time(logged: str) -> float:
    return datetime.strptime(logged, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def test_intervals_follow_each_other_exactly_and_sigterm_flushes_the_last(agent_in, tmp_path, build_c):
    chain = build_c("chain")
    out = tmp_path / "profiles"
    agent = agent_in("--output-dir", str(out), "--interval", "2s", "-F", "99", "--node", "node-under-test")
    agent.wait_for("agent started")
    burner = subprocess.Popen([str(chain), "5"])
    _, status, usage = os.wait4(burner.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    burn_cpu_s = usage.ru_utime + usage.ru_stime
    cuts = len([e for e in agent.entries() if e["msg"] == "interval cut"])
    agent.wait_for("interval cut", count=cuts + 1)  # the burn's last samples are in a cut interval
    took = agent.stop()
    assert took < 5
    assert agent.wait_for("agent stopped")

    files = sorted(out.glob("*.cpu.pb.gz"))
    messages = [read_pprof(str(f)) for f in files]
    assert len(messages) >= 4
    for earlier, later in zip(messages, messages[1:]):
        assert earlier.time_nanos + earlier.duration_nanos == later.time_nanos  # no gap, no overlap
    # A cut comes at the first drain on or after each 2 s beat, however late that drain is
    # (the first ones name every process on the machine): the intervals between cuts add
    # up to whole intervals, give or take that lateness.
    middle = messages[1:-1]
    assert round(sum(m.duration_nanos for m in middle) / 2e9) == len(middle), [m.duration_nanos for m in middle]
    assert messages[-1].duration_nanos < 2.25e9  # the interval SIGTERM cut short, written too
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o640

    # Every sample of the burn is in exactly one interval: together they make its CPU time at 99 Hz.
    per_file = [sum(s.count for s in read_samples(f) if s.labels.get("pid") == burner.pid) for f in files]
    assert sum(per_file) == pytest.approx(burn_cpu_s * 99, rel=0.1), (per_file, burn_cpu_s)
    assert sum(1 for n in per_file if n) >= 2  # the burn spans a cut
    burn_samples = [s for f in files for s in read_samples(f) if s.labels.get("pid") == burner.pid]
    assert all(s.labels["node"] == "node-under-test" and s.labels["comm"] == "chain"
               and s.labels["service_name"] == "chain" for s in burn_samples)
    assert sum(s.count for s in burn_samples if s.has_chain("main", "chain_a", "chain_b", "chain_c")) \
        >= 0.9 * sum(s.count for s in burn_samples)
    check_with_go(files[per_file.index(max(per_file))], expect=["chain_c"])


def test_pushes_reach_the_store_and_sigterm_pushes_the_last_interval(agent_in, tmp_path, build_c, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    store = Store()
    chain = build_c("chain")
    try:
        agent = agent_in("--push-url", store.url, "--interval", "30s", "-F", "99", "--node", "node-under-test",
                         "-t", "cpu", "-t", "block")
        agent.wait_for("agent started")
        burner = subprocess.Popen([str(chain), "2"])
        assert burner.wait(timeout=30) == 0
        assert not store.requests  # the interval is not over: only SIGTERM cuts it
        took = agent.stop()
    finally:
        store.close()
    assert took < 5
    request, = store.requests  # the last interval, pushed before the agent exited
    assert request.path == "/push.v1.PusherService/Push"
    assert request.headers["Content-Type"] == "application/proto"
    pushed = decode_with_protoc(request.body, push_request_class(tmp_path))
    by_labels = {tuple((l.name, l.value) for l in series.labels): series for series in pushed.series}
    cpu = by_labels[(("__name__", "process_cpu"), ("service_name", "chain"), ("node", "node-under-test"))]
    profile = from_pprof(PprofProfile.FromString(gzip.decompress(cpu.samples[0].raw_profile)))
    chain_samples = sum(values[0] for (stack, labels), values in profile.samples.items()
                        if labels.pid == burner.pid and any(f.name == "chain_c" for f in stack))
    assert chain_samples >= 100  # about 2 s at 99 Hz
    kinds_and_services = [(labels[0][1], labels[1][1]) for labels in by_labels]
    assert len(set(kinds_and_services)) == len(pushed.series)  # one series per profile type and service
    assert {kind for kind, _ in kinds_and_services} == {"process_cpu", "block"}
    assert all(len(s.samples) == 1 for s in pushed.series)


def test_block_profiles_add_up_across_intervals(agent_in, tmp_path, build_c):
    binary = build_c("blocking", "-pthread")
    out = tmp_path / "profiles"
    agent = agent_in("--output-dir", str(out), "--interval", "1s", "-t", "cpu", "-t", "block")
    agent.wait_for("agent started")
    workload = subprocess.Popen([str(binary)])
    assert workload.wait(timeout=30) == 0
    cuts = len([e for e in agent.entries() if e["msg"] == "interval cut"])
    agent.wait_for("interval cut", count=cuts + 1)
    agent.stop()
    samples = [s for f in sorted(out.glob("*.block.pb.gz")) for s in read_samples(f)
               if s.labels.get("pid") == workload.pid and "sleeper" in s.functions]
    assert sum(s.values[0] for s in samples) == 10  # as `record -t block` counts them (test_offcpu)
    assert sum(s.values[1] for s in samples) == pytest.approx(500 * MS, rel=0.1)
    assert sorted(out.glob("*.cpu.pb.gz"))


def test_retention_and_metrics(agent_in, tmp_path, build_c, monkeypatch):
    out = tmp_path / "profiles"
    port = free_port()
    # Where systemd would listen for READY=1 and the watchdog's keep-alives.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    agent = agent_in("--output-dir", str(out), "--interval", "1s", "-F", "99", "--retention-size", "12KiB",
                     "--metrics-addr", f"127.0.0.1:{port}")
    started = unix_time(agent.wait_for("agent started")["time"])
    # Its samples put a profile of some hundred bytes in every interval, whatever else runs.
    burner = subprocess.Popen([str(build_c("chain")), "600"])
    try:
        metrics = scrape_after_cuts(agent, port, lambda m: m[("bpfprof_profiles_written_total", ())] >= 5
                                    and m[("bpfprof_profiles_removed_total", ())] >= 1)
        scraped = time.time()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            health = response.status, response.read().decode()
        with notify:
            notified = [notify.recv(64), notify.recv(64)]
    finally:
        burner.kill()
        burner.wait()
    agent.stop()
    assert metrics[("bpfprof_samples_total", (("type", "cpu"),))] > 0
    assert metrics[("bpfprof_processes", ())] >= 1
    assert metrics[("bpfprof_symbol_cache_binaries", ())] >= 1
    assert started <= metrics[("bpfprof_last_interval_cut_timestamp_seconds", ())] <= scraped
    assert 0 < metrics[("process_resident_memory_bytes", ())] < 200 << 20
    assert health[0] == 200 and health[1].startswith("ok: last drain")
    assert metrics[("bpfprof_healthy", ())] == 1
    assert notified == [b"READY=1\nWATCHDOG=1", b"WATCHDOG=1"]
    assert 0 <= metrics[("bpfprof_last_drain_age_seconds", ())] < STALLED_AFTER_S
    assert sum(f.stat().st_size for f in out.glob("*.pb.gz")) <= 12 << 10


def test_processes_that_come_and_go_are_forgotten(agent_in, tmp_path):
    """Short processes sampled by the thousand, many of them while the loader still maps
    their libraries (they are asked for again then): once they exit, the agent holds
    none of them."""
    port = free_port()
    agent = agent_in("--output-dir", str(tmp_path / "profiles"), "--interval", "1s", "-F", "999",
                     "--metrics-addr", f"127.0.0.1:{port}")
    agent.wait_for("agent started")
    subprocess.run(["sh", "-c", "i=0; while [ $i -lt 3000 ]; do /bin/true; i=$((i + 1)); done"], check=True)
    cuts = len([e for e in agent.entries() if e["msg"] == "interval cut"])
    agent.wait_for("interval cut", count=cuts + 12)  # ten drains (one a cut) and the look for those gone
    metrics = scrape(port)
    alive = sum(name.isdigit() for name in os.listdir("/proc"))
    agent.stop()
    assert metrics[("bpfprof_processes_seen_total", ())] >= 300
    assert metrics[("bpfprof_processes", ())] <= alive


def test_a_full_disk_is_logged_and_the_agent_goes_on(agent_in, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(small)], check=True)
    try:
        filler = small / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        assert full.value.errno == errno.ENOSPC
        agent = agent_in("--output-dir", str(small), "--interval", "1s", "-F", "99", "-t", "cpu", "-t", "block")
        failure = agent.wait_for("cannot write profile")
        assert "No space left on device" in failure["error"]
        assert agent.process.poll() is None
        before = set(small.glob("*.pb.gz"))
        filler.unlink()
        agent.wait_for("interval cut", count=len([e for e in agent.entries() if e["msg"] == "interval cut"]) + 2)
        agent.stop()
        assert set(small.glob("*.pb.gz")) - before  # written again once there was room
        assert not [f for f in os.listdir(small) if f.startswith(".")]  # no half-written file left
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_sighup_reopens_the_log_file(agent_in, tmp_path):
    agent = agent_in("--output-dir", str(tmp_path / "profiles"), "--interval", "1s")
    agent.wait_for("agent started")
    rotated = tmp_path / "agent.log.1"
    agent.log.rename(rotated)
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_for("log file reopened")
    agent.wait_for("interval cut")
    agent.stop()
    assert [e for e in agent.entries(rotated) if e["msg"] == "agent started"]
    assert [e for e in agent.entries() if e["msg"] == "agent stopped"]


def test_memory_held_at_exit_is_counted_once_and_freed(agent_in, tmp_path, build_c):
    """What processes hold as they exit is counted in the interval they exit in, and their
    ranges then leave the kernel's map, whose size the metrics show."""
    processes, held_mib = 100, 4
    inuse_space = 3  # alloc_objects, alloc_space, inuse_objects, inuse_space
    leaver = build_c("memory_leaver")
    port = free_port()
    out = tmp_path / "profiles"
    agent = agent_in("-t", "memory", "--output-dir", str(out), "--interval", "1s", "--metrics-addr", f"127.0.0.1:{port}")
    agent.wait_for("agent started")
    before = scrape_after_cuts(agent, port, lambda m: True)[("bpfprof_memory_ranges", ())]
    for _ in range(processes):
        subprocess.run([str(leaver), str(held_mib)], check=True)
    # The ranges the processes left (three or more each) are gone from the map within a few cuts.
    metrics = scrape_after_cuts(agent, port, lambda m: m[("bpfprof_memory_ranges", ())] <= before + processes,
                                most=10)
    agent.stop()
    lost = {dict(labels)["reason"]: n for (name, labels), n in metrics.items() if name == "bpfprof_lost_total"}
    # (a stack collision loses a stack, not the range's accounting)
    assert not any(lost.get(f"LOSS_MEMORY_{what}_FULL") for what in ("RANGES", "CALLS", "HOLES")), lost
    held = {}  # pid -> the sizes in use it was counted with, over every interval
    for f in out.glob("*.memory.pb.gz"):
        for s in read_samples(f):
            if s.labels["comm"] == "memory_leaver" and s.values[inuse_space]:
                held.setdefault(s.labels["pid"], []).append(s.values[inuse_space])
    assert len(held) == processes
    # Each process's mapping (and what its loader mapped), counted in one interval only.
    assert all(held_mib * MiB <= sum(sizes) < (held_mib + 1) * MiB for sizes in held.values()), held


def test_an_oom_victims_memory_is_kept_and_pushed_at_once(agent_in, tmp_path, build_c, memory_cgroup, monkeypatch):
    """fill_memory fills a 64 MiB cgroup until the OOM killer ends it: what it held then
    is written beside the intervals and pushed labelled oom="true", long before the cut."""
    monkeypatch.setenv("no_proxy", "*")
    cgroup = memory_cgroup(64 * MiB)
    store = Store()
    out = tmp_path / "profiles"
    filler = None
    try:
        agent = agent_in("-t", "memory", "--output-dir", str(out), "--push-url", store.url, "--interval", "1h")
        agent.wait_for("agent started")
        filler = subprocess.Popen([str(build_c("memory")), "fill"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        pid = int(filler.stdout.readline().split()[1])
        cgroup.add(pid)
        profiler_has_read(agent.process, pid)
        filler.stdin.write("go\n")
        filler.stdin.flush()
        assert filler.wait(timeout=60) == -signal.SIGKILL
        agent.wait_for("the OOM killer chose a profiled process")
        deadline = time.monotonic() + 30
        while not store.requests and time.monotonic() < deadline:
            time.sleep(0.1)
        agent.stop()
    finally:
        store.close()
        if filler is not None and filler.poll() is None:
            filler.kill()
    kept, = out.glob(f"*.oom-{pid}.memory.pb.gz")
    filled = sum(s.values[3] for s in read_samples(kept) if "fill_memory" in s.functions)
    assert filled >= 56 * MiB  # the limit, less what the rest of the process holds
    pushed = decode_with_protoc(store.requests[0].body, push_request_class(tmp_path))
    series, = pushed.series
    labels = {label.name: label.value for label in series.labels}
    assert labels["__name__"] == "memory" and labels["oom"] == "true"
    check_with_go(kept, expect=["fill_memory"])


def test_asyncio_tasks_are_kept_and_pushed_with_their_labels(agent_in, tmp_path, monkeypatch):
    """Wall profiles carry the time asyncio tasks await, labelled task=name, on disk and in
    what is pushed (the fixture and its durations: test_offcpu)."""
    monkeypatch.setenv("no_proxy", "*")
    store = Store()
    out = tmp_path / "profiles"
    try:
        agent = agent_in("--output-dir", str(out), "--push-url", store.url, "--interval", "1s", "-t", "wall")
        agent.wait_for("agent started")
        workload = subprocess.Popen([pyenv_python(12), str(FIXTURES / "python" / "asyncio_tasks.py")])
        assert workload.wait(timeout=30) == 0
        cuts = len([e for e in agent.entries() if e["msg"] == "interval cut"])
        agent.wait_for("interval cut", count=cuts + 1)
        agent.stop()
    finally:
        store.close()
    kept = [s for f in sorted(out.glob("*.wall.pb.gz")) for s in read_samples(f)
            if s.labels.get("pid") == workload.pid and s.labels.get("task") == "fetcher"]
    waited = sum(s.values[0] for s in kept if s.functions == ["sleep", "fetch_page", "fetcher"])
    assert waited == pytest.approx(2400 * MS, rel=0.1)
    pushed_ns = 0
    for request in store.requests:
        for series in decode_with_protoc(request.body, push_request_class(tmp_path)).series:
            if ("__name__", "wall") not in [(label.name, label.value) for label in series.labels]:
                continue
            profile = from_pprof(PprofProfile.FromString(gzip.decompress(series.samples[0].raw_profile)))
            pushed_ns += sum(values[0] for (stack, labels), values in profile.samples.items()
                             if labels.pid == workload.pid and ("task", "fetcher") in labels.extra
                             and [f.name for f in stack] == ["sleep", "fetch_page", "fetcher"])
    assert pushed_ns == waited
