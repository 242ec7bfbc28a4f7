"""Pushes off the sampling path: a bounded queue that one thread sends, retrying with
exponential backoff and full jitter, dropping (and counting) the oldest when it overflows."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from typing import Callable, Deque, Optional, Tuple

from bpfprof.collector.agent.pyroscope import PushError

log = logging.getLogger("bpfprof.agent")


class PushQueue:
    """Each body put is counted once, as pushed or dropped, or is still queued (depth).

    Retry delays are "full jitter": uniform in [0, min(max, base * 2^attempt)]. A fleet of
    agents that lose the same store at the same moment then spreads its retries over the
    whole window instead of arriving in waves, which is what the store needs most when it
    comes back; a lone agent loses nothing by sometimes retrying early.

    A backoff before close() waits through `wait` (Event.wait's signature) on the event
    close() sets, so that a test can see the sender waiting and for how long.
    """

    def __init__(self, send: Callable[[bytes], None], capacity: int, base_delay_s: float = 1.0,
                 max_delay_s: float = 60.0, rng: Callable[[], float] = random.random,
                 wait: Callable[[threading.Event, float], bool] = threading.Event.wait) -> None:
        if capacity < 1:
            raise ValueError("a push queue holds at least one request")
        self._send = send
        self.capacity = capacity
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._rng = rng
        self._wait_for_close = wait
        # (sequence number, body), oldest first; the head stays queued while it is being
        # sent, so that an overflow drops it like any oldest body.
        self._pending: Deque[Tuple[int, bytes]] = deque()
        self._next_sequence = 0
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._deadline = 0.0  # time.monotonic() by which close() stops the sender
        self._thread: Optional[threading.Thread] = None
        self.pushed = 0
        self.failed = 0  # attempts that failed, retried or not
        self.dropped = 0

    @property
    def depth(self) -> int:
        return len(self._pending)

    def put(self, body: bytes) -> None:
        """Queues one encoded request; never blocks. When full, the oldest is dropped; after
        close(), the body is."""
        with self._changed:
            if self._closing.is_set():
                self.dropped += 1  # nothing would send it
                return
            if len(self._pending) == self.capacity:
                self._pending.popleft()
                self.dropped += 1
                log.warning("push queue full, oldest profile dropped",
                            extra={"fields": {"capacity": self.capacity, "dropped_total": self.dropped}})
            self._pending.append((self._next_sequence, body))
            self._next_sequence += 1
            self._changed.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._send_queued, name="bpfprof-push", daemon=True)
        self._thread.start()

    def close(self, deadline_s: float) -> None:
        """Sends what is queued for at most `deadline_s` seconds from now, then stops the sender;
        what is left is dropped and counted. Returns by then even if a send hangs."""
        with self._changed:
            self._deadline = time.monotonic() + deadline_s
            self._closing.set()
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, self._deadline - time.monotonic()))
        with self._changed:
            left = len(self._pending)
            self._pending.clear()
            self.dropped += left
        if left:
            log.warning("profiles not pushed before the deadline dropped", extra={"fields": {"dropped": left}})

    def _send_queued(self) -> None:
        attempt = 0  # retryable failures in a row, whichever requests they were: the store's state
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closing.is_set())
                if not self._pending or self._past_deadline():
                    return
                sequence, body = self._pending[0]
            try:
                self._send(body)
            except Exception as e:  # the sender thread outlives any one bad request
                retryable = isinstance(e, PushError) and e.retryable
                fields = {"status": getattr(e, "status", None), "error": str(e)}
                if not isinstance(e, PushError):
                    log.exception("push failed unexpectedly")
            else:
                with self._changed:
                    # A body dropped while it was being sent stays counted as dropped.
                    if self._remove_head(sequence):
                        self.pushed += 1
                if attempt:
                    log.info("push resumed", extra={"fields": {"failed_attempts": attempt}})
                attempt = 0
                continue
            with self._changed:
                self.failed += 1
                if not retryable:
                    if self._remove_head(sequence):
                        self.dropped += 1
                    log.warning("push refused, profile dropped", extra={"fields": fields})
                    attempt = 0
                    continue
            delay = self._retry_delay(attempt)
            attempt += 1
            log.warning("push failed", extra={"fields": {**fields, "retry_in_s": round(delay, 3)}})
            if self._wait(delay):
                attempt = 0  # close() came: try again at once, then back off from the start

    def _remove_head(self, sequence: int) -> bool:
        """Removes the head if it is still `sequence`; False when an overflow or close() took it."""
        if self._pending and self._pending[0][0] == sequence:
            self._pending.popleft()
            return True
        return False

    def _retry_delay(self, attempt: int) -> float:
        # The exponent stops growing once the cap is reached: 2.0 ** 1024 overflows a float.
        ceiling = min(self.max_delay_s, self.base_delay_s * 2.0 ** min(attempt, 64))
        return ceiling * self._rng()

    def _wait(self, delay: float) -> bool:
        """Waits up to `delay` seconds, no later than the deadline; True when close() cut it short."""
        if not self._closing.is_set():
            return self._wait_for_close(self._closing, delay)
        time.sleep(max(0.0, min(delay, self._deadline - time.monotonic())))
        return False

    def _past_deadline(self) -> bool:
        return self._closing.is_set() and time.monotonic() >= self._deadline
