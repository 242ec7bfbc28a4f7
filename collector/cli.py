"""The `bpfprof` command line; the one place that turns errors into messages and exit codes."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from typing import Optional, Sequence, Tuple

import click

from bpfprof.collector.agent.config import Duration, Size, load_config
from bpfprof.collector.errors import CollectorError, UsageError

PROFILE_TYPES = ("cpu", "block", "wall")
MAX_FREQUENCY = 10_000  # perf's own default ceiling is lower; beyond this sampling is the load

LOSS_FIXES = {
    "LOSS_KERNEL_STACK_COLLISION": ("kernel stack collisions", "raise --stack-storage-size"),
    "LOSS_USER_STACK_COLLISION": ("user stack collisions", "raise --stack-storage-size"),
    "LOSS_KERNEL_STACK_FAILED": ("failed kernel stack reads", "raise --stack-storage-size"),
    "LOSS_USER_STACK_FAILED": ("failed user stack reads", "raise --stack-storage-size"),
    "LOSS_COUNTS_FULL": ("sample map full", "raise --map-size"),
    "LOSS_EVENTS_FULL": ("process events dropped", "use a lower -F"),
    "LOSS_TARGETS_FULL": ("child processes not followed", "raise --map-size"),
    "LOSS_PYTHON_STACKS_FULL": ("Python stack map full", "raise --stack-storage-size"),
    "LOSS_PYTHON_TRUNCATED": ("Python stacks deeper than 128 frames",
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
}
UNWIND_END_NAMES = {
    "UNWIND_COMPLETE": "complete", "UNWIND_FRAME_POINTER_END": "frame pointers",
    "UNWIND_TRUNCATED": "deeper than 127", "UNWIND_NO_MAPPING": "unmapped address",
    "UNWIND_UNSUPPORTED_RULE": "unsupported rule", "UNWIND_RBP_LOST": "RBP lost",
    "UNWIND_READ_FAILED": "stack unreadable", "UNWIND_FALLBACK": "not read yet (frame pointers)",
}

def _options(*decorators):
    """Several click options as one decorator, for options that commands share."""
    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function
    return apply


_map_size_options = _options(
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
_min_block_option = click.option("--min-block", default=1.0, show_default=True, type=click.FloatRange(0),
                                 metavar="MICROSECONDS", help="With -t block: leave out blocks shorter than this.")


def _sampler_config(types: Sequence[str], frequency: int, no_kernel: bool, no_python: bool,
                    stack_storage_size: int, map_size: int, dwarf: bool, unwind_rows: int,
                    pids: Tuple[int, ...] = (), follow_children=False, min_block: float = 1.0):
    """What the sampler must do to make the profiles of `types`."""
    from bpfprof.collector.sampler import SamplerConfig

    return SamplerConfig(
        frequency=frequency, pids=pids, follow_children=follow_children, kernel_stacks=not no_kernel,
        stack_storage_size=stack_storage_size, map_size=map_size, target_entries=map_size,
        python=not no_python, cpu="cpu" in types or "wall" in types, block="block" in types, wall="wall" in types,
        min_block_ns=int(min_block * 1000), native_unwind=dwarf, unwind_rows=unwind_rows,
    )


RECORD_EXAMPLES = """
\b
Examples:
  sudo bpfprof record -d 10                    # whole system for 10 s
  sudo bpfprof record -p 1234 -p 5678 -F 199   # two processes and their threads
  sudo bpfprof record -o out.folded -- make -j2  # a command and all it starts
  sudo bpfprof record -d 30 --top 20           # also print the top 20 functions
"""


def _parse_numbers(values: Sequence[str], option: str) -> Tuple[int, ...]:
    """Process IDs given as repeated and/or comma-separated values."""
    numbers = []
    for value in values:
        for part in value.split(","):
            if not part.strip().isdigit():
                raise UsageError(f"{option} takes process IDs, not {part!r}")
            numbers.append(int(part))
    return tuple(numbers)


def _parse_pids(values: Sequence[str]) -> Tuple[int, ...]:
    """Live processes' IDs."""
    pids = _parse_numbers(values, "-p")
    for pid in pids:
        if not os.path.exists(f"/proc/{pid}"):
            raise UsageError(f"no process with PID {pid}")
    return pids


def _unwind_summary(stats, ends) -> str:
    """One line: native stacks by how their unwinding ended, and the tables' memory."""
    total = sum(ends.values())
    how = ", ".join(f"{n} {UNWIND_END_NAMES[end]}" for end, n in sorted(ends.items(), key=lambda e: -e[1]) if n)
    return (f"native unwinding: {total} stacks ({how or 'none'}); tables: {stats.binaries} binaries, "
            f"{stats.rows_used} of {stats.rows_capacity} rows, {stats.processes} processes, "
            f"{stats.kernel_bytes / 2**20:.1f} MiB of kernel memory")


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


def _warn(message: str) -> None:
    click.echo(f"bpfprof: warning: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bpfprof")
def cli() -> None:
    """eBPF whole-system sampling profiler: kernel and native frames in one stack."""


@cli.command(epilog=RECORD_EXAMPLES, context_settings={"ignore_unknown_options": False})
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
                   "counted) or wall (on-CPU plus off-CPU time of each thread).")
@_min_block_option
@click.option("--no-kernel", is_flag=True, help="Leave out kernel frames.")
@click.option("--no-python", is_flag=True, help="Leave out CPython frames (native frames only).")
@click.option("--top", "top", default=0, type=click.IntRange(0), metavar="N",
              help="Also print the N functions with the most self time.")
@_map_size_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def record(whole_system, pid_args, frequency, duration, output, types, min_block, no_kernel, no_python, top,
           stack_storage_size, map_size, dwarf, unwind_rows, command) -> None:
    """Sample CPU stacks (and blocking delay) of the whole system, some processes, or a command."""
    from bpfprof.collector.functions import function_rows
    from bpfprof.collector.output import get_writer, path_for_type
    from bpfprof.collector.report import format_table

    if sum(map(bool, (whole_system, pid_args, command))) > 1:
        raise UsageError("choose one target: -a, -p PID, or -- COMMAND")
    pids = _parse_pids(pid_args)
    if command:
        _check_command(command)
    types = tuple(dict.fromkeys(types or ("cpu",)))
    output = output or _default_output(pids, command)
    outputs = {t: path_for_type(output, t) if len(types) > 1 else output for t in types}
    writers = {t: get_writer(path) for t, path in outputs.items()}
    config = _sampler_config(types, frequency, no_kernel, no_python, stack_storage_size, map_size, dwarf,
                             unwind_rows, pids, follow_children=bool(command), min_block=min_block)
    recorder = _recorder(config, types)

    def progress() -> None:
        if sys.stderr.isatty():
            click.echo(f"\rrecording: {sum(p.num_samples() for p in recorder.profiles.values())} samples",
                       err=True, nl=False)

    recording = recorder.run(duration, command, progress)
    if sys.stderr.isatty():
        click.echo("\r", err=True, nl=False)
    for t, path in outputs.items():
        _write(writers[t], path, recording.profiles[t])

    lost = sum(recording.losses.values())
    for t, path in outputs.items():
        profile = recording.profiles[t]
        seconds = profile.duration_ns / 1e9
        what = {"cpu": f"{profile.num_samples()} samples",
                "block": f"{profile.num_samples()} blocking events, {profile.total() / 1e9:.3f} s blocked",
                "wall": f"{profile.total() / 1e9:.3f} s of thread time"}[t]
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
    if recording.unreadable_processes:
        click.echo(f"bpfprof: {recording.unreadable_processes} processes exited before they could be read "
                   "(their samples are marked)", err=True)
    if recording.unreadable_binaries:
        path, why = next(iter(recording.unreadable_binaries.items()))
        click.echo(f"bpfprof: {len(recording.unreadable_binaries)} binaries could not be read, e.g. {path}: {why} "
                   "(their frames show module+offset)", err=True)
    if top:
        for t in types:
            profile = recording.profiles[t]
            click.echo(format_table(function_rows(profile)[:top], profile.total(), profile.main_type.unit,
                                    shutil.get_terminal_size((120, 24)).columns))
    if recording.exit_status is not None:
        status = recording.exit_status
        click.get_current_context().exit(status if status >= 0 else 128 - status)


REPORT_EXAMPLES = """
\b
Examples:
  bpfprof report out.pb.gz                       # functions by self time
  bpfprof report out.pb.gz --sort total --focus 'handle_'
  bpfprof report out.pb.gz -o out.html           # flame graph and table in one page
  bpfprof report --diff before.pb.gz after.pb.gz -o diff.html
"""


@cli.command(epilog=REPORT_EXAMPLES)
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
    from bpfprof.collector.functions import diff_rows, function_rows, narrow
    from bpfprof.collector.output import get_writer
    from bpfprof.collector.pprof import load_profile
    from bpfprof.collector.report import format_diff_table, format_table

    if len(files) != (2 if diff else 1):
        raise UsageError("--diff takes two files, BASE and NEW" if diff else "report takes one file (or --diff BASE NEW)")
    pids = _parse_numbers(pid_args, "--pid")
    profiles = [narrow(load_profile(f), pids, focus, sample_type) for f in files]
    width = shutil.get_terminal_size((120, 24)).columns
    if diff:
        base, new = profiles
        if output:
            from bpfprof.collector.flamegraph import write_diff_flamegraph
            if not output.endswith(".html"):
                raise UsageError("--diff writes .html only")
            get_writer(output)
            _write(write_diff_flamegraph, output, base, new)
            return
        rows = diff_rows(base, new)
        if sort == "total":
            rows.sort(key=lambda r: -abs(r.change("total")))
        click.echo(format_diff_table(rows[:limit or None], width))
        return
    profile, = profiles
    if output:
        _write(get_writer(output), output, profile)
        return
    rows = function_rows(profile)
    if sort == "total":
        rows.sort(key=lambda r: (-r.total, -r.self))
    click.echo(format_table(rows[:limit or None], profile.total(), profile.main_type.unit, width))


def _recorder(config, types: Sequence[str], warn=_warn):
    """A Recorder, once the machine is known to be able to run it."""
    from bpfprof.collector.check import has_privileges, mount_tracefs, require_kernel_support
    from bpfprof.collector.kernel_headers import find_kernel_headers
    from bpfprof.collector.recorder import Recorder

    if not has_privileges():
        raise UsageError("profiling needs root: run it with sudo (or grant CAP_BPF and CAP_PERFMON)")
    require_kernel_support()
    mount_tracefs()
    return Recorder(config, find_kernel_headers(), warn, types)


def _write(writer, path: str, *profiles) -> None:
    try:
        writer(*profiles, path)
    except OSError as e:
        raise CollectorError(f"cannot write {path}: {e.strerror or e}") from e


@cli.command()
@click.option("-a", "--all-cpus", "whole_system", is_flag=True, help="The whole system (the default).")
@click.option("-p", "--pid", "pid_args", multiple=True, metavar="PID",
              help="This process and its threads; repeatable, or comma-separated.")
@click.option("-F", "--frequency", "frequency", default=99, show_default=True,
              type=click.IntRange(1, MAX_FREQUENCY), help="Samples per second on each CPU.")
@click.option("--window", default=5, show_default=True, type=click.IntRange(1, 3600), metavar="SECONDS",
              help="Show the last this many seconds.")
@click.option("--no-kernel", is_flag=True, help="Leave out kernel frames.")
@click.option("--no-python", is_flag=True, help="Leave out CPython frames.")
@_map_size_options
def top(whole_system, pid_args, frequency, window, no_kernel, no_python, stack_storage_size, map_size, dwarf,
        unwind_rows) -> None:
    """Live view of the functions using the most CPU, refreshed every second (q quits)."""
    from bpfprof.collector.top import LiveTop

    if whole_system and pid_args:
        raise UsageError("choose one target: -a or -p PID")
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("top needs a terminal; use record and report otherwise")
    pids = _parse_pids(pid_args)
    config = _sampler_config(("cpu",), frequency, no_kernel, no_python, stack_storage_size, map_size, dwarf,
                             unwind_rows, pids)
    target = "PID " + ", ".join(map(str, pids)) if pids else "whole system"
    LiveTop(_recorder(config, ("cpu",)), target, window).run()


AGENT_EXAMPLES = """
\b
Examples:
  sudo bpfprof agent --output-dir /var/lib/bpfprof        # CPU profiles every 15 s, kept a day
  sudo BPFPROF_PUSH_TOKEN=... bpfprof agent --push-url https://pyroscope.example:4040 -t cpu -t block
  sudo bpfprof agent --config /etc/bpfprof/agent.yaml --metrics-addr 127.0.0.1:9464
"""


@cli.command(epilog=AGENT_EXAMPLES)
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=load_config, metavar="FILE",
              help="YAML file of settings named as the long options (push-url: ...); flags win.")
@click.option("-F", "--frequency", default=19, show_default=True, type=click.IntRange(1, MAX_FREQUENCY),
              help="Samples per second on each CPU.")
@click.option("-t", "--type", "types", multiple=True, type=click.Choice(PROFILE_TYPES), metavar="TYPE",
              help="Profiles to make, repeatable: cpu (default), block, wall.")
@click.option("--interval", default="15s", show_default=True, type=Duration(),
              help="A profile is cut this often (e.g. 15s, 1m).")
@_min_block_option
@click.option("--no-kernel", is_flag=True, help="Leave out kernel frames.")
@click.option("--no-python", is_flag=True, help="Leave out CPython frames.")
@click.option("--node", default=lambda: os.environ.get("NODE_NAME") or socket.gethostname(),
              show_default="$NODE_NAME, else the host name", help="The node label of every sample.")
@click.option("--output-dir", metavar="DIR", help="Keep one pprof per interval and type here.")
@click.option("--retention-age", default="24h", show_default=True, type=Duration(),
              help="Remove profiles in --output-dir older than this.")
@click.option("--retention-size", default="1GiB", show_default=True, type=Size(),
              help="Remove the oldest profiles while --output-dir holds more than this.")
@click.option("--push-url", metavar="URL", help="Push to this Pyroscope (its base URL).")
@click.option("--push-tenant", metavar="ID", help="Tenant (X-Scope-OrgID) to push as.")
@click.option("--push-username-file", metavar="FILE", help="Basic-auth user (or $BPFPROF_PUSH_USERNAME).")
@click.option("--push-password-file", metavar="FILE", help="Basic-auth password (or $BPFPROF_PUSH_PASSWORD).")
@click.option("--push-token-file", metavar="FILE", help="Bearer token (or $BPFPROF_PUSH_TOKEN).")
@click.option("--push-ca-file", metavar="FILE", help="CA certificates to verify the store with.")
@click.option("--push-insecure-skip-verify", is_flag=True, help="Do not verify the store's TLS certificate.")
@click.option("--push-queue", default=60, show_default=True, type=click.IntRange(1, 100_000), metavar="N",
              help="Intervals kept while the store is unreachable; the oldest go first.")
@click.option("--metrics-addr", metavar="HOST:PORT", help="Serve Prometheus metrics here.")
@click.option("--log-file", metavar="FILE", help="Log here (JSON lines) instead of stderr; SIGHUP reopens it.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--service-name-label", metavar="KEY", help="Pod label that names the service.")
@click.option("--kubelet-url", metavar="URL",
              help="Read pods from this kubelet (default: the API server, with the mounted service account).")
@click.option("--kubelet-insecure-tls", is_flag=True,
              help="Do not verify the kubelet's certificate (most kubelets sign their own).")
@_map_size_options
def agent(frequency, types, interval, min_block, no_kernel, no_python, node, output_dir, retention_age,
          retention_size, push_url, push_tenant, push_username_file, push_password_file, push_token_file,
          push_ca_file, push_insecure_skip_verify, push_queue, metrics_addr, log_file, log_level,
          service_name_label, kubelet_url, kubelet_insecure_tls, stack_storage_size, map_size, dwarf,
          unwind_rows) -> None:
    """Profile continuously: a labelled profile every interval, kept on disk and/or pushed to Pyroscope."""
    if not (output_dir or push_url):
        raise UsageError("the agent needs somewhere to put profiles: --output-dir DIR and/or --push-url URL")
    if interval < 1:
        raise UsageError("--interval must be at least 1s (profiles are drained every second)")

    from bpfprof.collector.agent.agent import Agent, tune_malloc
    from bpfprof.collector.agent.disk_sink import DiskSink
    from bpfprof.collector.agent.kubernetes import PodMetadata
    from bpfprof.collector.agent.labels import Labeller
    from bpfprof.collector.agent.logs import log, setup_logging
    from bpfprof.collector.agent.metrics import serve_metrics
    from bpfprof.collector.agent.push_queue import PushQueue
    from bpfprof.collector.agent.pyroscope import Credentials, PushClient

    tune_malloc()
    types = tuple(dict.fromkeys(types or ("cpu",)))
    try:
        log_handler = setup_logging(log_file, log_level)
    except OSError as e:
        raise UsageError(f"cannot open --log-file {log_file}: {e.strerror or e}") from None
    disk = DiskSink(output_dir, retention_age, retention_size) if output_dir else None
    queue = None
    if push_url:
        credentials = Credentials.load(push_username_file or "", push_password_file or "", push_token_file or "")
        client = PushClient(push_url, credentials, push_tenant or "", push_ca_file or "",
                            verify_tls=not push_insecure_skip_verify)
        queue = PushQueue(client.push, push_queue)
    config = _sampler_config(types, frequency, no_kernel, no_python, stack_storage_size, map_size, dwarf,
                             unwind_rows, min_block=min_block)
    recorder = _recorder(config, types, warn=log.warning)
    pods = PodMetadata.from_environment(node, kubelet_url or "", kubelet_insecure_tls=kubelet_insecure_tls)
    labeller = Labeller(node, pods, service_name_label or "")
    runner = Agent(recorder, interval, labeller, node, disk, queue, log_handler)
    server = serve_metrics(metrics_addr, lambda: runner.stats) if metrics_addr else None
    try:
        runner.run()
    finally:
        if server is not None:
            server.shutdown()


@cli.command()
def check() -> None:
    """Say what profiling needs and whether this machine has it."""
    from bpfprof.collector.check import run_checks

    results = run_checks()
    for c in results:
        mark = "ok  " if c.ok else "FAIL"
        click.echo(f"{mark} {c.name:<15} {c.detail}")
        if not c.ok:
            click.echo(f"     fix: {c.fix}")
    if not all(c.ok for c in results):
        click.get_current_context().exit(1)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point: every error is one line on stderr and a non-zero exit."""
    try:
        code = cli.main(args=argv, prog_name="bpfprof", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.format_message())
        code = 2
    except click.ClickException as e:
        click.echo(f"bpfprof: {e.format_message()}", err=True)
        code = e.exit_code
    except click.Abort:
        code = 130
    except UsageError as e:
        click.echo(f"bpfprof: {e}", err=True)
        code = 2
    except CollectorError as e:
        click.echo(f"bpfprof: {e}", err=True)
        code = 1
    except BrokenPipeError:
        code = 1
    except Exception as e:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("BPFPROF_DEBUG"):
            raise
        click.echo(f"bpfprof: internal error: {type(e).__name__}: {e} (BPFPROF_DEBUG=1 shows where)", err=True)
        code = 70
    sys.exit(code or 0)
