"""What the commands share: option groups, the sampler's settings from them, process IDs,
the recorder, and writing an output file."""

from __future__ import annotations

import os
from typing import Sequence, Tuple

import click

from bpfprof.collector.errors import CollectorError, UsageError
from bpfprof.symbolizer.text import printable

PROFILE_TYPES = ("cpu", "block", "wall", "memory", "faults")
MAX_FREQUENCY = 10_000  # perf's own default ceiling is lower; beyond this sampling is the load


def options(*decorators):
    """Several click options as one decorator, for options that commands share."""
    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function
    return apply


map_size_options = options(
    click.option("--stack-storage-size", default=16384, show_default=True, type=click.IntRange(64, 1 << 20),
                 help="Distinct stacks kept per drain interval."),
    click.option("--map-size", default=65536, show_default=True, type=click.IntRange(64, 1 << 22),
                 help="Distinct (thread, stack) keys per drain interval, and followed processes."),
    click.option("--dwarf/--no-dwarf", default=True, show_default=True,
                 help="Unwind native stacks from .eh_frame unwind tables in BPF (code without frame "
                      "pointers); --no-dwarf follows frame pointers only."),
    click.option("--unwind-rows", default=1 << 21, show_default=True, type=click.IntRange(1024, 1 << 28),
                 help="Unwind table rows held in the kernel for all binaries at once (8 bytes each)."),
)
memory_options = options(
    click.option("--fault-period", default=64, show_default=True, type=click.IntRange(1, 1 << 20), metavar="N",
                 help="With -t faults: count 1 page fault in N, at random, as N."),
    click.option("--memory-ranges", default=65536, show_default=True, type=click.IntRange(64, 1 << 22),
                 help="With -t memory: ranges of memory held at once, of every process."),
)
min_block_option = click.option("--min-block", default=1.0, show_default=True, type=click.FloatRange(0),
                                 metavar="MICROSECONDS", help="With -t block: leave out blocks shorter than this.")


def sampler_config(types: Sequence[str], frequency: int, no_kernel: bool, no_python: bool,
                    stack_storage_size: int, map_size: int, dwarf: bool, unwind_rows: int,
                    pids: Tuple[int, ...] = (), follow_children=False, min_block: float = 1.0,
                    fault_period: int = 64, memory_ranges: int = 65536):
    """What the sampler must do to make the profiles of `types`."""
    from bpfprof.collector.probe.sampler import SamplerConfig

    return SamplerConfig(
        frequency=frequency, pids=pids, follow_children=follow_children, kernel_stacks=not no_kernel,
        stack_storage_size=stack_storage_size, map_size=map_size, target_entries=map_size,
        python=not no_python, cpu="cpu" in types or "wall" in types, block="block" in types, wall="wall" in types,
        min_block_ns=int(min_block * 1000), native_unwind=dwarf, unwind_rows=unwind_rows,
        memory="memory" in types, memory_ranges=memory_ranges, faults="faults" in types, fault_period=fault_period,
    )


def parse_numbers(values: Sequence[str], option: str) -> Tuple[int, ...]:
    """Process IDs given as repeated and/or comma-separated values."""
    numbers = []
    for value in values:
        for part in value.split(","):
            if not part.strip().isdigit():
                raise UsageError(f"{option} takes process IDs, not {part!r}")
            numbers.append(int(part))
    return tuple(numbers)


def parse_pids(values: Sequence[str]) -> Tuple[int, ...]:
    """Live processes' IDs."""
    pids = parse_numbers(values, "-p")
    for pid in pids:
        if not os.path.exists(f"/proc/{pid}"):
            raise UsageError(f"no process with PID {pid}")
    return pids


def warn(message: str) -> None:
    click.echo(f"bpfprof: warning: {printable(message)}", err=True)


def make_recorder(config, types: Sequence[str], warn=warn, on_oom=lambda *_: None):
    """A Recorder, once the machine is known to be able to run it."""
    from bpfprof.collector.probe.check import has_privileges, mount_tracefs, require_kernel_support
    from bpfprof.collector.probe.kernel_headers import find_kernel_headers
    from bpfprof.collector.pipeline.recorder import Recorder
    from bpfprof.collector.probe.sampler import Sampler

    if not has_privileges():
        raise UsageError("profiling needs root: run it with sudo (or grant CAP_BPF and CAP_PERFMON)")
    require_kernel_support()
    mount_tracefs()
    return Recorder(Sampler(config, find_kernel_headers()), warn, types, on_oom)


def write_output(writer, path: str, *profiles) -> None:
    try:
        writer(*profiles, path)
    except OSError as e:
        raise CollectorError(f"cannot write {path}: {e.strerror or e}") from e
