"""`bpfprof agent`: continuous profiles, cut every interval, kept and pushed."""

from __future__ import annotations

import os
import socket

import click

from bpfprof.collector.agent.config import Duration, Size, load_config
from bpfprof.collector.cli.options import (MAX_FREQUENCY, PROFILE_TYPES, make_recorder, map_size_options,
                                           memory_options, min_block_option, sampler_config)
from bpfprof.collector.errors import UsageError

AGENT_EXAMPLES = """
\b
Examples:
  sudo bpfprof agent --output-dir /var/lib/bpfprof        # CPU profiles every 15 s, kept a day
  sudo BPFPROF_PUSH_TOKEN=... bpfprof agent --push-url https://pyroscope.example:4040 -t cpu -t block
  sudo bpfprof agent --config /etc/bpfprof/agent.yaml --metrics-addr 127.0.0.1:9464
"""


@click.command(epilog=AGENT_EXAMPLES)
@click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=load_config, metavar="FILE",
              help="YAML file of settings named as the long options (push-url: ...); flags win.")
@click.option("-F", "--frequency", default=19, show_default=True, type=click.IntRange(1, MAX_FREQUENCY),
              help="Samples per second on each CPU.")
@click.option("-t", "--type", "types", multiple=True, type=click.Choice(PROFILE_TYPES), metavar="TYPE",
              help="Profiles to make, repeatable: cpu (default), block, wall, memory, faults.")
@click.option("--interval", default="15s", show_default=True, type=Duration(),
              help="A profile is cut this often (e.g. 15s, 1m).")
@min_block_option
@memory_options
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
@map_size_options
def agent(frequency, types, interval, min_block, fault_period, memory_ranges, no_kernel, no_python, node, output_dir, retention_age,
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
    from bpfprof.collector.agent.service_manager import ServiceManager

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
    config = sampler_config(types, frequency, no_kernel, no_python, stack_storage_size, map_size, dwarf,
                             unwind_rows, min_block=min_block, fault_period=fault_period, memory_ranges=memory_ranges)
    recorder = make_recorder(config, types, warn=log.warning, on_oom=lambda *oom: runner.ship_oom(*oom))
    pods = PodMetadata.from_environment(node, kubelet_url or "", kubelet_insecure_tls=kubelet_insecure_tls)
    labeller = Labeller(node, pods, service_name_label or "")
    runner = Agent(recorder, interval, labeller, node, disk, queue, log_handler, ServiceManager())
    server = serve_metrics(metrics_addr, lambda: runner.stats) if metrics_addr else None
    try:
        runner.run()
    finally:
        if server is not None:
            server.shutdown()
