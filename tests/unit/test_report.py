"""`bpfprof report`: the function table of any pprof (built here, or written by Go), its
options, the diff table, and bad input."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess

import pytest

from bpfprof.collector.output.functions import diff_rows, function_rows, narrow
from bpfprof.collector.output.pprof import load_profile, write_pprof
from bpfprof.collector.profile import Labels, block_profile, cpu_profile
from bpfprof.symbolizer.frames import Frame, FrameKind, Module
from conftest import FIXTURES, run_bpfprof, skip_or_fail

APP = Module("/usr/bin/app", "ab12")
KERNEL = Module("[kernel.kallsyms]")
MAIN = Frame(FrameKind.NATIVE, "main", APP, 0x1100, "app.c", 30, 28)
WORK = Frame(FrameKind.NATIVE, "work", APP, 0x1200, "app.c", 12, 10)
WORK_AGAIN = Frame(FrameKind.NATIVE, "work", APP, 0x1210, "app.c", 14, 10)  # same function, another line
READ = Frame(FrameKind.KERNEL, "ksys_read", KERNEL, 0xFFFFFFFF81000000)
CALC = Frame(FrameKind.PYTHON, "Handler.calc", None, 0, "app.py", 41, 39)
A = Labels(pid=10, tid=11, comm="app", thread="worker")
B = Labels(pid=20, tid=20, comm="other", thread="other")
MS = 1_000_000


def cpu(samples):
    profile = cpu_profile(hz=100, start_ns=0)
    for stack, labels, n in samples:
        profile.add(stack, labels, [n, n * 10 * MS])
    return profile


@pytest.fixture
def written(tmp_path):
    """main -> work (60 samples, 20 more of them in the kernel's ksys_read), main -> calc
    (15), and in another process main -> work -> work (recursion, 5)."""
    path = tmp_path / "cpu.pb.gz"
    write_pprof(cpu([((WORK, MAIN), A, 40), ((READ, WORK_AGAIN, MAIN), A, 20), ((CALC, MAIN), A, 15),
                     ((WORK, WORK, MAIN), B, 5)]), str(path))
    return path


def cells(line):
    return re.split(r"\s{2,}", line.strip())  # columns are two spaces apart; "450.00 ms" is one cell


def table(result):
    """{function: [Self %, Self, Total %, Total, place]} of a printed table."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = cells(lines[0])
    assert header[:5] == ["Self %", "Self", "Total %", "Total", "Function"] and header[5].startswith("File:line")
    return {row[4]: row[:4] + row[5:] for row in map(cells, lines[1:])}


def test_self_and_total_per_function_in_milliseconds(written):
    rows = table(run_bpfprof("report", str(written)))
    assert rows["work"] == ["56.25%", "450.00 ms", "81.25%", "650.00 ms", "app.c:10"]  # recursion counted once
    assert rows["ksys_read [k]"] == ["25.00%", "200.00 ms", "25.00%", "200.00 ms", "[kernel.kallsyms]"]
    assert rows["Handler.calc"] == ["18.75%", "150.00 ms", "18.75%", "150.00 ms", "app.py:39"]
    assert rows["main"] == ["0.00%", "0", "100.00%", "800.00 ms", "app.c:28"]
    assert list(rows) == ["work", "ksys_read [k]", "Handler.calc", "main"]  # by self


def test_sort_limit_type_pid_and_focus(written):
    rows = table(run_bpfprof("report", str(written), "--sort", "total", "--limit", "2"))
    assert list(rows) == ["main", "work"]
    rows = table(run_bpfprof("report", str(written), "--type", "samples"))
    assert rows["work"][:4] == ["56.25%", "45", "81.25%", "65"]  # counts
    rows = table(run_bpfprof("report", str(written), "--pid", "20"))
    assert list(rows) == ["work", "main"] and rows["work"][0] == "100.00%"
    rows = table(run_bpfprof("report", str(written), "--focus", "^ksys_"))
    assert list(rows) == ["ksys_read [k]", "main", "work"] and rows["work"][2] == "100.00%"


def test_the_table_fits_the_terminal_and_is_aligned(written):
    for columns in (70, 90, 200):
        result = run_bpfprof("report", str(written), env={**os.environ, "COLUMNS": str(columns)})
        lines = result.stdout.splitlines()
        assert max(map(len, lines)) <= columns, result.stdout
        assert len({line.index("%") for line in lines}) == 1, result.stdout  # the percent column lines up
        assert len({line.index(" ms  ") for line in lines[1:] if " 0  " not in line[:30]}) == 1, result.stdout


def test_block_profile_shows_delay_by_default(tmp_path):
    profile = block_profile(start_ns=0)
    profile.add((WORK, MAIN), A, [3, 1_500 * MS])
    path = tmp_path / "block.pb.gz"
    write_pprof(profile, str(path))
    rows = table(run_bpfprof("report", str(path)))
    assert rows["work"][:4] == ["100.00%", "1.50 s", "100.00%", "1.50 s"]
    rows = table(run_bpfprof("report", str(path), "--type", "contentions"))
    assert rows["work"][:4] == ["100.00%", "3", "100.00%", "3"]


def test_diff_compares_shares_of_each_total(tmp_path):
    base, new = tmp_path / "base.pb.gz", tmp_path / "new.pb.gz"
    write_pprof(cpu([((WORK, MAIN), A, 50), ((CALC, MAIN), A, 50)]), str(base))
    write_pprof(cpu([((WORK, MAIN), A, 300), ((CALC, MAIN), A, 100)]), str(new))  # work: 50% -> 75%
    rows = {r.function.name: r for r in diff_rows(load_profile(str(base)), load_profile(str(new)))}
    assert rows["work"].change("self") == pytest.approx(0.25)
    assert rows["Handler.calc"].change("self") == pytest.approx(-0.25)
    assert rows["main"].change("total") == 0
    result = run_bpfprof("report", "--diff", str(base), str(new))
    assert result.returncode == 0, result.stderr
    rows = {row[4]: row[:4] for row in map(cells, result.stdout.splitlines()[1:])}
    assert rows["work"] == ["+25.00", "50.00 → 75.00", "+25.00", "50.00 → 75.00"]
    assert rows["Handler.calc"] == ["-25.00", "50.00 → 25.00", "-25.00", "50.00 → 25.00"]
    assert rows["main"] == ["+0.00", "0.00 → 0.00", "+0.00", "100.00 → 100.00"]


def test_go_written_profiles(tmp_path):
    """A Go program writes a custom count profile and a CPU profile with runtime/pprof;
    our table agrees with `go tool pprof -top` on the first and finds the spin in the second."""
    go = shutil.which("go")
    if go is None:
        skip_or_fail("go is not installed (apt-get install golang-go)")
    subprocess.run([go, "run", str(FIXTURES / "go" / "profiles.go"), str(tmp_path)], check=True, cwd=tmp_path,
                   timeout=300)
    rows = table(run_bpfprof("report", str(tmp_path / "widgets.pb.gz")))
    assert rows["main.alpha"][:4] == ["75.00%", "3", "75.00%", "3"]
    assert rows["main.beta"][:4] == ["25.00%", "1", "25.00%", "1"]
    assert rows["main.main"][2:4] == ["100.00%", "4"]
    top = subprocess.run([go, "tool", "pprof", "-top", str(tmp_path / "widgets.pb.gz")], capture_output=True,
                         text=True, check=True).stdout
    assert any(line.split()[:5] == ["3", "75.00%", "75.00%", "3", "75.00%"] and "main.alpha" in line
               for line in top.splitlines()), top
    profile = load_profile(str(tmp_path / "cpu.pb.gz"))
    assert [t.type for t in profile.sample_types] == ["samples", "cpu"]
    rows = table(run_bpfprof("report", str(tmp_path / "cpu.pb.gz")))
    assert float(rows["main.spin"][2].rstrip("%")) > 80 and rows["main.spin"][3].endswith(" ms")


def test_functions_are_one_row_whatever_the_line(written):
    profile = load_profile(str(written))
    rows = function_rows(narrow(profile))
    assert [r.function.name for r in rows].count("work") == 1


@pytest.mark.parametrize("content", [b"", b"not a profile", gzip.compress(b"\xff\xff\xff"),
                                     b"\x1f\x8b\x08\x00garbage"],
                         ids=["empty", "text", "gzip-garbage", "truncated-gzip"])
def test_not_a_profile_is_one_line(tmp_path, content):
    path = tmp_path / "bad.pb.gz"
    path.write_bytes(content)
    result = run_bpfprof("report", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "is not a" in result.stderr and "Traceback" not in result.stderr


def test_truncated_profile_is_one_line(written, tmp_path):
    data = gzip.decompress(written.read_bytes())
    path = tmp_path / "cut.pb.gz"
    path.write_bytes(gzip.compress(data[: len(data) // 2]))
    result = run_bpfprof("report", str(path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--sort", "name"], "Invalid value for '--sort'"),
    (["--type", "bytes"], "no sample type 'bytes'"),
    (["--focus", "("], "is not a regular expression"),
    (["--pid", "x"], "--pid takes process IDs"),
    (["-o", "/nonexistent/out.folded"], "cannot write"),
    (["-o", "out.txt"], "unknown output format"),
])
def test_bad_options_are_one_line(written, args, message):
    result = run_bpfprof("report", str(written), *args)
    assert result.returncode != 0
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_missing_file_and_wrong_count(tmp_path, written):
    assert "cannot read" in run_bpfprof("report", str(tmp_path / "none.pb.gz")).stderr
    result = run_bpfprof("report", "--diff", str(written))
    assert result.returncode == 2 and "--diff takes two files" in result.stderr


def test_names_in_a_profile_reach_the_terminal_escaped(tmp_path):
    """A profile is anyone's file: its names cannot clear the screen or reorder a line."""
    evil = Frame(FrameKind.NATIVE, "evil\x1b[2J\u202e", Module("/tmp/\x1b]0;title\x07x"), 0x10, "a\nb.c", 3)
    path = tmp_path / "evil.pb.gz"
    write_pprof(cpu([((evil, MAIN), A, 5)]), str(path))
    result = run_bpfprof("report", str(path))
    assert result.returncode == 0, result.stderr
    assert "evil\\x1b[2J\\u202e" in result.stdout
    assert not [c for c in result.stdout if ord(c) < 0x20 and c != "\n"]
    assert "\u202e" not in result.stdout
