"""The processes running one kind of interpreter, as the pipeline drives them.

Each kind (PythonProcesses for CPython) recognises its interpreter in the processes the
table reads, keeps an InterpreterProcess for each, and hears what the BPF side tells of
their threads and stacks. The pipeline holds a list of kinds and knows none of them."""

from __future__ import annotations

from typing import Dict, Optional, Protocol, Sequence, Set

from bpfprof.collector.processes.table import ProcFiles, Process
from bpfprof.symbolizer.interpreters import InterpreterProcess


class InterpreterProcesses(Protocol):
    """What the event thread calls: on_first_read, on_exec, on_thread_found, on_stack,
    has_work and work, each as its event arrives; the recorder's thread the rest."""

    name: str  # of the interpreter, as metrics label its caches ("python")

    def on_first_read(self, pid: int, files: ProcFiles) -> None:
        """A process's first sample arrived with its /proc files: recognise it now if that is cheap."""

    def on_snapshot(self, process: Process) -> None:
        """A process was (re)read."""

    def on_exec(self, pid: int) -> None:
        """A process replaced its image."""

    def on_thread_found(self, pid: int) -> None:
        """The BPF walker found a thread of the process (or needs to learn more to find them)."""

    def on_stack(self, pid: int, frames: Sequence) -> None:
        """A stack the BPF walker stored for the first time since a drain (raw frames)."""

    def has_work(self) -> bool:
        """Whether work() has something to do soon (the event thread then polls more often)."""

    def work(self) -> None:
        """After each batch of events, on the event thread."""

    def ended_threads(self) -> Dict[int, Set[int]]:
        """pid -> tids seen to end since the last call; called before a drain."""

    def drop_names(self, ended: Dict[int, Set[int]]) -> None:
        """After the drain that followed ended_threads()."""

    def get(self, pid: int) -> Optional[InterpreterProcess]:
        """The process's interpreter, once it is known."""

    def forget(self, pid: int) -> None:
        """After the last drain that can hold the process's samples."""

    def num_bytes(self) -> int:
        """Bytes held by the caches of what was read of the processes (code objects, frames), about."""

    def close(self) -> None:
        """At the end of the recording."""
