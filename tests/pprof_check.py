"""Every profile the tests write is read back by an independent reader: `go tool pprof`."""

from __future__ import annotations

import shutil
import subprocess
from typing import Iterable

from conftest import skip_or_fail


def check_with_go(path, expect: Iterable[str] = ()) -> str:
    """Runs `go tool pprof -raw` and `-top` on path; both must succeed without
    complaint, and -raw must name each function in `expect`. Returns the -raw text."""
    go = shutil.which("go")
    if go is None:
        skip_or_fail("go is not installed (apt-get install golang-go)")
    outputs = {}
    for mode in ("-raw", "-top"):
        result = subprocess.run([go, "tool", "pprof", mode, str(path)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"go tool pprof {mode} {path} failed:\n{result.stderr}"
        complaints = [l for l in result.stderr.splitlines() if l.strip() and "Main binary filename not available" not in l]
        assert not complaints, f"go tool pprof {mode} complained:\n{result.stderr}"
        outputs[mode] = result.stdout
    for name in expect:
        assert name in outputs["-raw"], f"{name} is not in go tool pprof -raw output of {path}"
    return outputs["-raw"]
