"""Interpreters whose frames stand in for their eval loops, one package each behind one
small interface: the package recognises its interpreter in a process and keeps an
InterpreterProcess for it, which names the raw frames the BPF walker recorded and the
process's threads; merge.py places those frames into the native stack."""

from __future__ import annotations

from typing import FrozenSet, List, Optional, Protocol, Sequence, Tuple

from bpfprof.symbolizer.frames import Frame


class InterpreterProcess(Protocol):
    """An interpreter running in one process."""

    module_path: str  # the binary it runs in: its own frames between two groups are call machinery
    eval_functions: FrozenSet[str]  # native functions each of which runs one group of its frames

    def frames(self, raw: Sequence, truncated: bool) -> List[Tuple[Frame, bool]]:
        """Named frames, leaf first, each with whether an eval loop was entered there, from
        the raw frames the walker recorded (`truncated`: frames toward the root were left out)."""

    def thread_name(self, tid: int) -> Optional[str]:
        """The name the interpreter's program gave the thread, where it gave one."""
