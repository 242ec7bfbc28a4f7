"""Shared test fixtures: building C fixtures, running bpfprof, and the BPF requirement
(in CI, CI=true turns a would-be skip into a failure)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
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
