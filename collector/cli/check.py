"""`bpfprof check`: what profiling needs, and whether this machine has it."""

from __future__ import annotations

import click


@click.command()
def check() -> None:
    """Say what profiling needs and whether this machine has it."""
    from bpfprof.collector.probe.check import run_checks

    results = run_checks()
    for c in results:
        mark = "ok  " if c.ok else "FAIL"
        click.echo(f"{mark} {c.name:<15} {c.detail}")
        if not c.ok:
            click.echo(f"     fix: {c.fix}")
    if not all(c.ok for c in results):
        click.get_current_context().exit(1)
