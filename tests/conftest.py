"""Shared test fixtures: building C fixtures, running bpfprof, and the BPF requirement
(in CI, CI=true turns a would-be skip into a failure)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
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
PYTHON_MINORS = tuple(range(8, 14))  # the CPythons that pyenv installed here


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


@pytest.fixture(params=[*(pytest.param(m, id=f"pyenv-3.{m}") for m in PYTHON_MINORS),
                        pytest.param(None, id="debian-static")])
def python(request) -> str:
    """Each installed CPython in turn: the pyenv builds (shared libpython) and Debian's
    static one."""
    if request.param is None:
        if not os.path.exists(STATIC_PYTHON):
            skip_or_fail(f"no {STATIC_PYTHON}")
        return STATIC_PYTHON
    return pyenv_python(request.param)
