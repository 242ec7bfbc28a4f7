"""`bpfprof top`: the hottest functions, live."""

from __future__ import annotations

import sys

import click

from bpfprof.collector.cli.options import (MAX_FREQUENCY, make_recorder, map_size_options, memory_options, parse_pids,
                                           sampler_config)
from bpfprof.collector.errors import UsageError


@click.command()
@click.option("-a", "--all-cpus", "whole_system", is_flag=True, help="The whole system (the default).")
@click.option("-p", "--pid", "pid_args", multiple=True, metavar="PID",
              help="This process and its threads; repeatable, or comma-separated.")
@click.option("-F", "--frequency", "frequency", default=99, show_default=True,
              type=click.IntRange(1, MAX_FREQUENCY), help="Samples per second on each CPU.")
@click.option("-t", "--type", "profile_type", default="cpu", show_default=True,
              type=click.Choice(("cpu", "memory", "faults")),
              help="What to show: CPU time, memory in use (and allocated over the window), or page faults.")
@memory_options
@click.option("--window", default=5, show_default=True, type=click.IntRange(1, 3600), metavar="SECONDS",
              help="Show the last this many seconds.")
@click.option("--no-kernel", is_flag=True, help="Leave out kernel frames.")
@click.option("--no-python", is_flag=True, help="Leave out CPython frames.")
@map_size_options
def top(whole_system, pid_args, frequency, profile_type, fault_period, memory_ranges, window, no_kernel, no_python,
        stack_storage_size, map_size, dwarf, unwind_rows) -> None:
    """Live view of the functions using the most CPU (or memory), refreshed every second (q quits)."""
    from bpfprof.collector.output.top import LiveTop

    if whole_system and pid_args:
        raise UsageError("choose one target: -a or -p PID")
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("top needs a terminal; use record and report otherwise")
    pids = parse_pids(pid_args)
    types = (profile_type,)
    config = sampler_config(types, frequency, no_kernel, no_python, stack_storage_size, map_size, dwarf,
                             unwind_rows, pids, fault_period=fault_period, memory_ranges=memory_ranges)
    target = "PID " + ", ".join(map(str, pids)) if pids else "whole system"
    LiveTop(make_recorder(config, types), target, window, profile_type).run()
