"""Whether the agent still profiles: the time since its last drain, against a bound.

/metrics is served by its own thread and answers whatever the sampling loop does; a drain
that never returns (or a loop that never reaches one) stops the profiles but not the
metrics. Judged here from the time of the last drain and the clock, on each request:
a stalled loop cannot report its own stall."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Until the first drain: loading the BPF program (bcc's compile, seconds when the compiler's
# libraries are out of the page cache, more on a node short of CPU) comes before it.
STARTUP_GRACE_S = 120.0
# After it: drains come every second (collector/pipeline/recorder.py); one that reads the
# symbols of hundreds of new binaries takes seconds. A minute without one is a stall.
STALLED_AFTER_S = 60.0


@dataclass(frozen=True)
class Health:
    healthy: bool
    since_drain_s: float  # since the last drain; before the first, since the agent started
    reason: str  # one line, for /healthz


def judge_health(last_drain: Optional[float], started: float, now: float) -> Health:
    """`last_drain` and `started` are readings of the same monotonic clock as `now`;
    `last_drain` is None before the first drain."""
    if last_drain is None:
        waited = now - started
        if waited > STARTUP_GRACE_S:
            return Health(False, waited, f"no drain since the agent started {waited:.0f} s ago "
                                         f"(limit {STARTUP_GRACE_S:.0f} s): the BPF program never started sampling")
        return Health(True, waited, f"starting: no drain yet, {waited:.0f} s since the agent started")
    since = now - last_drain
    if since > STALLED_AFTER_S:
        return Health(False, since, f"no drain for {since:.0f} s (limit {STALLED_AFTER_S:.0f} s): profiling has stalled")
    return Health(True, since, f"ok: last drain {since:.1f} s ago")
