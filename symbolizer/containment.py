"""Failures contained where untrusted input enters: one binary, one process, one code
object, one sample. Each is counted by boundary and reason, told once per thing (a
binary's path, a process), and goes no further: the loop above it carries on.

Input that breaks its format (MalformedInput), claims too much (TooLarge) or cannot be
read (OSError, UnreadableMemory: most often a process that just exited) is expected of
hostile or short-lived processes. Any other exception is a bug in a parser; it is
contained too, as an "internal error", unless BPFPROF_STRICT=1 (the test suite), where
it goes on up so that the test fails."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Set, Tuple

from bpfprof.symbolizer.errors import MalformedInput, SymbolizerError, TooLarge
from bpfprof.symbolizer.process_memory import UnreadableMemory
from bpfprof.symbolizer.text import printable

STRICT = os.environ.get("BPFPROF_STRICT") == "1"
_TOLD_AT_MOST = 10_000  # things told of: past this, failures are only counted
_THREAD_STARTS = 10  # a worker thread whose loop fails this often is given up, loudly


def reason_of(error: BaseException) -> str:
    """The counted reason of a failure."""
    if isinstance(error, TooLarge):
        return "too large"
    if isinstance(error, MalformedInput):
        return "malformed"
    if isinstance(error, (UnreadableMemory, OSError)):
        return "unreadable"
    if isinstance(error, SymbolizerError):
        return "unusable"
    return "internal error"


class Failures:
    """Counts of contained failures; safe to use from every thread. `tell` gets one line
    per thing that failed for a reason other than being unreadable (which processes that
    exit cause all the time)."""

    def __init__(self, tell: Callable[[str], None] = lambda message: None) -> None:
        self._tell = tell
        self._lock = threading.Lock()
        self._counts: Dict[Tuple[str, str], int] = {}
        self._examples: Dict[Tuple[str, str], str] = {}  # the first of each: "name: why"
        self._told: Set[Tuple[str, str]] = set()
        self.dead_thread: Optional[str] = None  # "name: why" of a worker given up

    @contextmanager
    def contain(self, boundary: str, name: str) -> Iterator[None]:
        """Run the block; a failure in it is counted against `boundary` ("binary",
        "process", "code object", "sample"...) and told for `name`, and the code after
        the with statement runs as if the block had ended early."""
        try:
            yield
        except Exception as error:  # the boundary: nothing from the input goes further
            if STRICT and reason_of(error) == "internal error":
                raise
            self.add(boundary, name, error)

    def add(self, boundary: str, name: str, error: BaseException) -> None:
        reason = reason_of(error)
        with self._lock:
            self._counts[(boundary, reason)] = self._counts.get((boundary, reason), 0) + 1
            self._examples.setdefault((boundary, reason), f"{printable(name)}: {printable(_why(error, reason))}")
            tell = (reason != "unreadable" and (boundary, name) not in self._told
                    and len(self._told) < _TOLD_AT_MOST)
            if tell:
                self._told.add((boundary, name))
        if tell:
            self._tell(f"{boundary} {printable(name)}: {reason}: {printable(_why(error, reason))}")

    def keep_running(self, thread: str, loop: Callable[[], None]) -> None:
        """Run a worker thread's loop until it returns. A failure that escapes it (inputs
        are contained inside; this is a bug) is counted and told, and the loop starts
        again; after _THREAD_STARTS failures, or the first in strict mode, the worker is
        given up and dead_thread says so, for the recording to end on."""
        for _ in range(1 if STRICT else _THREAD_STARTS):
            try:
                return loop()
            except Exception as error:
                self.add("thread", thread, error)
                last = error
        self.dead_thread = f"{thread}: {_why(last, reason_of(last))}"

    def counts(self) -> Dict[Tuple[str, str], int]:
        """(boundary, reason) -> failures so far."""
        with self._lock:
            return dict(self._counts)

    def examples(self) -> Dict[Tuple[str, str], str]:
        """(boundary, reason) -> the first such failure, as "name: why" (escaped)."""
        with self._lock:
            return dict(self._examples)


def _why(error: BaseException, reason: str) -> str:
    if reason == "internal error":
        return f"{type(error).__name__}: {error}"
    return (error.strerror or str(error)) if isinstance(error, OSError) else str(error)
