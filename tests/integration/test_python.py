"""CPython frames through real BPF: scripts with known hot functions under every installed
interpreter, threads, deep recursion, processes started before the profiler, a private
mount namespace, and interpreters we cannot read (2.7, free-threaded builds)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Tuple

import pytest

from conftest import FIXTURES, PYENV_VERSIONS, STATIC_PYTHON, pyenv_python, run_bpfprof, skip_or_fail
from pprof_check import check_with_go
from samples import read_samples, share

pytestmark = pytest.mark.usefixtures("bpf_ready")

SCRIPTS = FIXTURES / "python"

def version_of(python: str):
    out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout
    return tuple(int(n) for n in out.split())


def marked_lines(script: Path, mark: str):
    return {n for n, line in enumerate(script.read_text().splitlines(), 1) if line.rstrip().endswith(mark)}


def def_line(script: Path, name: str) -> int:
    return next(n for n, line in enumerate(script.read_text().splitlines(), 1)
                if re.match(rf"\s*def {name}\(", line))


def python_frames(sample):
    return [f for f in sample.frames if f.filename.endswith(".py")]


def start(python: str, script: str, seconds: float, **kwargs) -> subprocess.Popen:
    """Start a fixture script and wait until it says it runs."""
    process = subprocess.Popen([python, str(SCRIPTS / script), str(seconds)], stdout=subprocess.PIPE, text=True,
                               **kwargs)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_hot_function_file_and_line(python, tmp_path):
    script = SCRIPTS / "hot.py"
    qualname = "Shapes.area_sum" if version_of(python) >= (3, 11) else "area_sum"  # co_qualname from 3.11
    out = tmp_path / "hot.pb.gz"
    result = run_bpfprof("record", "-F", "199", "-o", str(out), "--", python, str(script), "3")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    samples = read_samples(out)
    assert sum(s.count for s in samples) >= 3 * 199 * 0.4
    # Root to leaf: the script's module code, outer(), the hot method.
    assert share(samples, lambda s: s.has_chain("<module>", "outer", qualname)) >= 0.8
    hot = [s for s in samples if python_frames(s) and python_frames(s)[0].function == qualname]
    frame = python_frames(hot[0])[0]
    assert frame.filename == str(script)
    assert frame.start_line == def_line(script, "area_sum")
    assert share(hot, lambda s: python_frames(s)[0].line in marked_lines(script, "# HOT")) >= 0.9
    check_with_go(out, expect=[qualname])


def test_each_thread_has_its_own_stack_and_name(tmp_path):
    python = pyenv_python(12)
    out = tmp_path / "threads.pb.gz"
    process = start(python, "threads.py", 8)
    try:
        result = run_bpfprof("record", "-p", str(process.pid), "-d", "2", "-o", str(out))
    finally:
        process.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    samples = [s for s in read_samples(out) if python_frames(s)]
    by_function = {}
    for s in samples:
        by_function.setdefault(python_frames(s)[0].function, set()).add((s.labels["tid"], s.labels["thread"]))
    assert by_function.keys() >= {"spin_alpha", "spin_beta"}
    (alpha_tid, alpha_name), = by_function["spin_alpha"]
    (beta_tid, beta_name), = by_function["spin_beta"]
    assert alpha_tid != beta_tid != process.pid
    assert (alpha_name, beta_name) == ("alpha-worker", "beta-worker")
    assert share(samples, lambda s: python_frames(s)[-1].function == "<module>") < 0.2  # main thread waits


def test_deep_recursion_is_truncated_at_the_root(tmp_path):
    out = tmp_path / "deep.pb.gz"
    result = run_bpfprof("record", "-o", str(out), "--", pyenv_python(12), str(SCRIPTS / "recursion.py"), "2")
    assert result.returncode == 0, result.stderr
    deep = [s for s in read_samples(out) if s.functions and "spin" in s.functions[:3]]
    assert sum(s.count for s in deep) >= 2 * 99 * 0.5
    for s in deep:
        frames = [f.function for f in python_frames(s)]
        assert frames[0] == "spin" and frames.count("recurse") == 127  # 128 frames walked, leaf first
        assert s.functions[s.functions.index("spin") + 128] == "[more Python frames]"
    assert "deeper than 128 frames" in result.stderr


def test_process_started_before_the_profiler_in_a_private_mount_namespace(tmp_path):
    """The static interpreter copied into a tmpfs that only its own mount namespace sees."""
    if not os.path.exists(STATIC_PYTHON) or not shutil.which("unshare"):
        skip_or_fail("needs /usr/bin/python3 and unshare")
    private = tmp_path / "private"
    private.mkdir()
    setup = (f"mount -t tmpfs tmpfs {private} && cp {os.path.realpath(STATIC_PYTHON)} {SCRIPTS / 'hot.py'} {private} && "
             f"exec {private}/{os.path.basename(os.path.realpath(STATIC_PYTHON))} {private}/hot.py 8")
    process = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", setup],
                               stdout=subprocess.PIPE, text=True)
    out = tmp_path / "pre.pb.gz"
    try:
        assert process.stdout.readline().strip() == "ready"
        assert not (private / "hot.py").exists()  # not in our namespace
        result = run_bpfprof("record", "-p", str(process.pid), "-d", "2", "-o", str(out))
    finally:
        process.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    samples = read_samples(out)
    assert share(samples, lambda s: s.has_chain("<module>", "outer", "Shapes.area_sum")) >= 0.8
    assert {python_frames(s)[0].filename for s in samples if python_frames(s)} == {f"{private}/hot.py"}


def test_venv_interpreter(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([pyenv_python(11), "-m", "venv", "--without-pip", str(venv)], check=True)
    out = tmp_path / "venv.folded"
    result = run_bpfprof("record", "-o", str(out), "--", str(venv / "bin/python"), str(SCRIPTS / "hot.py"), "2")
    assert result.returncode == 0, result.stderr
    assert "<module> (hot.py);outer (hot.py);Shapes.area_sum (hot.py)" in out.read_text()


def test_no_python_leaves_python_frames_out(tmp_path):
    out = tmp_path / "native.folded"
    result = run_bpfprof("record", "--no-python", "-o", str(out), "--", pyenv_python(12), str(SCRIPTS / "hot.py"), "2")
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text and "(hot.py)" not in text and "_PyEval_EvalFrameDefault" in text


# A loop that 2.7 runs too: hot.py is Python 3.
SPIN_2_7 = "import sys, time\nprint('ready'); sys.stdout.flush()\nend = time.time() + float(sys.argv[1])\n" \
           "while time.time() < end: pass\n"


def unreadable_interpreter(kind: str, tmp_path: Path) -> Tuple[subprocess.Popen, str]:
    """A running interpreter that cannot be read, and what its warning names: pyenv's 2.7,
    or a free-threaded 3.13t, which cannot be installed here: 3.13's libpython copied under
    the name a free-threaded build gives it and preloaded, so that it is the one mapped."""
    if kind == "2.7":
        old = sorted(PYENV_VERSIONS.glob("2.7.*/bin/python2.7"))
        if not old:
            skip_or_fail(f"no CPython 2.7 under {PYENV_VERSIONS}")
        process = subprocess.Popen([str(old[-1]), "-c", SPIN_2_7, "8"], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        return process, "CPython 2.7 cannot be read (no known layout)"
    python = Path(pyenv_python(13))
    library = tmp_path / "libpython3.13t.so.1.0"
    shutil.copy(python.parent.parent / "lib" / "libpython3.13.so.1.0", library)
    process = start(str(python), "hot.py", 8, env={**os.environ, "LD_PRELOAD": str(library)})
    return process, "CPython 3.13t cannot be read (a free-threaded build"


@pytest.mark.parametrize("kind", ["2.7", "3.13t"])
def test_unreadable_interpreter_gets_native_frames_and_one_warning(kind, tmp_path):
    out = tmp_path / "old.folded"
    # Longer than the recording: Python frames are named from the live process's memory.
    process, warning = unreadable_interpreter(kind, tmp_path)
    other = start(pyenv_python(12), "hot.py", 8)
    try:
        result = run_bpfprof("record", "-p", f"{process.pid},{other.pid}", "-d", "2", "-o", str(out))
    finally:
        process.wait(timeout=30)
        other.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warning in warnings[0], result.stderr
    comm = f"python{kind.rstrip('t')};"
    lines = out.read_text().splitlines()
    assert any(line.startswith(comm) for line in lines)
    assert not any(line.startswith(comm) and ".py)" in line for line in lines)
    assert any(line.startswith("python3.12;") and "Shapes.area_sum (hot.py)" in line for line in lines), lines


def test_short_threads_have_python_frames_from_their_first_sample(python, tmp_path):
    """A thread that lives 100 ms is walked from its first sample and named. (The first
    thread starts within milliseconds of the interpreter, sometimes before the process
    has been read: a few of its samples may lack Python frames.)"""
    out = tmp_path / "short_threads.pb.gz"
    result = run_bpfprof("record", "-F", "199", "-o", str(out), "--", python, str(SCRIPTS / "short_threads.py"), "15")
    assert result.returncode == 0, result.stderr
    workers = [s for s in read_samples(out) if s.labels["tid"] != s.labels["pid"]]
    assert sum(s.count for s in workers) >= 15 * 0.1 * 199 * 0.5
    assert share(workers, lambda s: "burst" in [f.function for f in python_frames(s)]) >= 0.9
    assert share(workers, lambda s: str(s.labels["thread"]).startswith("request-")) >= 0.9


def test_processes_that_exit_before_a_drain_keep_their_python_frames(tmp_path):
    out = tmp_path / "short_processes.pb.gz"
    result = run_bpfprof("record", "-F", "199", "-o", str(out), "--",
                         pyenv_python(12), str(SCRIPTS / "short_processes.py"), "8")
    assert result.returncode == 0, result.stderr
    samples = read_samples(out)
    children = [s for s in samples if s.labels["pid"] != min(s.labels["pid"] for s in samples)]
    assert len({s.labels["pid"] for s in children}) == 8
    assert sum(s.count for s in children) >= 8 * 0.2 * 199 * 0.5
    # Each child spends about a tenth of its life starting up, before outer() runs.
    assert share(children, lambda s: s.has_chain("<module>", "outer")) >= 0.75
    # Only code freed within milliseconds of running (an imported module's body) is
    # gone before it is read.
    assert share(samples, lambda s: "[unknown Python code]" in s.functions) <= 0.02
