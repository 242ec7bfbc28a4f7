"""Kernel struct offsets from BTF, checked against bpftool's own reading of the same BTF."""

import os
import re
import shutil
import subprocess

import pytest

from bpfprof.collector.btf import VMLINUX_BTF, Btf, kernel_offset_of
from bpfprof.collector.errors import SetupError
from conftest import skip_or_fail


def bpftool_member_bits(struct_name, member):
    dump = subprocess.run(["bpftool", "btf", "dump", "file", VMLINUX_BTF, "format", "raw"],
                          check=True, capture_output=True, text=True).stdout
    inside = False
    for line in dump.splitlines():
        if line.startswith("["):
            inside = f"STRUCT '{struct_name}' " in line
        elif inside and (m := re.match(rf"\s+'{member}' type_id=\d+ bits_offset=(\d+)", line)):
            return int(m.group(1))
    raise AssertionError(f"bpftool shows no {struct_name}.{member}")


def test_task_struct_offsets_match_bpftool():
    if not os.path.exists(VMLINUX_BTF) or not shutil.which("bpftool"):
        skip_or_fail("needs kernel BTF and bpftool")
    assert kernel_offset_of("task_struct", "pid") == bpftool_member_bits("task_struct", "pid") // 8
    thread = bpftool_member_bits("task_struct", "thread") // 8
    fsbase = bpftool_member_bits("thread_struct", "fsbase") // 8
    assert kernel_offset_of("task_struct", "thread.fsbase") == thread + fsbase


def test_unknown_member_and_bad_file(tmp_path):
    bad = tmp_path / "btf"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(SetupError, match="CONFIG_DEBUG_INFO_BTF"):
        kernel_offset_of("task_struct", "pid", str(bad))
    if os.path.exists(VMLINUX_BTF):
        with open(VMLINUX_BTF, "rb") as f:
            btf = Btf(f.read())
        with pytest.raises(KeyError):
            btf.offset_of("task_struct", "no_such_member")
