"""The agent's own metrics, served for Prometheus on --metrics-addr."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Tuple

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from bpfprof.collector.errors import CollectorError, UsageError


@dataclass
class AgentStats:
    """What the agent has done so far; the sampling thread replaces it whole, the metrics
    thread reads it."""

    samples: Dict[str, int] = field(default_factory=dict)  # profile type -> samples (or blocking events)
    lost: Dict[str, int] = field(default_factory=dict)  # reason -> samples or events lost
    # (boundary, reason) -> failures contained reading binaries, processes, code objects, samples
    failures: Dict[Tuple[str, str], int] = field(default_factory=dict)
    processes: int = 0
    processes_seen: int = 0
    cached_binaries: int = 0
    cached_frames: int = 0
    profiles_written: int = 0
    profile_write_failures: int = 0
    profiles_removed: int = 0
    queue_depth: int = 0
    pushes: int = 0
    push_failures: int = 0
    pushes_dropped: int = 0
    last_cut: float = 0.0  # Unix time of the last interval cut: a liveness probe's measure of progress


# (metric name, help, AgentStats field); counters end in _total once exposed.
_COUNTERS = (
    ("bpfprof_processes_seen", "Processes seen since the agent started.", "processes_seen"),
    ("bpfprof_profiles_written", "Profile files written to --output-dir.", "profiles_written"),
    ("bpfprof_profile_write_failures", "Profile files that could not be written (e.g. a full disk).",
     "profile_write_failures"),
    ("bpfprof_profiles_removed", "Profile files removed by retention.", "profiles_removed"),
    ("bpfprof_pushes", "Push requests the store accepted.", "pushes"),
    ("bpfprof_push_failures", "Push attempts that failed (each retry counts).", "push_failures"),
    ("bpfprof_pushes_dropped", "Push requests given up: queue full, or refused by the store.", "pushes_dropped"),
)
_GAUGES = (
    ("bpfprof_processes", "Processes currently followed.", "processes"),
    ("bpfprof_symbol_cache_binaries", "Binaries whose symbols are cached.", "cached_binaries"),
    ("bpfprof_symbol_cache_frames", "Named frames cached.", "cached_frames"),
    ("bpfprof_push_queue_depth", "Push requests waiting to be sent.", "queue_depth"),
    ("bpfprof_last_interval_cut_timestamp_seconds", "When the last interval was cut (Unix time).", "last_cut"),
)


class _StatsCollector:
    def __init__(self, read: Callable[[], AgentStats]):
        self._read = read

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        for name, text, label, values in (
            ("bpfprof_samples", "Samples taken (blocking events for block), by profile type.", "type", stats.samples),
            ("bpfprof_lost", "Samples or events lost, by reason.", "reason", stats.lost),
        ):
            family = CounterMetricFamily(name, text, labels=[label])
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            yield family
        family = CounterMetricFamily("bpfprof_contained_failures", "Failures reading what profiled processes "
                                     "hold, each contained where it entered, by boundary and reason.",
                                     labels=["boundary", "reason"])
        for (boundary, reason), value in sorted(stats.failures.items()):
            family.add_metric([boundary, reason], value)
        yield family
        for name, text, attribute in _COUNTERS:
            yield CounterMetricFamily(name, text, value=getattr(stats, attribute))
        for name, text, attribute in _GAUGES:
            yield GaugeMetricFamily(name, text, value=getattr(stats, attribute))


def parse_address(text: str) -> Tuple[str, int]:
    """HOST:PORT (or :PORT, all interfaces) as --metrics-addr takes it."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--metrics-addr takes HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve_metrics(address: str, read: Callable[[], AgentStats]):
    """Serve /metrics (the agent's stats, its own CPU time and memory) in a thread; returns
    the server, to shut down."""
    host, port = parse_address(address)
    registry = CollectorRegistry()
    registry.register(_StatsCollector(read))
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes
    try:
        server, _thread = start_http_server(port, host, registry)
    except OSError as e:
        raise CollectorError(f"cannot serve metrics on {address}: {e.strerror or e}") from None
    return server
