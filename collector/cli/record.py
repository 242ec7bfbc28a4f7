"""`bpfprof record`: one recording, written to files, with what was lost and why."""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Sequence, Tuple

import click

from bpfprof.collector.cli.options import (MAX_FREQUENCY, PROFILE_TYPES, make_recorder, map_size_options,
                                           memory_options, min_block_option, parse_pids, sampler_config, write_output)
from bpfprof.collector.errors import CollectorError, UsageError
from bpfprof.collector.output.units import format_value
from bpfprof.collector.probe.sampler import NATIVE_STACK_DEPTH
from bpfprof.symbolizer.text import printable
from bpfprof.symbolizer.interpreters.python.threads import STACK_DEPTH as PYTHON_STACK_DEPTH

LOSS_FIXES = {
    "LOSS_KERNEL_STACK_COLLISION": ("kernel stack collisions", "raise --stack-storage-size"),
    "LOSS_USER_STACK_COLLISION": ("user stack collisions", "raise --stack-storage-size"),
    "LOSS_KERNEL_STACK_FAILED": ("failed kernel stack reads", "raise --stack-storage-size"),
    "LOSS_USER_STACK_FAILED": ("failed user stack reads", "raise --stack-storage-size"),
    "LOSS_COUNTS_FULL": ("sample map full", "raise --map-size"),
    "LOSS_EVENTS_FULL": ("process events dropped", "use a lower -F"),
    "LOSS_TARGETS_FULL": ("child processes not followed", "raise --map-size"),
    "LOSS_PYTHON_STACKS_FULL": ("Python stack map full", "raise --stack-storage-size"),
    "LOSS_PYTHON_TRUNCATED": (f"Python stacks deeper than {PYTHON_STACK_DEPTH} frames",
                              "their root-most frames are left out, the rest is kept"),
    "LOSS_PYTHON_EVENTS_FULL": ("Python stacks not sent at once",
                                "frames of a process that exited before the next drain may be unnamed"),
    "LOSS_OFFCPU_THREADS_FULL": ("blocked threads not followed", "raise --map-size"),
    "LOSS_BLOCK_FULL": ("blocking events, block map full", "raise --map-size or --min-block"),
    "LOSS_WALL_FULL": ("off-CPU time, wall map full", "raise --map-size"),
    "LOSS_OFFCPU_STACK_COLLISION": ("blocking stacks, stack collisions", "raise --stack-storage-size"),
    "LOSS_NATIVE_STACKS_FULL": ("native stacks, stack map full (frame pointers stood in)",
                                "raise --stack-storage-size"),
    "LOSS_OFFCPU_RETURN_UNTRACED": ("off-CPU intervals whose end the kernel did not trace",
                                    "none: those threads' time away is left out"),
    "LOSS_MEMORY_RANGES_FULL": ("memory ranges, range map full", "raise --memory-ranges"),
    "LOSS_ALLOC_FULL": ("allocations, allocation map full", "raise --map-size"),
    "LOSS_MEMORY_STACK_COLLISION": ("memory stacks, stack collisions", "raise --stack-storage-size"),
    "LOSS_MEMORY_CALLS_FULL": ("memory calls not followed", "raise --map-size"),
    "LOSS_MEMORY_HOLES_FULL": ("unmappings not applied, hole map full", "raise --memory-ranges"),
    "LOSS_FAULTS_FULL": ("page faults, fault map full", "raise --map-size or --fault-period"),
}
UNWIND_END_NAMES = {
    "UNWIND_COMPLETE": "complete", "UNWIND_FRAME_POINTER_END": "frame pointers",
    "UNWIND_TRUNCATED": f"deeper than {NATIVE_STACK_DEPTH}", "UNWIND_NO_MAPPING": "unmapped address",
    "UNWIND_UNSUPPORTED_RULE": "unsupported rule", "UNWIND_RBP_LOST": "RBP lost",
    "UNWIND_READ_FAILED": "stack unreadable", "UNWIND_FALLBACK": "not read yet (frame pointers)",
}

# What failed at each containment boundary (symbolizer.containment), as the summary counts them.
_FAILED = {"binary": "failures reading binaries", "process": "failures reading processes",
           "code object": "Python code objects left unnamed", "sample": "samples left out",
           "thread": "worker thread failures"}

RECORD_EXAMPLES = """
\b
Examples:
  sudo bpfprof record -d 10                    # whole system for 10 s
  sudo bpfprof record -p 1234 -p 5678 -F 199   # two processes and their threads
  sudo bpfprof record -o out.folded -- make -j2  # a command and all it starts
  sudo bpfprof record -d 30 --top 20           # also print the top 20 functions
"""


def _unwind_summary(stats, ends) -> str:
    """One line: native stacks by how their unwinding ended, and the tables' memory."""
    total = sum(ends.values())
    how = ", ".join(f"{n} {UNWIND_END_NAMES[end]}" for end, n in sorted(ends.items(), key=lambda e: -e[1]) if n)
    return (f"native unwinding: {total} stacks ({how or 'none'}); tables: {stats.binaries} binaries, "
            f"{stats.rows_used} of {stats.rows_capacity} rows, {stats.processes} processes, "
            f"{stats.kernel_bytes / 2**20:.1f} MiB of kernel memory")


def _sum(profile, index: int, unit: str = "bytes") -> str:
    return format_value(sum(values[index] for values in profile.samples.values()), unit)


def _write_oom(output: str, pid: int, comm: str, profile) -> None:
    """The memory a process the OOM killer chose held, beside the output, at once."""
    from bpfprof.collector.output.pprof import write_pprof
    from bpfprof.collector.output.writers import split_extension

    path = f"{split_extension(output)[0]}.oom-{pid}.memory.pb.gz"
    write_output(write_pprof, path, profile)
    click.echo(f"bpfprof: the OOM killer chose {pid} ({printable(comm)}): its memory in use -> {path}", err=True)


def _check_command(command: Sequence[str]) -> None:
    if shutil.which(command[0]) is None:
        raise UsageError(f"command not found: {command[0]}")


def _default_output(pids: Tuple[int, ...], command: Sequence[str]) -> str:
    if command:
        target = os.path.basename(command[0])
    elif pids:
        target = "pid" + "-".join(map(str, pids))
    else:
        target = "all"
    return f"bpfprof-{target}-{time.strftime('%Y%m%d-%H%M%S')}.pb.gz"


@click.command(epilog=RECORD_EXAMPLES, context_settings={"ignore_unknown_options": False})
@click.option("-a", "--all-cpus", "whole_system", is_flag=True, help="Profile the whole system (the default).")
@click.option("-p", "--pid", "pid_args", multiple=True, metavar="PID",
              help="Profile this process and its threads; repeatable, or comma-separated.")
@click.option("-F", "-r", "--rate", "--frequency", "frequency", default=99, show_default=True,
              type=click.IntRange(1, MAX_FREQUENCY), help="Samples per second on each CPU.")
@click.option("-d", "--duration", type=click.FloatRange(0, min_open=True), metavar="SECONDS",
              help="Stop after sampling this long (default: Ctrl-C, or when the command or processes exit).")
@click.option("-o", "--output", metavar="FILE",
              help="Where to write: .pb.gz (pprof) or .folded; with several -t, one file per type (out.cpu.pb.gz).")
@click.option("-t", "--type", "types", multiple=True, type=click.Choice(PROFILE_TYPES), metavar="TYPE",
              help="What to record, repeatable: cpu (default), block (time blocked off-CPU, every event "
                   "counted), wall (on-CPU plus off-CPU time of each thread), memory (anonymous memory "
                   "obtained from the kernel and held) or faults (page faults: where resident memory grows).")
@min_block_option
@memory_options
@click.option("--no-kernel", is_flag=True, help="Leave out kernel frames.")
@click.option("--no-python", is_flag=True, help="Leave out CPython frames (native frames only).")
@click.option("--top", "top", default=0, type=click.IntRange(0), metavar="N",
              help="Also print the N functions with the most self time.")
@map_size_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def record(whole_system, pid_args, frequency, duration, output, types, min_block, fault_period, memory_ranges,
           no_kernel, no_python, top, stack_storage_size, map_size, dwarf, unwind_rows, command) -> None:
    """Sample CPU stacks (blocking delay, memory) of the whole system, some processes, or a command."""
    from bpfprof.collector.output.functions import function_rows
    from bpfprof.collector.output.writers import get_writer, path_for_type
    from bpfprof.collector.output.report import format_table

    if sum(map(bool, (whole_system, pid_args, command))) > 1:
        raise UsageError("choose one target: -a, -p PID, or -- COMMAND")
    pids = parse_pids(pid_args)
    if command:
        _check_command(command)
    types = tuple(dict.fromkeys(types or ("cpu",)))
    output = output or _default_output(pids, command)
    outputs = {t: path_for_type(output, t) if len(types) > 1 else output for t in types}
    writers = {t: get_writer(path) for t, path in outputs.items()}
    config = sampler_config(types, frequency, no_kernel, no_python, stack_storage_size, map_size, dwarf,
                             unwind_rows, pids, follow_children=bool(command), min_block=min_block,
                             fault_period=fault_period, memory_ranges=memory_ranges)
    recorder = make_recorder(config, types, on_oom=lambda pid, comm, profile: _write_oom(output, pid, comm, profile))

    def progress() -> None:
        if sys.stderr.isatty():
            click.echo(f"\rrecording: {sum(p.num_samples() for p in recorder.profiles.values())} samples",
                       err=True, nl=False)

    recording = recorder.run(duration, command, progress)
    if sys.stderr.isatty():
        click.echo("\r", err=True, nl=False)
    for t, path in outputs.items():
        write_output(writers[t], path, recording.profiles[t])

    lost = sum(recording.losses.values())
    for t, path in outputs.items():
        profile = recording.profiles[t]
        seconds = profile.duration_ns / 1e9
        what = {"cpu": lambda: f"{profile.num_samples()} samples",
                "block": lambda: f"{profile.num_samples()} blocking events, {profile.total() / 1e9:.3f} s blocked",
                "wall": lambda: f"{profile.total() / 1e9:.3f} s of thread time",
                "memory": lambda: (f"{profile.num_samples()} allocations of {_sum(profile, 1)}, "
                                   f"{_sum(profile, 3)} in use at the end"),
                "faults": lambda: f"{_sum(profile, 0, 'count')} page faults, {_sum(profile, 1)}"}[t]()
        click.echo(f"bpfprof: {what}, {lost} lost, {recording.num_processes} processes, {seconds:.1f} s -> {path}",
                   err=True)
    if "block" in types:
        click.echo(f"bpfprof: {recording.offcpu['OFFCPU_BLOCKED']} times a thread blocked, "
                   f"{recording.offcpu['OFFCPU_BELOW_MIN']} shorter than --min-block left out", err=True)
    for reason, n in recording.losses.items():
        what, fix = LOSS_FIXES[reason]
        click.echo(f"bpfprof: lost {n} to {what}: {fix}", err=True)
    if recording.unwind is not None:
        click.echo(f"bpfprof: {_unwind_summary(recording.unwind, recording.unwind_ends)}", err=True)
    if recording.task_reads[0]:
        reads, tasks = recording.task_reads
        seconds = recording.profiles["wall"].duration_ns / 1e9
        click.echo(f"bpfprof: asyncio tasks read {reads} times ({reads / seconds:.1f}/s), "
                   f"{tasks} awaiting tasks seen ({tasks / seconds:.0f}/s)", err=True)
    if recording.unreadable_processes:
        click.echo(f"bpfprof: {recording.unreadable_processes} processes exited before they could be read "
                   "(their samples are marked)", err=True)
    for (boundary, reason), n in sorted(recording.failures.items()):
        click.echo(f"bpfprof: {n} {_FAILED[boundary]} ({reason}), e.g. "
                   f"{recording.failure_examples[(boundary, reason)]}", err=True)
    if top:
        for t in types:
            profile = recording.profiles[t]
            click.echo(format_table(function_rows(profile)[:top], profile.total(), profile.main_type.unit,
                                    shutil.get_terminal_size((120, 24)).columns))
    if recording.dead_thread:
        raise CollectorError(f"recording ended early, a worker thread failed ({recording.dead_thread}); "
                             f"what was collected is in {', '.join(outputs.values())}")
    if recording.exit_status is not None:
        status = recording.exit_status
        click.get_current_context().exit(status if status >= 0 else 128 - status)
