"""`bpfprof agent`: record without end, cut the profiles every interval, label them, keep them
on disk and push them to the store."""

from __future__ import annotations

import ctypes
import signal
import time
from typing import Dict, List, Optional

from bpfprof.collector.agent.disk_sink import DiskSink, profile_file_name
from bpfprof.collector.agent.labels import SERVICE_NAME, Labeller, split_by_service
from bpfprof.collector.agent.logs import LogFile, log
from bpfprof.collector.agent.metrics import AgentStats
from bpfprof.collector.agent.push_queue import PushQueue
from bpfprof.collector.agent.pyroscope import Series, encode_push_request
from bpfprof.collector.agent.service_manager import ServiceManager
from bpfprof.collector.errors import CollectorError
from bpfprof.collector.output.pprof import pprof_bytes
from bpfprof.collector.profile import Profile
from bpfprof.collector.pipeline.recorder import Recorder

STOP_WITHIN_S = 5.0  # from SIGTERM to exit, the last interval written and pushed if the store answers
# The store's names for our profile types (its __name__ label).
STORE_PROFILE_NAMES = {"cpu": "process_cpu", "block": "block", "wall": "wall", "memory": "memory", "faults": "faults"}


_M_MMAP_THRESHOLD = -3  # mallopt(3)
_M_ARENA_MAX = -8
_MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold


def tune_malloc() -> None:
    """Keep the agent's heap from holding on to what it freed, over days. Call before any
    thread starts.

    - One arena: glibc gives each thread that allocates an arena of its own; the agent's
      few threads (events, pushes, metrics) allocate little, and their arenas' free space
      stays resident (about 10 MB over an hour).
    - A fixed mmap threshold: by default, freeing a large block raises the threshold to
      its size, so from then on blocks that size come from the heap, whose free space
      is rarely given back; with it fixed, every block over 128 KiB is unmapped when freed."""
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_ARENA_MAX, 1)
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


class Agent:
    def __init__(self, recorder: Recorder, interval_s: float, labeller: Labeller, node: str,
                 disk: Optional[DiskSink] = None, queue: Optional[PushQueue] = None,
                 log_file: Optional[LogFile] = None, service_manager: Optional[ServiceManager] = None):
        self._recorder = recorder
        self._interval_s = interval_s
        self._labeller = labeller
        self._node = node
        self._disk = disk
        self._queue = queue
        self._log_file = log_file
        self._service_manager = service_manager
        self._reopen_logs = False
        self._next_cut: Optional[float] = None  # time.monotonic() of the next cut
        self._samples: Dict[str, int] = {}
        self._last_cut = 0.0
        self.stats = AgentStats()  # replaced whole after every drain: the metrics thread reads it

    def run(self) -> None:
        """Until SIGTERM or SIGINT; then the interval so far is written and pushed."""
        previous = signal.signal(signal.SIGHUP, self._on_sighup)
        if self._queue:
            self._queue.start()
        try:
            recording = self._recorder.run(on_drain=self._on_drain)
            self._ship(recording.profiles)
            if self._queue:
                stopped = self._recorder.stop_requested_at or time.monotonic()
                self._queue.close(max(0.5, stopped + STOP_WITHIN_S - 0.5 - time.monotonic()))
            self._update_stats(recording.losses)
            if recording.dead_thread:
                raise CollectorError(f"a worker thread failed ({recording.dead_thread}); the agent ends so that "
                                     "its supervisor starts it again")
            log.info("agent stopped", extra={"fields": {"samples": self._samples, "lost": recording.losses}})
        except Exception:
            log.exception("agent failed")  # the log keeps where; stderr gets the one-line summary
            raise
        finally:
            signal.signal(signal.SIGHUP, previous)

    def _on_sighup(self, *_args) -> None:
        self._reopen_logs = True  # done between drains: the log handler's lock may be held right now

    def _on_drain(self) -> None:
        if self._reopen_logs and self._log_file is not None:
            self._reopen_logs = False
            self._log_file.reopen()
            log.info("log file reopened")
        now = time.monotonic()
        if self._next_cut is None:
            self._next_cut = self._recorder.sampling_since + self._interval_s
            log.info("agent started", extra={"fields": {
                "node": self._node, "interval_s": self._interval_s, "frequency_hz": self._recorder.config.frequency,
                "output_dir": self._disk.directory if self._disk else None, "push": self._queue is not None}})
        if now >= self._next_cut:
            self._ship(self._recorder.take_profiles())
            while self._next_cut <= now:  # a stall skips intervals rather than cutting in a burst
                self._next_cut += self._interval_s
        self._update_stats(self._recorder.losses())
        if self._service_manager:
            self._service_manager.drained()

    def ship_oom(self, pid: int, comm: str, profile: Profile) -> None:
        """What a process the OOM killer chose held, kept and pushed at once, labelled oom="true"."""
        series = self._series("memory", profile, f"oom-{pid}.memory", (("oom", "true"),))
        if series:
            self._queue.put(encode_push_request(series))
        log.warning("the OOM killer chose a profiled process", extra={"fields": {"pid": pid, "comm": comm}})

    def _series(self, kind: str, profile: Profile, file_kind: str, extra=()) -> List[Series]:
        """The profile labelled, written to disk as `file_kind`, and its series to push."""
        labelled = self._labeller.label(profile)
        if self._disk:
            self._disk.write(profile_file_name(profile.start_ns, self._node, file_kind), pprof_bytes(labelled))
        series: List[Series] = []
        if self._queue:
            for service, part in sorted(split_by_service(labelled).items()):
                labels = (("__name__", STORE_PROFILE_NAMES[kind]), (SERVICE_NAME, service), ("node", self._node),
                          *extra)
                series.append(Series(labels, pprof_bytes(part)))
        return series

    def _ship(self, profiles: Dict[str, Profile]) -> None:
        self._last_cut = time.time()
        series: List[Series] = []
        for kind, profile in profiles.items():
            self._samples[kind] = self._samples.get(kind, 0) + profile.num_samples()
            series.extend(self._series(kind, profile, kind))
        if series:
            self._queue.put(encode_push_request(series))
        log.info("interval cut", extra={"fields": {
            "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(next(iter(profiles.values())).start_ns / 1e9)),
            "samples": {kind: p.num_samples() for kind, p in profiles.items()}, "series": len(series)}})

    def _update_stats(self, losses: Dict[str, int]) -> None:
        status = self._recorder.status()
        disk, queue = self._disk, self._queue
        self.stats = AgentStats(
            samples=dict(self._samples),
            lost=losses,
            failures=self._recorder.failures.counts(),
            processes=status["processes"],
            processes_seen=status["processes_seen"],
            cached_binaries=status["binaries"],
            cached_frames=status["frames"],
            open_files=status["open_files"],
            memory_ranges=status["memory_ranges"],
            cache_bytes=self._recorder.cache_bytes(),
            profiles_written=disk.written if disk else 0,
            profile_write_failures=disk.failed if disk else 0,
            profiles_removed=disk.removed if disk else 0,
            queue_depth=queue.depth if queue else 0,
            pushes=queue.pushed if queue else 0,
            push_failures=queue.failed if queue else 0,
            pushes_dropped=queue.dropped if queue else 0,
            last_cut=self._last_cut,
            last_drain=time.monotonic(),  # what /healthz and the liveness probe judge progress by
        )
