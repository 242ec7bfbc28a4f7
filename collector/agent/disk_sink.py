"""The agent's local sink: one pprof file per interval and profile type, kept by age and total size."""

from __future__ import annotations

import os
import re
import time
from typing import Callable, List, Tuple

from bpfprof.collector.agent.logs import log
from bpfprof.symbolizer.atomic_file import TEMPORARY_PREFIX, write_atomically
from bpfprof.collector.errors import UsageError

FILE_MODE = 0o640  # profiles show what runs on the node: not for every local user
# <start, UTC, to the millisecond>.<node>.<type>.pb.gz: names sort by time; only these are
# ever removed. Two intervals can start in one second (a cut late after a slow drain, then
# one on the beat): to the second, the later file took the earlier one's name.
_PROFILE_NAME = re.compile(r"^\d{8}T\d{6}\.\d{3}Z\.[^/]+\.(cpu|block|wall)\.pb\.gz$")


def profile_file_name(start_ns: int, node: str, profile_type: str) -> str:
    seconds, ns = divmod(start_ns, 1_000_000_000)
    start = time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds))
    return f"{start}.{ns // 1_000_000:03d}Z.{node}.{profile_type}.pb.gz"


class DiskSink:
    def __init__(self, directory: str, max_age_s: float, max_bytes: int, clock: Callable[[], float] = time.time):
        try:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot use --output-dir {directory}: {e.strerror or e}") from None
        if not os.access(directory, os.W_OK):
            raise UsageError(f"cannot use --output-dir {directory}: not writable")
        self.directory = directory
        self._max_age_s = max_age_s
        self._max_bytes = max_bytes
        self._clock = clock
        self.written = 0
        self.failed = 0
        self.removed = 0
        for name in os.listdir(directory):  # left by a run that was killed mid-write
            if name.startswith(TEMPORARY_PREFIX):
                os.unlink(os.path.join(directory, name))

    def write(self, name: str, data: bytes) -> bool:
        """Write one profile whole or not at all; a failure (a full disk) is logged and
        counted, never raised: the agent keeps profiling and tries again next interval."""
        path = os.path.join(self.directory, name)
        try:
            write_atomically(path, data, FILE_MODE)
        except OSError as e:
            self.failed += 1
            log.error("cannot write profile", extra={"fields": {"path": path, "error": e.strerror or str(e)}})
            return False
        finally:
            self._apply_retention()
        self.written += 1
        return True

    def _profiles(self) -> List[Tuple[str, float, int]]:
        """(path, mtime, size) of our profile files, oldest first."""
        found = []
        for entry in os.scandir(self.directory):
            if _PROFILE_NAME.match(entry.name):
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                found.append((entry.path, stat.st_mtime, stat.st_size))
        return sorted(found, key=lambda f: (f[1], f[0]))

    def _apply_retention(self) -> None:
        try:
            profiles = self._profiles()
        except OSError as e:
            log.error("cannot list profiles", extra={"fields": {"dir": self.directory, "error": e.strerror}})
            return
        total = sum(size for _, _, size in profiles)
        oldest_kept = self._clock() - self._max_age_s
        for path, mtime, size in profiles:
            if mtime >= oldest_kept and total <= self._max_bytes:
                break
            try:
                os.unlink(path)
            except OSError as e:
                log.warning("cannot remove old profile", extra={"fields": {"path": path, "error": e.strerror}})
                continue
            total -= size
            self.removed += 1
