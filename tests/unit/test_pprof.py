"""pprof as the output contract says, read back by us and by `go tool pprof`."""

import gzip
import os
import stat

import pytest

from bpfprof.collector.errors import UsageError
from bpfprof.collector.output import pprof
from bpfprof.collector.output.pprof import read_pprof, write_pprof
from bpfprof.symbolizer.atomic_file import write_atomically
from bpfprof.collector.profile import Labels, cpu_profile
from bpfprof.symbolizer.frames import Frame, FrameKind, Module
from pprof_check import check_with_go

APP = Module("/usr/bin/app", "0616edaa9c4bf8606ff426f28ff906fe92a91700")
KERNEL = Module("[kernel.kallsyms]")
MAIN = Frame(FrameKind.NATIVE, "main", APP, 0x1100, "app.c", 30, 28)
WORK = Frame(FrameKind.NATIVE, "work", APP, 0x1200, "app.c", 12, 10)
UNKNOWN = Frame(FrameKind.NATIVE, "[app+0x1300]", APP, 0x1300)
READ = Frame(FrameKind.KERNEL, "ksys_read", KERNEL, 0xFFFFFFFF81000000)
PY = Frame(FrameKind.PYTHON, "Handler.calc3", None, 0, "app.py", 41, 39)


@pytest.fixture
def written(tmp_path):
    profile = cpu_profile(hz=100, start_ns=1_700_000_000_000_000_000)
    profile.duration_ns = 2_000_000_000
    a = Labels(pid=10, tid=11, comm="app", thread="worker")
    b = Labels(pid=10, tid=12, comm="app", thread="main", extra=(("container", "web"),))
    profile.add((READ, WORK, MAIN), a, [3, 30_000_000])
    profile.add((WORK, MAIN), b, [5, 50_000_000])
    profile.add((UNKNOWN, PY, MAIN), b, [1, 10_000_000])
    profile.add((WORK, MAIN), b, [2, 20_000_000])  # adds to the earlier sample
    path = tmp_path / "cpu.pb.gz"
    write_pprof(profile, str(path))
    return path


def stack_names(message, sample):
    strings = message.string_table
    functions = {f.id: strings[f.name] for f in message.function}
    locations = {loc.id: loc for loc in message.location}
    return [functions[locations[i].line[0].function_id] for i in sample.location_id]


def test_header_follows_the_contract(written):
    m = read_pprof(str(written))
    s = m.string_table
    assert s[0] == ""
    assert [(s[t.type], s[t.unit]) for t in m.sample_type] == [("samples", "count"), ("cpu", "nanoseconds")]
    assert (s[m.period_type.type], s[m.period_type.unit], m.period) == ("cpu", "nanoseconds", 10_000_000)
    assert (m.time_nanos, m.duration_nanos) == (1_700_000_000_000_000_000, 2_000_000_000)
    assert len(s) == len(set(s)), "strings are stored once"


def test_samples_are_leaf_first_with_labels(written):
    m = read_pprof(str(written))
    s = m.string_table
    samples = {tuple(stack_names(m, x)): x for x in m.sample}
    assert set(samples) == {("ksys_read", "work", "main"), ("work", "main"), ("[app+0x1300]", "Handler.calc3", "main")}
    merged = samples[("work", "main")]
    assert list(merged.value) == [7, 70_000_000]
    labels = {s[l.key]: (s[l.str] if l.str else l.num) for l in merged.label}
    assert labels == {"pid": 10, "tid": 12, "comm": "app", "thread": "main", "container": "web"}


def test_functions_locations_and_mappings_are_shared(written):
    m = read_pprof(str(written))
    s = m.string_table
    assert len(m.location) == 5 and len(m.function) == 5  # main, work, unknown, read, calc3
    main_ids = {x.location_id[-1] for x in m.sample}
    assert len(main_ids) == 1
    mappings = {s[mp.filename]: mp for mp in m.mapping}
    assert set(mappings) == {"/usr/bin/app", "[kernel.kallsyms]"}
    app = mappings["/usr/bin/app"]
    assert s[app.build_id] == APP.build_id and app.has_functions and app.has_line_numbers
    for loc in m.location:
        if loc.mapping_id:
            mp = m.mapping[loc.mapping_id - 1]
            assert mp.memory_start <= loc.address < mp.memory_limit
    python = [loc for loc in m.location if not loc.mapping_id]
    assert len(python) == 1 and python[0].line[0].line == 41
    function = {s[f.name]: f for f in m.function}["Handler.calc3"]
    assert (s[function.filename], function.start_line) == ("app.py", 39)


def test_go_tool_pprof_reads_it(written):
    raw = check_with_go(written, expect=["ksys_read", "work", "main", "Handler.calc3", "[app+0x1300]"])
    assert "container:[web]" in raw


def test_write_leaves_no_temporary_files(written):
    assert [p.name for p in written.parent.iterdir()] == ["cpu.pb.gz"]


@pytest.mark.parametrize("content", [b"", b"not a profile", gzip.compress(b"\xff\xff\xff")], ids=["empty", "text", "garbage"])
def test_corrupt_input_is_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.pb.gz"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="is not a pprof profile"):
        read_pprof(str(path))


def test_missing_input(tmp_path):
    with pytest.raises(UsageError, match="cannot read"):
        read_pprof(str(tmp_path / "none.pb.gz"))


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "profile.pb.gz"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        read_pprof(str(fifo))


def test_a_gzip_bomb_stops_at_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(pprof, "MAX_PPROF_MESSAGE", 1 << 20)
    path = tmp_path / "bomb.pb.gz"
    path.write_bytes(gzip.compress(bytes(8 << 20)))
    with pytest.raises(UsageError, match="inflates to more than a profile can be"):
        read_pprof(str(path))


def test_a_cut_gzip_stream_is_one_clear_error(written):
    written.write_bytes(written.read_bytes()[:-20])
    with pytest.raises(UsageError, match="gzip stream is cut short"):
        read_pprof(str(written))


def test_string_indexes_out_of_range_read_as_empty(written):
    message = read_pprof(str(written))
    message.sample[0].label[0].key = len(message.string_table) + 5
    message.sample[0].label[1].str = 1 << 40
    profile = pprof.from_pprof(message)
    assert sum(sum(values) for values in profile.samples.values()) > 0


def test_the_file_gets_its_mode_from_the_open_file(tmp_path, monkeypatch):
    """Not through its name, which another process may have pointed elsewhere meanwhile."""
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: pytest.fail("chmod by path"))
    path = tmp_path / "out.bin"
    write_atomically(str(path), b"data", mode=0o640)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
