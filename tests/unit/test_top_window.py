"""top's window of drains: flows (CPU time, allocations) add up over it, memory in use is
as the last drain left it."""

from bpfprof.collector.output.top import Window
from bpfprof.collector.profile import Labels, cpu_profile, memory_profile
from bpfprof.symbolizer.frames import Frame, FrameKind

STACK = (Frame(FrameKind.NATIVE, "hold_buffers"),)
LABELS = Labels(1, 1, "app", "app")


def test_memory_in_use_is_the_last_drains_and_allocations_add_up():
    window = Window(3)
    for allocated, held in ((4, 40), (2, 60), (0, 20)):
        profile = memory_profile(0)
        profile.add(STACK, LABELS, [allocated, allocated << 20, held, held << 20])
        window.add(profile)
    assert window.merged().samples == {(STACK, LABELS): [6, 6 << 20, 20, 20 << 20]}


def test_cpu_time_adds_up():
    window = Window(2)
    for samples in (3, 5, 7):
        profile = cpu_profile(100, 0)
        profile.add(STACK, LABELS, [samples, samples * 10_000_000])
        window.add(profile)
    assert window.merged().samples == {(STACK, LABELS): [12, 120_000_000]}
