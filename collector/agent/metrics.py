"""The agent's own metrics, served for Prometheus on --metrics-addr, and /healthz beside them."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Callable, Dict, Iterator, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from bpfprof.collector.agent.health import Health, judge_health
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
    open_files: int = 0
    memory_ranges: int = 0
    cache_bytes: Dict[str, int] = field(default_factory=dict)  # symbol cache ("native", "python") -> bytes held
    profiles_written: int = 0
    profile_write_failures: int = 0
    profiles_removed: int = 0
    queue_depth: int = 0
    pushes: int = 0
    push_failures: int = 0
    pushes_dropped: int = 0
    last_cut: float = 0.0  # Unix time of the last interval cut
    last_drain: Optional[float] = None  # time.monotonic() of the last drain; None before the first


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
    ("bpfprof_open_files", "Files of profiled processes held open (binaries, debug files).", "open_files"),
    ("bpfprof_memory_ranges", "Ranges of memory held by profiled processes, kept in BPF (-t memory).",
     "memory_ranges"),
    ("bpfprof_push_queue_depth", "Push requests waiting to be sent.", "queue_depth"),
    ("bpfprof_last_interval_cut_timestamp_seconds", "When the last interval was cut (Unix time).", "last_cut"),
)


class _StatsCollector:
    def __init__(self, read: Callable[[], AgentStats], health: Callable[[AgentStats], Health]):
        self._read = read
        self._health = health

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        health = self._health(stats)
        yield GaugeMetricFamily("bpfprof_last_drain_age_seconds",
                                "Seconds since the last drain of the BPF maps (since the start before the first).",
                                value=health.since_drain_s)
        yield GaugeMetricFamily("bpfprof_healthy", "1 while drains go on, 0 once they have stalled (see /healthz).",
                                value=int(health.healthy))
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
        family = GaugeMetricFamily("bpfprof_symbol_cache_bytes", "Bytes held by the symbol caches, about: native "
                                   "symbols and lines, and each interpreter's code objects and frames.",
                                   labels=["cache"])
        for cache, value in sorted(stats.cache_bytes.items()):
            family.add_metric([cache], value)
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


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *_args) -> None:
        pass  # a line on stderr per scrape would drown the agent's own log


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, host: str, port: int):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _QuietHandler)


def _with_healthz(metrics_app, health: Callable[[], Health]):
    """/healthz answers 200 while drains go on and 503 once they stall, with the reason in one
    line; every other path is the metrics."""

    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/healthz":
            return metrics_app(environ, start_response)
        verdict = health()
        body = (verdict.reason + "\n").encode()
        start_response("200 OK" if verdict.healthy else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def serve_metrics(address: str, read: Callable[[], AgentStats], clock: Callable[[], float] = time.monotonic):
    """Serve /metrics (the agent's stats, its own CPU time and memory) and /healthz in a thread;
    returns the server, to shut down. `clock` is the monotonic clock AgentStats.last_drain reads."""
    host, port = parse_address(address)
    started = clock()

    def health(stats: AgentStats) -> Health:
        return judge_health(stats.last_drain, started, clock())

    registry = CollectorRegistry()
    registry.register(_StatsCollector(read, health))
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes
    try:
        server = _MetricsServer(host, port)
    except OSError as e:
        raise CollectorError(f"cannot serve metrics on {address}: {e.strerror or e}") from None
    server.set_app(_with_healthz(make_wsgi_app(registry), lambda: health(read())))
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
