"""Folded stacks: root first, process name as the root frame, kernel frames marked."""

from bpfprof.collector.output.folded import write_folded
from bpfprof.collector.profile import Labels, cpu_profile
from bpfprof.symbolizer.frames import Frame, FrameKind, Module

APP = Module("/usr/bin/app")
MAIN = Frame(FrameKind.NATIVE, "main", APP, 0x10)
WORK = Frame(FrameKind.NATIVE, "ns::work<a;b>", APP, 0x20)
WRITE = Frame(FrameKind.KERNEL, "ksys_write", Module("[kernel.kallsyms]"), 0xFFFF0000)
CALC = Frame(FrameKind.PYTHON, "Handler.calc3", None, 0, "/srv/app.py", 41)


def test_folded_lines(tmp_path):
    profile = cpu_profile(hz=99, start_ns=0)
    profile.add((WRITE, WORK, MAIN), Labels(1, 1, "app", "app"), [4, 0])
    profile.add((WRITE, WORK, MAIN), Labels(1, 2, "app", "io"), [1, 0])  # same stack, other thread
    profile.add((CALC, MAIN), Labels(2, 2, "python3", "python3"), [2, 0])
    path = tmp_path / "out.folded"
    write_folded(profile, str(path))
    assert path.read_text().splitlines() == [
        "app;main;ns::work<a:b>;ksys_write_[k] 5",
        "python3;main;Handler.calc3 (app.py) 2",
    ]


def test_names_cannot_forge_lines_or_reach_a_terminal(tmp_path):
    """A comm or a name holding a newline, a carriage return or a terminal escape stays
    inside its own field of its own line."""
    profile = cpu_profile(hz=99, start_ns=0)
    forged = Frame(FrameKind.NATIVE, "evil\r\x1b[2J\u202e", APP, 0x30)
    profile.add((forged, MAIN), Labels(3, 3, "a 99999999\nb", "t"), [1, 0])
    path = tmp_path / "out.folded"
    write_folded(profile, str(path))
    assert path.read_text() == "a 99999999\\x0ab;main;evil\\x0d\\x1b[2J\\u202e 1\n"
