"""The agent's local sink: whole files, mode 0640, retention by age and by size, failures survived."""

import os
import stat
import time

import pytest

from bpfprof.collector.agent.disk_sink import DiskSink, profile_file_name
from bpfprof.collector.errors import UsageError

NOW = time.time()
START_NS = 1_700_000_000_123_456_789


def make(directory, name, size, age_s):
    path = directory / name
    path.write_bytes(b"x" * size)
    os.utime(path, (NOW - age_s, NOW - age_s))
    return path


def test_file_names_sort_by_time_and_say_node_and_type():
    assert profile_file_name(START_NS, "node-a", "cpu") == "20231114T221320.123Z.node-a.cpu.pb.gz"


def test_write_is_whole_with_mode_0640(tmp_path):
    sink = DiskSink(str(tmp_path / "profiles"), max_age_s=3600, max_bytes=1 << 20)
    assert sink.write("20231114T221320.000Z.n.cpu.pb.gz", b"profile")
    path = tmp_path / "profiles" / "20231114T221320.000Z.n.cpu.pb.gz"
    assert path.read_bytes() == b"profile"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(tmp_path / "profiles") == [path.name]  # no temporary left
    assert sink.written == 1 and sink.failed == 0


def test_retention_by_age(tmp_path):
    old = make(tmp_path, "20231114T000000.000Z.n.cpu.pb.gz", 10, age_s=7200)
    recent = make(tmp_path, "20231114T010000.000Z.n.cpu.pb.gz", 10, age_s=60)
    sink = DiskSink(str(tmp_path), max_age_s=3600, max_bytes=1 << 20, clock=lambda: NOW)
    sink.write("20231114T020000.000Z.n.block.pb.gz", b"new")
    assert not old.exists() and recent.exists()
    assert sink.removed == 1


def test_retention_by_size_removes_the_oldest_first(tmp_path):
    files = [make(tmp_path, f"20231114T00000{i}.000Z.n.cpu.pb.gz", 100, age_s=60 - i) for i in range(5)]
    other = make(tmp_path, "notes.txt", 10_000, age_s=99_999)  # not ours: never removed
    sink = DiskSink(str(tmp_path), max_age_s=3600, max_bytes=350, clock=lambda: NOW)
    sink.write("20231114T000009.000Z.n.cpu.pb.gz", b"y" * 100)
    assert [f.exists() for f in files] == [False, False, False, True, True]
    assert other.exists()
    assert sum(f.stat().st_size for f in tmp_path.iterdir() if f.name.endswith(".pb.gz")) <= 350


def test_leftover_temporary_files_are_removed_at_start(tmp_path):
    (tmp_path / ".bpfprof-abc123").write_bytes(b"half a profile")
    DiskSink(str(tmp_path), 3600, 1 << 20)
    assert os.listdir(tmp_path) == []


def test_a_failed_write_is_counted_and_logged_not_raised(tmp_path, caplog):
    directory = tmp_path / "profiles"
    sink = DiskSink(str(directory), 3600, 1 << 20)
    directory.rmdir()  # what a full or vanished disk looks like to the writer: an OSError
    assert not sink.write("20231114T000000.000Z.n.cpu.pb.gz", b"x")
    assert sink.failed == 1 and sink.written == 0
    assert "cannot write profile" in caplog.text
    directory.mkdir()
    assert sink.write("20231114T000015.000Z.n.cpu.pb.gz", b"x")  # and the next interval is written


def test_an_unusable_directory_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot use --output-dir"):
        DiskSink(str(tmp_path / "file" / "sub"), 3600, 1 << 20)
