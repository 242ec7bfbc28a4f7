"""Off-CPU time through real BPF: `-t block` on workloads that block for known durations
(the delay attributed to each blocking function), and `-t wall` on threads that rest,
work and wait for a shared CPU."""

from __future__ import annotations

import subprocess

import pytest

from conftest import FIXTURES, SID_MINORS, pyenv_python, run_bpfprof, sid_python
from pprof_check import check_with_go
from samples import read_samples

pytestmark = pytest.mark.usefixtures("bpf_ready")

MS = 1_000_000


def blocked(samples, predicate):
    """(blocking events, nanoseconds) of the samples whose stack matches."""
    matching = [s for s in samples if predicate(s.functions)]
    return sum(s.values[0] for s in matching), sum(s.values[1] for s in matching)


def test_c_known_delays_per_blocking_function(build_c, tmp_path):
    binary = build_c("blocking", "-pthread")
    out = tmp_path / "blocking.pb.gz"
    result = run_bpfprof("record", "-t", "block", "-o", str(out), "--", str(binary))
    assert result.returncode == 0, result.stderr
    samples = read_samples(out)
    events, delay = blocked(samples, lambda functions: "sleeper" in functions)
    assert events == 10 and delay == pytest.approx(500 * MS, rel=0.1)
    _, delay = blocked(samples, lambda functions: any(f.endswith("pipe_read") for f in functions))
    assert delay == pytest.approx(300 * MS, rel=0.1)  # main writes after 200 + 100 ms
    # The mutex wait, by the kernel's futex frames of the thread whose nap names lock_waiter
    # (the user frames above a wait inside the C library depend on its unwinding).
    waiter, = {s.labels["tid"] for s in samples if "lock_waiter" in s.functions}
    delay = sum(s.values[1] for s in samples if s.labels["tid"] == waiter and "futex_wait" in s.functions)
    assert delay == pytest.approx(180 * MS, rel=0.1), [(s.values, s.functions) for s in samples
                                                       if s.labels["tid"] == waiter]
    _, delay = blocked(samples, lambda functions: any(f.endswith("stream_recvmsg") for f in functions))
    assert delay == pytest.approx(400 * MS, rel=0.1)
    check_with_go(out, expect=["sleeper"])


def test_several_types_write_one_file_each(build_c, tmp_path):
    binary = build_c("blocking", "-pthread")
    out = tmp_path / "both.folded"
    result = run_bpfprof("record", "-t", "cpu", "-t", "block", "-o", str(out), "--", str(binary))
    assert result.returncode == 0, result.stderr
    block = (tmp_path / "both.block.folded").read_text()
    assert (tmp_path / "both.cpu.folded").exists() and not out.exists()
    sleeper = sum(int(line.rsplit(" ", 1)[1]) for line in block.splitlines() if ";sleeper;" in line)
    assert sleeper == pytest.approx(500 * MS, rel=0.1)  # folded block profiles carry nanoseconds


def test_min_block_leaves_out_shorter_blocks(build_c, tmp_path):
    binary = build_c("blocking", "-pthread")
    out = tmp_path / "long.pb.gz"
    result = run_bpfprof("record", "-t", "block", "--min-block", "100000", "-o", str(out), "--", str(binary))
    assert result.returncode == 0, result.stderr
    samples = read_samples(out)
    assert blocked(samples, lambda functions: "sleeper" in functions) == (0, 0)  # 50 ms each
    assert all(s.values[1] >= 100 * MS for s in samples)
    assert "shorter than --min-block left out" in result.stderr


def test_a_thread_that_wakes_on_another_cpu_gets_its_whole_delay(build_c, tmp_path):
    """Each nap starts on one CPU and ends on the other: the thread is moved while it sleeps."""
    binary = build_c("migrate", "-pthread")
    out = tmp_path / "migrate.pb.gz"
    result = run_bpfprof("record", "-t", "block", "-o", str(out), "--", str(binary))
    assert result.returncode == 0, result.stderr
    naps = [tuple(map(int, line.split())) for line in result.stdout.splitlines()]
    assert len(naps) == 6 and all(before != after for before, after in naps), naps
    events, delay = blocked(read_samples(out), lambda functions: "napper" in functions)
    assert events == 6 and delay == pytest.approx(600 * MS, rel=0.1)


@pytest.mark.parametrize("minor", [6, 8, 12])
def test_python_known_delays_per_blocking_function(minor, tmp_path):
    out = tmp_path / "blocking.pb.gz"
    script = FIXTURES / "python" / "blocking.py"
    result = run_bpfprof("record", "-t", "block", "-o", str(out), "--", pyenv_python(minor), str(script))
    assert result.returncode == 0, result.stderr
    samples = read_samples(out)
    for function, expected_ms in (("sleeper", 500), ("lock_waiter", 200), ("pipe_reader", 300),
                                  ("socket_receiver", 400)):
        _, delay = blocked(samples, lambda functions: function in functions)
        assert delay == pytest.approx(expected_ms * MS, rel=0.1), function


def test_python_threads_blocked_before_the_process_was_read(python, tmp_path):
    """Threads that block at their first line, in the interpreter's first milliseconds:
    the Python stack they left with is walked once the process is read, while they are
    still away, so all of their time keeps its Python frames."""
    out = tmp_path / "early.pb.gz"
    result = run_bpfprof("record", "-t", "block", "-t", "wall", "-o", str(out), "--", python,
                         str(FIXTURES / "python" / "blocked_at_start.py"))
    assert result.returncode == 0, result.stderr
    for kind, value in (("block", 1), ("wall", 0)):
        samples = read_samples(tmp_path / f"early.{kind}.pb.gz")
        for function, expected_ms in (("lock_waiter", 1000), ("pipe_reader", 500)):
            delay = sum(s.values[value] for s in samples if function in s.functions)
            assert delay == pytest.approx(expected_ms * MS, rel=0.1), (kind, function, result.stderr, [
                (s.labels["tid"], s.values, s.functions) for s in samples if s.values[value] > 100 * MS])


def test_wall_time_of_each_thread_is_its_lifetime(build_c, tmp_path):
    """Two threads on one CPU: each rests 300 ms, then works 300 ms of CPU while the other
    waits for the CPU. Wall time covers all of it: resting, working and waiting. Time off
    the CPU is exact; time on it is sampled, at 499 Hz so that the threads' slices of the
    CPU (shorter still when other work shares it) are counted to well within 10%."""
    binary = build_c("wall", "-pthread")
    out = tmp_path / "wall.pb.gz"
    result = run_bpfprof("record", "-F", "499", "-t", "wall", "-o", str(out), "--", "taskset", "-c", "0",
                         str(binary))
    assert result.returncode == 0, result.stderr
    lifetimes = dict(tuple(map(int, line.split())) for line in result.stdout.splitlines())
    assert len(lifetimes) == 2
    samples = read_samples(out)
    for tid, lifetime in lifetimes.items():
        mine = [s for s in samples if s.labels["tid"] == tid]
        assert sum(s.values[0] for s in mine) == pytest.approx(lifetime, rel=0.1)
        resting = sum(s.values[0] for s in mine if "clock_nanosleep" in s.functions)
        working = sum(s.values[0] for s in mine if "work" in s.functions)  # on the CPU or waiting for it
        assert resting == pytest.approx(300 * MS, rel=0.1)
        assert working == pytest.approx(lifetime - 300 * MS, rel=0.1)
        assert lifetime > 750 * MS  # the threads did share the CPU
    check_with_go(out, expect=["work"])


def test_whole_system_keeps_kernel_threads_and_leaves_out_idle(tmp_path):
    out = tmp_path / "system.pb.gz"
    # Work for kernel threads, whatever else the machine does: each process that exits
    # frees its task through RCU (the RCU kthreads wait for a grace period), and sync
    # wakes the writeback workers and the journal.
    churn = subprocess.Popen(["sh", "-c", f"while :; do /bin/true; echo x >> {tmp_path / 'churn'}; sync; done"])
    try:
        result = run_bpfprof("record", "-a", "-t", "block", "-d", "2", "-o", str(out))
    finally:
        churn.kill()
        churn.wait()
    assert result.returncode == 0, result.stderr
    samples = read_samples(out)
    assert all(s.labels["pid"] != 0 for s in samples)  # the idle task never blocks: it is what runs instead
    names = {s.labels["comm"] for s in samples}
    assert any(n.startswith(("kworker", "rcu", "jbd2", "ksoftirqd")) for n in names), names


def test_a_thread_that_exits_while_blocked_keeps_what_was_attributed(tmp_path):
    """The process ends (os._exit) while a thread still blocks on a pipe no one writes."""
    script = tmp_path / "exit_blocked.py"
    script.write_text(
        "import os, threading, time\n"
        "def napper(fd):\n"
        "    for _ in range(5):\n"
        "        time.sleep(0.05)\n"
        "    os.read(fd, 1)\n"
        "read_end, _ = os.pipe()\n"
        "time.sleep(0.5)  # the profiler reads the process meanwhile\n"
        "threading.Thread(target=napper, args=(read_end,)).start()\n"
        "time.sleep(0.8)\n"
        "os._exit(0)\n")
    out = tmp_path / "exit.pb.gz"
    result = run_bpfprof("record", "-t", "block", "-o", str(out), "--", pyenv_python(12), str(script))
    assert result.returncode == 0, result.stderr
    samples = read_samples(out)
    _, delay = blocked(samples, lambda functions: "napper" in functions and "clock_nanosleep" in functions)
    assert delay == pytest.approx(250 * MS, rel=0.1)


@pytest.mark.parametrize("kind, minor", [*(pytest.param("pyenv", m, id=f"pyenv-3.{m}") for m in (11, 12, 13)),
                                         *(pytest.param("sid", m, id=f"sid-3.{m}") for m in SID_MINORS)])
def test_asyncio_tasks_awaiting_known_durations(kind, minor, tmp_path):
    """In -t wall, each task that awaits gets its time at its await chain, labelled with
    its name, on the thread of its loop (the main thread here); see the fixture for the
    durations. 3.11-3.13 are tabled; 3.14 and 3.15 (the sid chroot's) publish their offsets."""
    out = tmp_path / "tasks.pb.gz"
    python = sid_python(minor) if kind == "sid" else pyenv_python(minor)
    result = run_bpfprof("record", "-t", "wall", "-o", str(out), "--", python,
                         str(FIXTURES / "python" / "asyncio_tasks.py"))
    assert result.returncode == 0, result.stderr
    samples = read_samples(out)
    tasks = [s for s in samples if "task" in s.labels]
    for task, chain, expected_ms in (("fetcher", ("fetcher", "fetch_page", "sleep"), 2400),
                                     ("fetcher", ("fetcher", "parse_page", "sleep"), 800),
                                     ("sleeper", ("sleeper", "nap", "sleep"), 3200)):
        waited = sum(s.values[0] for s in tasks if s.labels["task"] == task and s.functions == list(chain[::-1]))
        assert waited == pytest.approx(expected_ms * MS, rel=0.1), (task, chain, [
            (s.labels, s.values, s.functions) for s in tasks])
    main_thread = {s.labels["tid"] for s in samples if "main" in s.functions}
    assert main_thread == {s.labels["tid"] for s in tasks} and len(main_thread) == 1
    assert all(s.labels["pid"] == s.labels["tid"] for s in tasks)
    check_with_go(out, expect=["fetch_page"])
