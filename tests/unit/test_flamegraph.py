"""The HTML flame graph's data, without a browser: the call tree per node, the function table,
the base shares of a differential page, and data that cannot break out of its script."""

import json
import re

from bpfprof.collector.output.flamegraph import summary, write_diff_flamegraph, write_flamegraph
from bpfprof.collector.output.functions import function_rows
from bpfprof.collector.profile import Labels, block_profile, cpu_profile, wall_profile
from bpfprof.symbolizer.frames import Frame, FrameKind, Module

APP = Module("/usr/bin/app")
MAIN = Frame(FrameKind.NATIVE, "main", APP, 0x1100, "app.c", 30, 28)
MAIN_LATER = Frame(FrameKind.NATIVE, "main", APP, 0x1140, "app.c", 34, 28)  # same function
WORK = Frame(FrameKind.PYTHON, "work", None, 0, "app.py", 21, 20)
READ = Frame(FrameKind.KERNEL, "ksys_read", Module("[kernel.kallsyms]"), 0xFFFFFFFF81000000)
ONE = Labels(pid=10, tid=11, comm="app", thread="main")
TWO = Labels(pid=10, tid=12, comm="app", thread="worker")


def page_data(path):
    page = path.read_text()
    found = re.search(r'<script type="application/json" id="profile-data">(.*?)</script>', page, re.S)
    return json.loads(found.group(1))


def paths(data):
    """{root-first names: (total, self)} of the page's preorder tree."""
    names = [f[0] for f in data["functions"]]
    flat = data["tree"]
    result, open_nodes = {}, []  # open_nodes: [path, children still to come]
    for k in range(0, len(flat), 4):
        function, total, self_, children = flat[k:k + 4]
        while open_nodes and open_nodes[-1][1] == 0:
            open_nodes.pop()
        if open_nodes:
            open_nodes[-1][1] -= 1
            path = open_nodes[-1][0] + (names[function],)
        else:
            assert function == -1
            path = ()
        result[path] = (total, self_)
        open_nodes.append([path, children])
    return result


def test_tree_merges_frames_of_one_function_root_first(tmp_path):
    profile = wall_profile(hz=100, start_ns=0)
    profile.add((READ, WORK, MAIN), ONE, [30])
    profile.add((WORK, MAIN_LATER), TWO, [20])  # other line, other thread: the same node
    profile.add((MAIN,), ONE, [5])
    profile.add((READ, MAIN), TWO, [7])
    write_flamegraph(profile, str(tmp_path / "out.html"))
    data = page_data(tmp_path / "out.html")
    assert paths(data) == {
        (): (62, 0),
        ("main",): (62, 5),
        ("main", "work"): (50, 20),
        ("main", "work", "ksys_read"): (30, 30),
        ("main", "ksys_read"): (7, 7),
    }
    rows = function_rows(profile)
    assert data["functions"] == [[r.function.name, r.function.where, ["kernel", "native", "python"].index(
        r.function.kind.value), r.self, r.total] for r in rows]
    assert data["unit"] == "nanoseconds" and data["kinds"] == ["kernel", "native", "python"]


def test_children_heaviest_first(tmp_path):
    profile = wall_profile(hz=100, start_ns=0)
    profile.add((READ, MAIN), ONE, [1])
    profile.add((WORK, MAIN), ONE, [9])
    write_flamegraph(profile, str(tmp_path / "out.html"))
    data = page_data(tmp_path / "out.html")
    names = [data["functions"][f][0] if f >= 0 else "all" for f in data["tree"][::4]]
    assert names == ["all", "main", "work", "ksys_read"]


def test_names_cannot_end_the_data_script(tmp_path):
    profile = wall_profile(hz=100, start_ns=0)
    evil = Frame(FrameKind.PYTHON, "</script><script>alert(1)</script><!--", None, 0, "x.py", 1, 1)
    profile.add((evil, MAIN), ONE, [1])
    path = tmp_path / "out.html"
    write_flamegraph(profile, str(path))
    page = path.read_text()
    assert "<script>alert" not in page
    assert page.count("</script>") == 2  # the data's and the code's own
    assert evil.name in [f[0] for f in page_data(path)["functions"]]


def test_deep_recursion(tmp_path):
    profile = wall_profile(hz=100, start_ns=0)
    profile.add((WORK,) * 5000 + (MAIN,), ONE, [1])
    write_flamegraph(profile, str(tmp_path / "out.html"))
    assert len(page_data(tmp_path / "out.html")["tree"]) == 4 * 5002


def test_diff_carries_base_totals_per_node_and_base_only_functions(tmp_path):
    old = Frame(FrameKind.NATIVE, "old", APP, 0x1300)
    base, new = cpu_profile(hz=100, start_ns=0), cpu_profile(hz=100, start_ns=0)
    base.add((WORK, MAIN), ONE, [40, 400])
    base.add((READ, MAIN), ONE, [40, 400])
    base.add((old, MAIN), ONE, [20, 200])
    new.add((WORK, MAIN), ONE, [120, 1200])
    new.add((READ, MAIN), ONE, [80, 800])
    write_diff_flamegraph(base, new, str(tmp_path / "diff.html"))
    data = page_data(tmp_path / "diff.html")
    tree = paths(data)
    assert tree == {(): (200, 0), ("main",): (200, 0), ("main", "work"): (120, 120),
                    ("main", "ksys_read"): (80, 80)}
    by_path = dict(zip(tree, data["base"]["tree"]))
    assert by_path == {(): 100, ("main",): 100, ("main", "work"): 40, ("main", "ksys_read"): 40}
    assert data["base"]["total"] == 100
    table = {f[0]: (f[3:], b) for f, b in zip(data["functions"], data["base"]["functions"])}
    assert table["old"] == ([0, 0], [20, 20])
    assert table["work"] == ([120, 120], [40, 40])


def test_summary_names_type_total_samples_stacks_and_duration():
    profile = wall_profile(hz=100, start_ns=0)
    profile.duration_ns = 2_000_000_000
    profile.add((WORK, MAIN), ONE, [1_500_000_000])
    profile.add((READ, MAIN), ONE, [500_000_000])
    profile.add((READ, MAIN), TWO, [1])
    assert summary(profile) == "wall: 2.00 s, 2 stacks, over 2.00 s"


def test_summary_of_blocking_names_delay_and_contentions():
    profile = block_profile(start_ns=0)
    profile.add((READ, MAIN), ONE, [3, 15_000_000])
    profile.add((READ, MAIN), TWO, [2, 5_000_000])
    assert summary(profile) == "delay: 20.00 ms, 5 contentions, 1 stack"
