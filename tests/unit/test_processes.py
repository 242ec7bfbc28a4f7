import itertools
import os
import time

from bpfprof.collector.processes.table import (MAPPINGS_AT_MOST, MAPS_BYTES_AT_MOST, PATH_CHARS_AT_MOST, ProcessTable,
                                               parse_maps, process_root)
from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.native.symbolizer import NativeSymbolizer

MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1234 /usr/bin/prog
55d0c0a01000-55d0c0a05000 r-xp 00001000 fd:01 1234 /usr/bin/prog
7f0000000000-7f0000100000 r-xp 00028000 08:02 99 /lib/libc.so.6 (deleted)
7f0000200000-7f0000201000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
"""


def test_parse_maps_keeps_executable_mappings_sorted():
    mappings, too_many = parse_maps(42, MAPS)
    assert not too_many
    assert [m.name for m in mappings] == ["/usr/bin/prog", "/lib/libc.so.6", "[vdso]"]
    prog, libc, vdso = mappings
    assert (prog.start, prog.end, prog.offset) == (0x55D0C0A01000, 0x55D0C0A05000, 0x1000)
    assert prog.obj.file_id == (0xFD, 1, 1234)
    assert prog.obj.open_path == "/proc/42/map_files/55d0c0a01000-55d0c0a05000"
    assert prog.obj.root == "/proc/42/root"
    assert libc.obj.path == "/lib/libc.so.6" and libc.obj.file_id == (8, 2, 99)
    assert vdso.obj is None
    low, _ = parse_maps(42, "00400000-00452000 r-xp 00000000 fd:01 5 /usr/bin/static\n")
    assert low[0].obj.open_path == "/proc/42/map_files/400000-452000"  # the kernel takes no leading zeros there


def test_names_are_the_rest_of_the_line_and_long_ones_are_cut():
    names = ["/opt/my app/bin/prog ", "/tmp/a\rb\x1cc\u2028d", "/tmp/" + "d" * 2 * PATH_CHARS_AT_MOST]
    maps = "".join(f"7f{i:010x}-7f{i + 1:010x} r-xp 00000000 08:02 {i + 1}    {name}\n" for i, name in enumerate(names))
    mappings, _ = parse_maps(1, maps + "7fff00000000-7fff00001000 r-xp 00000000 08:02 9 /tmp/gone (deleted)\n")
    assert [m.obj.path for m in mappings] == [*names[:2], names[2][:PATH_CHARS_AT_MOST], "/tmp/gone"]


def _exec_line(i: int, path: str = "/tmp/lib.so") -> str:
    return f"{0x7F0000000000 + i * 0x1000:x}-{0x7F0000001000 + i * 0x1000:x} r-xp 00000000 08:02 {i + 1} {path}\n"


def test_maps_past_the_byte_bound_are_cut_counted_and_their_first_mappings_kept(tmp_path):
    failures = Failures()
    table = ProcessTable(NativeSymbolizer(), proc=str(tmp_path), failures=failures)
    long_path = "/tmp/" + "p" * (PATH_CHARS_AT_MOST - 5)  # a long name mapped many times: few mappings, many bytes
    lines = [_exec_line(i, long_path) for i in range(MAPS_BYTES_AT_MOST // len(_exec_line(0, long_path)) + 100)]
    assert len(lines) < MAPPINGS_AT_MOST
    _fake_proc(tmp_path, 5, "".join(lines))
    started = time.monotonic()
    process = table.snapshot(5)
    assert time.monotonic() - started < 5  # tens of milliseconds; unbounded, seconds at a hundred MB
    kept = sum(1 for end in itertools.accumulate(map(len, lines)) if end <= MAPS_BYTES_AT_MOST)  # whole lines
    assert len(process.mappings) == kept and process.mappings[-1].start == 0x7F0000000000 + (kept - 1) * 0x1000
    assert failures.counts() == {("process", "too large"): 1}


def test_maps_with_no_end_are_read_no_further_than_the_bound(tmp_path):
    failures = Failures()
    table = ProcessTable(NativeSymbolizer(), proc=str(tmp_path), failures=failures)
    d = tmp_path / "6"
    d.mkdir()
    (d / "comm").write_text("endless\n")
    os.symlink("/dev/zero", d / "maps")  # read whole, it would never end
    assert table.snapshot(6).mappings == []
    assert failures.counts() == {("process", "too large"): 1}


def test_executable_mappings_past_the_bound_are_left_out_and_counted(tmp_path):
    failures = Failures()
    table = ProcessTable(NativeSymbolizer(), proc=str(tmp_path), failures=failures)
    _fake_proc(tmp_path, 7, "".join(_exec_line(i) for i in range(MAPPINGS_AT_MOST + 1000)))
    process = table.snapshot(7)
    assert len(process.mappings) == MAPPINGS_AT_MOST
    assert process.get_mapping(0x7F0000000000 + (MAPPINGS_AT_MOST - 1) * 0x1000) is not None
    assert process.get_mapping(0x7F0000000000 + MAPPINGS_AT_MOST * 0x1000) is None
    assert failures.counts() == {("process", "too large"): 1}
    _fake_proc(tmp_path, 8, "".join(_exec_line(i) for i in range(MAPPINGS_AT_MOST)))
    assert len(table.snapshot(8).mappings) == MAPPINGS_AT_MOST
    assert failures.counts() == {("process", "too large"): 1}  # at the bound is within it


def _fake_proc(tmp_path, pid, maps, comm="prog"):
    d = tmp_path / str(pid)
    d.mkdir()
    (d / "maps").write_text(maps)
    (d / "comm").write_text(comm + "\n")
    return d


def test_names_that_are_not_utf8_do_not_stop_the_snapshot(tmp_path):
    d = tmp_path / "8"
    d.mkdir()
    (d / "maps").write_bytes(MAPS.replace("/usr/bin/prog", "/opt/caf\xe9/prog").encode("latin-1"))
    (d / "comm").write_bytes("worker-ß".encode()[:-1] + b"\n")  # cut inside the last character
    process = ProcessTable(NativeSymbolizer(), proc=str(tmp_path)).snapshot(8)
    assert process.comm == "worker-\ufffd"
    assert process.mappings[0].name == "/opt/caf\ufffd/prog"


def test_snapshot_outlives_the_process(tmp_path):
    native = NativeSymbolizer()
    table = ProcessTable(native, proc=str(tmp_path))
    d = _fake_proc(tmp_path, 7, MAPS)
    assert table.snapshot(7).comm == "prog"
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    # Re-reading fails now; the earlier snapshot stands.
    assert table.get_mapping(7, 0x55D0C0A01010).name == "/usr/bin/prog"
    table.on_exit(7)
    assert table.end_drain(table.exited()) == [7]
    assert table.get(7, "gone").readable is False
    assert table.num_seen == 2 and table.num_unreadable == 1


def test_address_outside_snapshot_rereads_a_process_that_mapped_code(tmp_path):
    table = ProcessTable(NativeSymbolizer(), proc=str(tmp_path))
    d = _fake_proc(tmp_path, 8, MAPS.splitlines()[1] + "\n")
    table.snapshot(8)
    (d / "maps").write_text(MAPS)  # a library loaded after the snapshot
    assert table.get_mapping(8, 0x7F0000000010) is None  # the kernel has not said it mapped code
    table.on_code_mapped([8, 99])  # 99: never read, so nothing to read again
    assert table.get_mapping(8, 0x7F0000000010).name == "/lib/libc.so.6"


def test_address_in_no_mapping_of_unchanged_maps_keeps_the_snapshot(tmp_path):
    snapshots = []
    table = ProcessTable(NativeSymbolizer(), proc=str(tmp_path), on_snapshot=[snapshots.append])
    d = _fake_proc(tmp_path, 8, MAPS)
    process = table.snapshot(8)
    table.on_code_mapped([8])
    assert table.get_mapping(8, 0x1234) is None  # a frame pointer that was not one
    assert table.get(8) is process and snapshots == [process]
    (d / "maps").write_text(MAPS + "7f3000000000-7f3000001000 r-xp 00000000 08:02 5 /lib/late.so\n")
    assert table.get_mapping(8, 0x7F3000000010) is None  # read once for each time it mapped code


def test_a_process_in_a_container_carries_its_ids(tmp_path):
    table = ProcessTable(NativeSymbolizer(), proc=str(tmp_path))
    container_id = "ab" * 32
    uid = "6e1f6c1e-2d3b-4c5a-9e8f-7a6b5c4d3e2f"
    d = _fake_proc(tmp_path, 9, MAPS)
    (d / "cgroup").write_text(f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/"
                              f"cri-containerd-{container_id}.scope\n")
    container = table.snapshot(9).container
    assert (container.container_id, container.pod_uid) == (container_id, uid)
    _fake_proc(tmp_path, 10, MAPS)  # no cgroup file: on the host
    assert table.snapshot(10).container is None


def test_a_process_read_while_its_libraries_load_is_read_again(tmp_path):
    again = []
    table = ProcessTable(NativeSymbolizer(), proc=str(tmp_path), see_again=again.append)
    loader = "7f1000000000-7f1000020000 r-xp 00001000 fd:01 77 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\n"
    _fake_proc(tmp_path, 11, MAPS.splitlines()[1] + "\n" + loader)
    table.snapshot(11)
    assert again == [11]
    _fake_proc(tmp_path, 12, MAPS.replace("libc.so.6 (deleted)", "libc.so.6") + loader)
    table.snapshot(12)
    assert again == [11]  # its C library is there: start-up is over


def test_a_process_whose_root_is_ours_has_its_files_found_in_ours_even_after_it_exits(tmp_path):
    assert process_root(os.getpid()) == "/"
    (tmp_path / "7").mkdir()
    os.symlink(tmp_path, tmp_path / "7" / "root")  # a root of its own, as in a container
    assert process_root(7, str(tmp_path)) == f"{tmp_path}/7/root"
    mappings, _ = parse_maps(7, MAPS, "/")
    assert {m.obj.root for m in mappings if m.obj} == {"/"}
