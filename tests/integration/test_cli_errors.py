"""Bad input and missing pieces: one line on stderr naming the problem, a non-zero exit,
no traceback. Missing BPF and missing headers are made real with namespaces."""

from __future__ import annotations

import os
import sys

import pytest

from conftest import run_bpfprof, skip_or_fail


def assert_one_line_error(result, *fragments: str, code: int = None) -> None:
    assert result.returncode != 0
    if code is not None:
        assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bpfprof: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["-F", "0"], ["-F", "range"]),
        (["-F", "-5"], ["-F"]),
        (["-F", "abc"], ["-F", "abc"]),
        (["-F", "1000000"], ["-F", "range"]),
        (["-d", "-1"], ["--duration"]),
        (["-d", "0"], ["--duration"]),
        (["-p", "999999999"], ["no process with PID 999999999"]),
        (["-p", "abc"], ["-p takes process IDs"]),
        (["-o", "/nonexistent-dir/x.pb.gz"], ["not a writable directory"]),
        (["-o", "out.txt"], ["unknown output format", ".pb.gz", ".folded"]),
        (["--", "no-such-command-xyz"], ["command not found: no-such-command-xyz"]),
        (["-a", "-p", "1"], ["choose one target"]),
        (["-t", "heap"], ["--type", "heap"]),
        (["--min-block", "-1"], ["--min-block"]),
        (["--no-such-option"], ["No such option"]),
    ],
)
def test_bad_record_input(args, fragments, tmp_path):
    result = run_bpfprof("record", *args, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not list(tmp_path.iterdir())  # nothing written


def test_exited_pid(tmp_path):
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    assert_one_line_error(run_bpfprof("record", "-p", str(child.pid)), f"no process with PID {child.pid}")


def _need_root():
    if os.geteuid() != 0:
        skip_or_fail("needs root to make namespaces")


def test_not_root_names_the_fix(tmp_path):
    _need_root()
    # nobody, keeping only the right to read files, so the checkout is readable wherever it is.
    drop = ("setpriv --reuid=65534 --regid=65534 --clear-groups "
            "--inh-caps=+dac_read_search --ambient-caps=+dac_read_search")
    result = run_bpfprof_in(drop, "record", "-d", "1", "-o", "/tmp/x.pb.gz")
    assert_one_line_error(result, "needs root", "sudo")


def test_no_bpf_in_a_user_namespace(tmp_path):
    _need_root()
    # Inside a new user namespace we are "root" but the kernel refuses bpf() and perf events.
    result = run_bpfprof_in("unshare --user --map-root-user", "record", "-d", "1", "-o", str(tmp_path / "x.pb.gz"))
    assert_one_line_error(result, "cannot")
    check = run_bpfprof_in("unshare --user --map-root-user", "check")
    assert check.returncode == 1 and "FAIL bpf() syscall" in check.stdout and "fix:" in check.stdout


def test_no_headers_names_the_package(tmp_path):
    _need_root()
    hide = "mount -t tmpfs none /usr/src; mount -t tmpfs none /lib/modules 2>/dev/null; exec \"$@\""
    result = run_bpfprof_in(f"unshare --mount --propagation private sh -c '{hide}' sh",
                            "record", "-d", "1", "-o", str(tmp_path / "x.pb.gz"), env_drop="BCC_KERNEL_SOURCE")
    assert_one_line_error(result, "no kernel headers", "apt-get install linux-headers")


def run_bpfprof_in(prefix: str, *args: str, env_drop: str = ""):
    import shlex
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != env_drop}
    cmd = [*shlex.split(prefix), sys.executable, "-m", "bpfprof", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
