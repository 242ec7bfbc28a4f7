"""What the collector does with the ranges BPF keeps: holes cut out, ranges of ended
process images told apart, reserved address space holding nothing."""

from bpfprof.collector.probe.memory_ranges import (RESERVED, Hole, Range, classify, cut_holes, pack_range,
                                                   unpack_ranges)

KEY = (7, 7, -14, 3, 0, 0, b"worker".ljust(16, b"\0"))
MiB = 1 << 20


def held(start, end, since=10, pid=7, generation=1, flags=0):
    return Range(pid, start, end, generation, since, flags, KEY)


def test_ranges_read_back_as_bpf_keeps_them():
    r = held(0x7F0000000000, 0x7F0000400000, flags=RESERVED)
    assert list(unpack_ranges(*pack_range(r))) == [r]


def test_a_hole_keeps_what_lies_on_either_side():
    r = held(0, 64 * MiB)
    removed, added = cut_holes([r], [Hole(7, 16 * MiB, 20 * MiB, since_ns=20)])
    assert removed == [r]
    assert added == [held(0, 16 * MiB), held(20 * MiB, 64 * MiB)]


def test_holes_apply_in_order_and_across_ranges():
    first, second = held(0, 8 * MiB), held(8 * MiB, 16 * MiB)
    holes = [Hole(7, 6 * MiB, 10 * MiB, since_ns=30), Hole(7, 2 * MiB, 3 * MiB, since_ns=20)]
    removed, added = cut_holes([first, second], holes)
    assert sorted(removed) == sorted([first, second])
    assert sorted(added) == sorted([held(0, 2 * MiB), held(3 * MiB, 6 * MiB), held(10 * MiB, 16 * MiB)])


def test_a_hole_leaves_ranges_obtained_after_it_and_other_processes_alone():
    later, other = held(0, 8 * MiB, since=50), held(0, 8 * MiB, pid=8)
    assert cut_holes([later, other], [Hole(7, 0, 8 * MiB, since_ns=40)]) == ([], [])


def test_ranges_of_an_ended_image_are_told_apart_and_reserved_ones_hold_nothing():
    live, old, reserved = held(0, 4 * MiB), held(8 * MiB, 9 * MiB, generation=0), held(16 * MiB, 80 * MiB, flags=RESERVED)
    gone = held(0, 2 * MiB, pid=9)
    reading = classify([live, old, reserved, gone], {7: 1})
    assert reading.live.by_key == {KEY: [1, 4 * MiB]}
    assert reading.ended.by_key == {KEY: [2, 3 * MiB]}
    assert sorted(reading.ended_ranges) == sorted([old, gone])
    assert sorted(reading.remaining) == sorted([live, reserved])


def test_one_process_is_read_whole_for_the_oom_killer():
    reading = classify([held(0, 4 * MiB), held(8 * MiB, 9 * MiB, generation=0), held(0, MiB, pid=9)], {}, pid=7)
    assert reading.live.by_key == {KEY: [2, 5 * MiB]}
    assert reading.ended_ranges == [] and reading.remaining == []
