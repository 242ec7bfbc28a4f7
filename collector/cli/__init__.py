"""The `bpfprof` command line, one module per command; main() is the one place that turns
errors into messages and exit codes."""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import click

from bpfprof.collector.cli import agent, check, record, report, top
from bpfprof.collector.errors import CollectorError, UsageError
from bpfprof.symbolizer.text import printable


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bpfprof")
def cli() -> None:
    """eBPF whole-system sampling profiler: kernel and native frames in one stack."""


for command in (record.record, report.report, top.top, agent.agent, check.check):
    cli.add_command(command)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: every error is one line on stderr and a non-zero exit."""
    try:
        code = cli.main(args=argv, prog_name="bpfprof", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.format_message())
        code = 2
    except click.ClickException as e:
        click.echo(f"bpfprof: {printable(e.format_message())}", err=True)
        code = e.exit_code
    except click.Abort:
        code = 130
    except UsageError as e:  # may name what a profiled process or a file holds: printed escaped
        click.echo(f"bpfprof: {printable(str(e))}", err=True)
        code = 2
    except CollectorError as e:
        click.echo(f"bpfprof: {printable(str(e))}", err=True)
        code = 1
    except BrokenPipeError:
        code = 1
    except Exception as e:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("BPFPROF_DEBUG"):
            raise
        click.echo(f"bpfprof: internal error: {type(e).__name__}: {printable(str(e))} (BPFPROF_DEBUG=1 shows where)",
                   err=True)
        code = 70
    sys.exit(code or 0)
