"""Every reason the BPF program counts losses under has its line in record's summary."""

from bpfprof.collector.cli.record import LOSS_FIXES
from bpfprof.collector.probe.sampler import LOSS_REASONS


def test_every_loss_reason_has_a_summary_line():
    assert set(LOSS_FIXES) == set(LOSS_REASONS)
