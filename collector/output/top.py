"""`bpfprof top`: a live terminal view of the functions with the most self and total time
over a sliding window of the last seconds, redrawn after every drain, through curses."""

from __future__ import annotations

import curses
import os
import select
import threading
import time
from collections import deque
from typing import Deque, List

from bpfprof.collector.output.functions import function_rows, narrow
from bpfprof.collector.profile import Profile
from bpfprof.collector.pipeline.recorder import Recorder, Recording
from bpfprof.collector.output.report import format_table

QUIT_KEYS = (b"q", b"Q")
_COUNTED = {"cpu": "samples", "memory": "allocations", "faults": "page faults"}


# The value each profile type shows in top, and the values that are a state at the end of
# a drain (memory in use) rather than a flow during it.
SHOWN = {"cpu": "cpu", "memory": "inuse_space", "faults": "fault_space"}
STATES = {"inuse_objects", "inuse_space"}


class Window:
    """The profiles of the last `seconds` drains, merged on demand: flows summed, states
    as the last drain left them."""

    def __init__(self, seconds: int):
        self._slices: Deque[Profile] = deque(maxlen=seconds)

    def add(self, profile: Profile) -> None:
        self._slices.append(profile)

    def merged(self) -> Profile:
        last = self._slices[-1]
        merged = last.empty_copy(duration_ns=0)
        states = [i for i, t in enumerate(last.sample_types) if t.type in STATES]
        for profile in self._slices:
            for (stack, labels), values in profile.samples.items():
                if profile is not last and states:
                    values = [0 if i in states else v for i, v in enumerate(values)]
                merged.add(stack, labels, values)
        return merged

    def __len__(self) -> int:
        return len(self._slices)


def _watch_keys(recorder: Recorder, done: threading.Event) -> None:
    """Reads the terminal (curses has it in cbreak mode, so each key arrives at once) until
    a quit key, then asks the recorder to stop. curses itself is only used for drawing."""
    while not done.is_set():
        ready, _, _ = select.select([0], [], [], 0.1)
        if ready:
            key = os.read(0, 1)
            if not key or key in QUIT_KEYS:
                recorder.request_stop()
                return


class LiveTop:
    def __init__(self, recorder: Recorder, target: str, window_s: int, profile_type: str = "cpu"):
        self._recorder = recorder
        self._type = profile_type
        self._target = target
        self._window = Window(window_s)
        self._window_s = window_s
        self._screen = None
        self._last_drain = time.monotonic()
        self._rate = 0.0

    def run(self) -> Recording:
        """Until q or Ctrl-C; the terminal is restored however it ends."""
        return curses.wrapper(self._run)

    def _run(self, screen) -> Recording:
        self._screen = screen
        curses.curs_set(0)
        done = threading.Event()
        keys = threading.Thread(target=_watch_keys, args=(self._recorder, done), daemon=True)
        keys.start()
        self._draw(["waiting for the first samples..."], lost=0)
        try:
            return self._recorder.run(on_drain=self._on_drain)
        finally:
            done.set()
            keys.join()

    def _on_drain(self) -> None:
        profile = self._recorder.take_profiles()[self._type]
        now = time.monotonic()
        self._rate = profile.num_samples() / max(now - self._last_drain, 1e-3)
        self._last_drain = now
        self._window.add(profile)
        merged = narrow(self._window.merged(), sample_type=SHOWN[self._type])  # time or bytes rather than counts
        _, width = self._screen.getmaxyx()
        rows = function_rows(merged)
        table = format_table(rows, merged.total(), merged.main_type.unit, width - 1)
        self._draw(table.splitlines(), lost=sum(self._recorder.losses().values()))

    def _draw(self, body: List[str], lost: int) -> None:
        size = os.get_terminal_size()
        if curses.is_term_resized(size.lines, size.columns):
            curses.resizeterm(size.lines, size.columns)
        screen = self._screen
        height, width = screen.getmaxyx()
        header = [
            f"bpfprof top - {self._target}, {self._recorder.config.frequency} Hz, "
            f"last {len(self._window)} of {self._window_s} s   {time.strftime('%H:%M:%S')}",
            f"{self._rate:.0f} {_COUNTED[self._type]}/s   lost {lost}   q: quit",
            "",
        ]
        screen.erase()
        for y, line in enumerate((header + body)[: height - 1]):
            screen.addnstr(y, 0, line, width - 1, curses.A_BOLD if y < 2 else curses.A_NORMAL)
        screen.refresh()
