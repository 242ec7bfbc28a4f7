"""The fuzz suite's runner and byte mutations.

A family of cases (ELF files, pprof files, CPython memory images) runs in one forked
worker whose address space is capped (RLIMIT_AS), each case under a timer: the only
outcomes allowed are a result or one of the family's errors. Case N of a family is made
from random.Random(f"{family}/{N}") alone, so every run makes the same cases and a
failure names what to replay: BPFPROF_FUZZ_CASE=N runs case N alone, in the test's
own process, where its traceback shows."""

from __future__ import annotations

import json
import os
import random
import resource
import select
import signal
import struct
import time
import traceback
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Type

CASE_SECONDS = 2.0          # a case that takes longer fails
CASE_MEMORY = 128 << 20     # address space a case may add to the worker's (RLIMIT_AS)
FAMILY_SECONDS = 300        # the worker is killed past this, naming the case it was on

_OURS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + "/"
INTERESTING_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)
INTERESTING_WORDS = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                     1 << 31, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


@dataclass(frozen=True)
class Case:
    """What one case does to its input, in words, and the input it made."""
    mutation: str
    data: object


class CaseTimeout(BaseException):
    """A case over CASE_SECONDS (a BaseException: no parser's `except Exception` takes it)."""


def case_rng(family: str, number: int) -> random.Random:
    return random.Random(f"{family}/{number}")


# --- byte mutations ----------------------------------------------------------------

def mutate(rng: random.Random, data: bytearray, start: int, end: int) -> Tuple[str, bytearray]:
    """One mutation inside data[start:end] (the whole data when the range is empty): bits
    flipped, a byte or a word set to an interesting value, a length-like word set huge,
    or the data cut off there. Returns its description and the data."""
    if end <= start:
        start, end = 0, len(data)
    at = rng.randrange(start, end)
    kind = rng.randrange(5)
    if kind == 0:
        flips = rng.randrange(1, 4)
        for _ in range(flips):
            bit_at = rng.randrange(start, end)
            data[bit_at] ^= 1 << rng.randrange(8)
        return f"{flips} bits flipped in [{start:#x}, {end:#x})", data
    if kind == 1:
        value = rng.choice(INTERESTING_BYTES)
        data[at] = value
        return f"byte {at:#x} = {value:#x}", data
    if kind == 2:
        width = rng.choice((2, 4, 8))
        value = rng.choice(INTERESTING_WORDS) & ((1 << (8 * width)) - 1)
        at = min(at, len(data) - width)
        data[at:at + width] = value.to_bytes(width, "little")
        return f"{width}-byte word {at:#x} = {value:#x}", data
    if kind == 3:
        at = min(at & ~3, len(data) - 4)   # length fields sit on 4-byte boundaries
        value = rng.choice((0xFFFFFFF0, 0x7FFFFFFF, 0x10000000, len(data) * 2))
        data[at:at + 4] = struct.pack("<I", value)
        return f"length-like word {at:#x} = {value:#x}", data
    return f"cut at {at:#x}", data[:at]


# --- the worker ----------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    number: int
    mutation: str
    problem: str

    def __str__(self) -> str:
        return f"case {self.number} ({self.mutation}): {self.problem}"


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _on_alarm(signum, frame) -> None:
    raise CaseTimeout()


def _where(error: BaseException) -> str:
    """Where an exception was raised, and from where in bpfprof if that is not bpfprof."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if f.filename.startswith(_OURS) and not {"tests", ".venv"} & set(f.filename.split("/"))]
    places = [frames[-1]] + ([ours[-1]] if ours and ours[-1] is not frames[-1] else [])
    return " from ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in places)


def _run_case(number: int, make: Callable[[int], Case], run: Callable[[Case], None],
              allowed: Tuple[Type[BaseException], ...], whole_traceback: bool = False) -> Optional[Failure]:
    case = make(number)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        run(case)
    except allowed:
        pass
    except CaseTimeout:
        return Failure(number, case.mutation, f"over {CASE_SECONDS} s")
    except MemoryError as e:
        return Failure(number, case.mutation, f"over {CASE_MEMORY >> 20} MiB of address space ({_where(e)})")
    except Exception as e:
        told = "".join(traceback.format_exception(e)) if whole_traceback else f"{type(e).__name__}: {e} ({_where(e)})"
        return Failure(number, case.mutation, told)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if time.monotonic() - started > CASE_SECONDS:   # time spent where the timer could not interrupt
        return Failure(number, case.mutation, f"took {time.monotonic() - started:.1f} s")
    return None


def _worker(write_fd: int, numbers: Sequence[int], make, run, allowed, warm_up: Callable[[], None],
            whole_traceback: bool) -> None:
    out = os.fdopen(write_fd, "w", buffering=1)
    signal.signal(signal.SIGALRM, _on_alarm)
    warm_up()  # imports and first-use set-up count toward the worker, not a case
    limit = _address_space() + CASE_MEMORY
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for number in numbers:
        out.write(json.dumps({"started": number}) + "\n")
        failure = _run_case(number, make, run, allowed, whole_traceback)
        if failure:
            out.write(json.dumps({"failure": [failure.number, failure.mutation, failure.problem]}) + "\n")
    out.write(json.dumps({"done": len(numbers)}) + "\n")
    out.close()


def run_family(family: str, count: int, make: Callable[[int], Case], run: Callable[[Case], None],
               allowed: Sequence[Type[BaseException]], warm_up: Callable[[], None]) -> List[Failure]:
    """Runs cases 0..count-1 of a family (or only case BPFPROF_FUZZ_CASE, telling its
    whole traceback) in a worker, and returns the failures."""
    only = os.environ.get("BPFPROF_FUZZ_CASE")
    numbers = range(count) if only is None else [int(only)]
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_fd)
            _worker(write_fd, numbers, make, run, tuple(allowed), warm_up, only is not None)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(write_fd)
    failures, last, done, buffer = [], -1, False, b""
    deadline = time.monotonic() + FAMILY_SECONDS
    try:
        while True:
            ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return failures + [Failure(last, make(last).mutation, f"the worker ran past {FAMILY_SECONDS} s")]
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                message = json.loads(line)
                last = message.get("started", last)
                done = done or "done" in message
                if "failure" in message:
                    failures.append(Failure(*message["failure"]))
    finally:
        os.close(read_fd)
        if not done:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if not done:
        failures.append(Failure(last, make(last).mutation if last >= 0 else "warm-up",
                                f"the worker died ({os.waitstatus_to_exitcode(status)})"))
    return failures


def assert_no_failures(family: str, failures: List[Failure]) -> None:
    assert not failures, (f"{len(failures)} {family} cases failed (replay one with BPFPROF_FUZZ_CASE=N):\n"
                          + "\n".join(map(str, failures[:30])))
