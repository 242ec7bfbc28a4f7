"""Runs placed in a fixed-size array: first fit, freed runs merged with their neighbours."""

from bpfprof.collector.processes.run_allocator import RunAllocator


def test_first_fit_and_full():
    runs = RunAllocator(100)
    assert [runs.allocate(40), runs.allocate(40), runs.allocate(30)] == [0, 40, None]
    assert runs.allocate(20) == 80 and runs.num_used == 100
    assert runs.allocate(1) is None and runs.allocate(0) is None


def test_freed_runs_merge_and_are_reused():
    runs = RunAllocator(100)
    a, b, c = runs.allocate(30), runs.allocate(30), runs.allocate(30)
    runs.free(a, 30)
    runs.free(c, 30)
    assert runs.allocate(50) is None  # 30 + 40 free, apart
    runs.free(b, 30)  # joins both neighbours: one run of 100
    assert runs.num_used == 0 and runs.allocate(100) == 0


def test_a_smaller_run_takes_the_first_hole():
    runs = RunAllocator(100)
    first = runs.allocate(10)
    runs.allocate(10)
    runs.free(first, 10)
    assert runs.allocate(4) == 0 and runs.allocate(6) == 4 and runs.allocate(1) == 20


def test_no_capacity():
    assert RunAllocator(0).allocate(1) is None
