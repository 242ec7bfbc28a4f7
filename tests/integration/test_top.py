"""`bpfprof top` in a pseudo-terminal, read through a terminal emulator (pyte): it draws the
hot functions of a known program, refreshes every second, and quits on q, restoring the
terminal; Ctrl-C does the same."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pyte
import pytest

pytestmark = pytest.mark.usefixtures("bpf_ready")

ROWS, COLUMNS = 30, 110


class Terminal:
    """A program on a pseudo-terminal of ROWS x COLUMNS, its screen as pyte renders it."""

    def __init__(self, argv):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                        env={**os.environ, "TERM": "xterm-256color"})
        os.close(slave)
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self._stream = pyte.ByteStream(self.screen)
        self.raw = b""

    def text(self) -> str:
        return "\n".join(self.screen.display)

    def read_until(self, predicate, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # the program has exited and closed its side
                    return predicate(self)
                self.raw += data
                self._stream.feed(data)
            if predicate(self):
                return True
        return False

    def header_time(self) -> str:
        return self.screen.display[0].split()[-1]


@pytest.mark.parametrize("quit", ["q", "ctrl-c"])
def test_top_draws_refreshes_and_quits(build_c, quit):
    chain = subprocess.Popen([str(build_c("chain")), "60"])
    terminal = Terminal([sys.executable, "-m", "bpfprof", "top", "-p", str(chain.pid)])
    try:
        # (the whole table: a read can end half-way through drawing it)
        assert terminal.read_until(lambda t: all(f in t.text() for f in ("chain_c", "chain_b", "chain_a")),
                                   timeout=30), terminal.text()
        screen = terminal.screen.display
        assert "samples/s" in screen[1] and "lost 0" in screen[1]
        header = next(line for line in screen if "Function" in line)
        assert header.split()[:4] == ["Self", "%", "Self", "Total"]
        leaf = next(line for line in screen if "chain_c" in line)
        assert float(leaf.split()[0].rstrip("%")) > 90  # the program spins in chain_c
        assert all(len(line) <= COLUMNS for line in screen)
        first = terminal.header_time()
        assert terminal.read_until(lambda t: t.header_time() != first, timeout=5), "no refresh within 5 s"
        if quit == "q":
            os.write(terminal.master, b"q")
        else:
            terminal.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert terminal.process.wait(timeout=10) == 0
        terminal.read_until(lambda t: False, timeout=0.5)
        assert b"\x1b[?1049l" in terminal.raw  # left the alternate screen: the terminal is back
    finally:
        chain.kill()
        if terminal.process.poll() is None:
            terminal.process.kill()


def test_top_needs_a_terminal():
    result = subprocess.run([sys.executable, "-m", "bpfprof", "top"], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "top needs a terminal" in result.stderr


HOLDER = """
import time
def hold_buffers():
    return [bytearray(4 << 20) for _ in range(10)]
while True:
    held = hold_buffers()
    time.sleep(1)
    del held
"""


def test_top_shows_memory_in_use_in_bytes():
    holder = subprocess.Popen([sys.executable, "-c", HOLDER])
    terminal = Terminal([sys.executable, "-m", "bpfprof", "top", "-t", "memory", "-p", str(holder.pid)])
    try:
        assert terminal.read_until(lambda t: any("hold_buffers" in line and "MB" in line for line in t.screen.display),
                                   timeout=30), terminal.text()
        assert "allocations/s" in terminal.screen.display[1]
        os.write(terminal.master, b"q")
        assert terminal.process.wait(timeout=10) == 0
    finally:
        holder.kill()
        if terminal.process.poll() is None:
            terminal.process.kill()
