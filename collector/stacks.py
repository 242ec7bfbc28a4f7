"""Raw samples from the sampler to symbolized stacks with their labels."""

from __future__ import annotations

from typing import Iterable, List, Tuple

from bpfprof.collector.processes import ProcessTable
from bpfprof.collector.profile import Frame, FrameKind, Labels, Module, Stack
from bpfprof.collector.sampler import RawSample
from bpfprof.symbolizer.kernel import KernelSymbols
from bpfprof.symbolizer.native import NativeSymbolizer


def _lookup_addresses(stack: Tuple[int, ...]) -> Iterable[int]:
    """Callers' entries are return addresses, which may already belong to the next
    function (after a call to a noreturn function); look up the call instead."""
    for i, address in enumerate(stack):
        yield address if i == 0 else address - 1


class StackResolver:
    def __init__(self, processes: ProcessTable, native: NativeSymbolizer, kernel: KernelSymbols):
        self._processes = processes
        self._native = native
        self._kernel = kernel

    def resolve(self, sample: RawSample) -> Tuple[Stack, Labels]:
        process = self._processes.get(sample.pid, sample.thread_name)
        frames: List[Frame] = [self._kernel.get_frame(a) for a in _lookup_addresses(sample.kernel_stack)]
        if sample.user_stack and not process.readable:
            name = f"[{process.comm or sample.pid}: process exited before it could be read]"
            frames.append(Frame(FrameKind.NATIVE, name))
        elif sample.user_stack:
            frames.extend(self._user_frame(sample.pid, a) for a in _lookup_addresses(sample.user_stack))
        labels = Labels(sample.pid, sample.tid, process.comm or sample.thread_name, sample.thread_name)
        return tuple(frames), labels

    def _user_frame(self, pid: int, address: int) -> Frame:
        mapping = self._processes.get_mapping(pid, address)
        if mapping is None:
            return Frame(FrameKind.NATIVE, f"[unmapped {address:#x}]")
        offset = address - mapping.start + mapping.offset
        if mapping.obj is None:
            return Frame(FrameKind.NATIVE, f"[{mapping.name}+{offset:#x}]", Module(mapping.name), offset)
        return self._native.get_frame(mapping.obj, offset)
