"""`bpfprof report`: a profile as a table, converted, or two compared."""

from __future__ import annotations

import shutil

import click

from bpfprof.collector.cli.options import parse_numbers, write_output
from bpfprof.collector.errors import UsageError

REPORT_EXAMPLES = """
\b
Examples:
  bpfprof report out.pb.gz                       # functions by self time
  bpfprof report out.pb.gz --sort total --focus 'handle_'
  bpfprof report out.pb.gz -o out.html           # flame graph and table in one page
  bpfprof report --diff before.pb.gz after.pb.gz -o diff.html
"""


@click.command(epilog=REPORT_EXAMPLES)
@click.argument("files", nargs=-1, required=True, metavar="FILE")
@click.option("--diff", is_flag=True, help="Compare two profiles: FILE is BASE NEW.")
@click.option("--sort", type=click.Choice(["self", "total"]), default="self", show_default=True,
              help="Order of the table.")
@click.option("--limit", default=30, show_default=True, type=click.IntRange(0), metavar="N",
              help="Rows of the table (0: all).")
@click.option("--type", "sample_type", metavar="SAMPLE_TYPE",
              help="Which value to show, e.g. cpu, samples, delay (default: the profile's default).")
@click.option("--pid", "pid_args", multiple=True, metavar="PID", help="Only these processes; repeatable.")
@click.option("--focus", metavar="REGEX", help="Only stacks with a function matching this.")
@click.option("-o", "--output", metavar="FILE",
              help="Write instead of printing: .html (flame graph and table), .speedscope.json, .pb.gz, .folded.")
def report(files, diff, sort, limit, sample_type, pid_args, focus, output) -> None:
    """Print a profile's functions as a table, or write it as HTML and other formats."""
    from bpfprof.collector.output.functions import diff_rows, function_rows, narrow
    from bpfprof.collector.output.writers import get_writer
    from bpfprof.collector.output.pprof import load_profile
    from bpfprof.collector.output.report import format_diff_table, format_table

    if len(files) != (2 if diff else 1):
        raise UsageError("--diff takes two files, BASE and NEW" if diff else "report takes one file (or --diff BASE NEW)")
    pids = parse_numbers(pid_args, "--pid")
    profiles = [narrow(load_profile(f), pids, focus, sample_type) for f in files]
    width = shutil.get_terminal_size((120, 24)).columns
    if diff:
        base, new = profiles
        if output:
            from bpfprof.collector.output.flamegraph import write_diff_flamegraph
            if not output.endswith(".html"):
                raise UsageError("--diff writes .html only")
            get_writer(output)
            write_output(write_diff_flamegraph, output, base, new)
            return
        rows = diff_rows(base, new)
        if sort == "total":
            rows.sort(key=lambda r: -abs(r.change("total")))
        click.echo(format_diff_table(rows[:limit or None], width))
        return
    profile, = profiles
    if output:
        write_output(get_writer(output), output, profile)
        return
    rows = function_rows(profile)
    if sort == "total":
        rows.sort(key=lambda r: (-r.total, -r.self))
    click.echo(format_table(rows[:limit or None], profile.total(), profile.main_type.unit, width))
