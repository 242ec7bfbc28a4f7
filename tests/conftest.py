"""Shared test fixtures: building C fixtures, running bpfprof, and the BPF requirement
(in CI, CI=true turns a would-be skip into a failure)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import List

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
# Strict mode: a bug in a parser (an exception other than the symbolizer's errors) is not
# contained as an "internal error" but fails the test; bpfprof run by tests inherits it.
os.environ["BPFPROF_STRICT"] = "1"
IN_CI = os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str) -> None:
    """Without the means to run a test: a skip on a developer's machine, a failure in CI."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def bpf_ready() -> None:
    """Root, a BPF-capable kernel, headers and bcc, as `bpfprof check` judges them."""
    if os.geteuid() != 0:
        skip_or_fail("BPF tests need root")
    result = subprocess.run([sys.executable, "-m", "bpfprof", "check"], capture_output=True, text=True)
    if result.returncode != 0:
        skip_or_fail(f"bpfprof check failed:\n{result.stdout}{result.stderr}")


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="session")
def build_c(build_dir):
    """Compile tests/fixtures/NAME.c with frame pointers (unless flags say otherwise)."""

    def build(name: str, *flags: str) -> Path:
        out = build_dir / (name + "".join(f.replace("-", "_").replace("=", "") for f in flags))
        if not out.exists():
            cmd = ["gcc", "-O1", "-g", "-fno-omit-frame-pointer", *flags, "-o", str(out), str(FIXTURES / f"{name}.c")]
            subprocess.run(cmd, check=True)
        return out

    return build


def run_bpfprof(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bpfprof", *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def bpfprof_command() -> List[str]:
    return [sys.executable, "-m", "bpfprof"]


def sampler_programs() -> set:
    """IDs of the BPF sampler programs loaded now (by any bpfprof)."""
    if not shutil.which("bpftool"):
        skip_or_fail("needs bpftool (installed by scripts/setup --test)")
    programs = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
    return {int(m) for m in re.findall(r"^(\d+): perf_event\s+name on_cpu_sample\b", programs, re.M)}


def sampling_started(profiler: subprocess.Popen, before: set, timeout: float = 60) -> set:
    """Waits until the profiler (started after `before` was taken) has its sampler loaded:
    the IDs of its programs."""
    deadline = time.monotonic() + timeout
    while not (mine := sampler_programs() - before) and time.monotonic() < deadline and profiler.poll() is None:
        time.sleep(0.2)
    assert mine, "the profiler never loaded its sampler"
    return mine


def _bpftool_json(*args: str):
    return json.loads(subprocess.run(["bpftool", *args, "-j"], capture_output=True, text=True, check=True).stdout)


def _maps_of(profiler_pid: int) -> dict:
    """The BPF maps a profiler holds open, by name (as the kernel keeps it: 15 characters)."""
    ids = set()
    for fd in os.listdir(f"/proc/{profiler_pid}/fdinfo"):
        try:
            with open(f"/proc/{profiler_pid}/fdinfo/{fd}") as info:
                found = re.search(r"^map_id:\s*(\d+)", info.read(), re.M)
        except OSError:  # closed meanwhile
            continue
        if found:
            ids.add(int(found.group(1)))
    return {m["name"]: m["id"] for m in _bpftool_json("map", "show") if m["id"] in ids}


def _has_read(profiler_pid: int, pid: int, python: bool) -> bool:
    """Whether the profiler has installed unwind tables for every binary the process
    executes (and, with python, the CPython walker's entry for it)."""
    maps = _maps_of(profiler_pid)
    if "unwind_processe" not in maps or (python and "python_processe" not in maps):
        return False
    if python and not any(e["formatted"]["key"] == pid for e in _bpftool_json("map", "dump", "id",
                                                                            str(maps["python_processe"]))):
        return False
    runs = [e["formatted"]["value"] for e in _bpftool_json("map", "dump", "id", str(maps["unwind_processe"]))
            if e["formatted"]["key"] == pid]
    if not runs:
        return False
    with_rows = []
    for index in range(runs[0]["first_mapping"], runs[0]["first_mapping"] + runs[0]["num_mappings"]):
        key = [str(b) for b in index.to_bytes(4, "little")]
        mapping = _bpftool_json("map", "lookup", "id", str(maps["unwind_mappings"]), "key", *key)["formatted"]["value"]
        if mapping["num_rows"]:
            with_rows.append((mapping["start"], mapping["end"]))
    with open(f"/proc/{pid}/maps") as maps_file:
        executable = [[int(a, 16) for a in line.split()[0].split("-")] for line in maps_file
                      if line.split()[1][2] == "x" and line.split()[-1].startswith("/")]
    return all(any(s <= start and end <= e for s, e in with_rows) for start, end in executable)


def profiler_has_read(profiler: subprocess.Popen, pid: int, python: bool = False, timeout: float = 60) -> None:
    """Waits until the profiler unwinds the process from its binaries' tables (and walks
    its CPython frames, with python): from then on its stacks are whole."""
    if not shutil.which("bpftool"):
        skip_or_fail("needs bpftool (installed by scripts/setup --test)")
    deadline = time.monotonic() + timeout
    while True:
        assert profiler.poll() is None, "the profiler ended before it read the process"
        if _has_read(profiler.pid, pid, python):
            return
        assert time.monotonic() < deadline, f"the profiler never read process {pid}"
        time.sleep(0.1)


def _pyenv_root() -> Path:
    """PYENV_ROOT, else what `pyenv root` says, else ~/.pyenv."""
    if os.environ.get("PYENV_ROOT"):
        return Path(os.environ["PYENV_ROOT"])
    try:
        out = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return Path.home() / ".pyenv"


PYENV_VERSIONS = _pyenv_root() / "versions"
STATIC_PYTHON = "/usr/bin/python3"  # Debian's: one static executable, no libpython
PYTHON_MINORS = tuple(range(6, 14))  # the CPythons that pyenv installed here


def pyenv_python(minor: int) -> str:
    """The newest pyenv-installed python3.MINOR (a skip, or in CI a failure, without one)."""
    found = []
    for binary in PYENV_VERSIONS.glob(f"3.{minor}.*/bin/python3.{minor}"):
        patch = re.fullmatch(rf"3\.{minor}\.(\d+)", binary.parent.parent.name)
        if patch:
            found.append((int(patch.group(1)), str(binary)))
    if not found:
        skip_or_fail(f"no CPython 3.{minor} under {PYENV_VERSIONS}")
    return max(found)[1]


def include_dir(prefix: Path, minor: int) -> Path:
    """Where the headers of the CPython 3.<minor> installed under prefix are: up to 3.7 the
    directory carries the ABI flag m (pymalloc)."""
    return prefix / "include" / f"python3.{minor}{'m' if minor <= 7 else ''}"


# The Debian sid chroot with the CPythons newer than pyenv's (scripts/sid-python, which
# reads the same variable and default; `scripts/setup --test` builds it).
SID_ROOT = Path(os.environ.get("BPFPROF_SID_ROOT", "/var/cache/bpfprof/sid-python"))
SID_MINORS = (14, 15)


def sid_python(minor: int) -> str:
    """A launcher that runs the sid chroot's python3.MINOR in a mount namespace of its own
    (tests/fixtures/sid/launch): a skip, or in CI a failure, without the chroot."""
    if not (SID_ROOT / "usr/bin" / f"python3.{minor}").exists():
        skip_or_fail(f"no python3.{minor} in {SID_ROOT} (scripts/sid-python builds it)")
    if os.geteuid() != 0 or not shutil.which("unshare"):
        skip_or_fail("the sid chroot's CPythons run in a mount namespace of their own: needs root and unshare")
    return str(FIXTURES / "sid" / f"python3.{minor}")


@pytest.fixture(params=[*(pytest.param(("pyenv", m), id=f"pyenv-3.{m}") for m in PYTHON_MINORS),
                        pytest.param(("debian-static", None), id="debian-static"),
                        *(pytest.param(("sid", m), id=f"sid-3.{m}") for m in SID_MINORS)])
def python(request) -> str:
    """Each installed CPython in turn: the pyenv builds (shared libpython), Debian's static
    one, and the static ones of the sid chroot, each run in its own mount namespace."""
    kind, minor = request.param
    if kind == "debian-static":
        if not os.path.exists(STATIC_PYTHON):
            skip_or_fail(f"no {STATIC_PYTHON}")
        return STATIC_PYTHON
    return sid_python(minor) if kind == "sid" else pyenv_python(minor)


class MemoryCgroup:
    """A cgroup of its own with a memory limit, v1 or v2, whichever this machine mounts."""

    def __init__(self, limit: int):
        name = f"bpfprof-test-{uuid.uuid4().hex[:8]}"
        v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
        if (v1 / "memory.limit_in_bytes").exists():
            self.path = v1 / name
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
        elif "memory" in self._read(v2 / "cgroup.controllers").split():
            if "memory" not in self._read(v2 / "cgroup.subtree_control").split():
                (v2 / "cgroup.subtree_control").write_text("+memory")
            self.path = v2 / name
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(limit))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        else:
            skip_or_fail("no cgroup memory controller (v1 or v2) is mounted under /sys/fs/cgroup")

    @staticmethod
    def _read(path: Path) -> str:
        return path.read_text() if path.exists() else ""

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        self.path.rmdir()


@pytest.fixture
def memory_cgroup():
    made = []

    def make(limit: int) -> MemoryCgroup:
        made.append(MemoryCgroup(limit))
        return made[-1]

    yield make
    for cgroup in made:
        cgroup.remove()
