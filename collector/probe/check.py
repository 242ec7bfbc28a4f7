"""`bpfprof check`: what profiling needs, whether this machine has it, and the fix if not."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Callable, List, Tuple

from bpfprof.collector.errors import CollectorError, SetupError
from bpfprof.collector.probe.kernel_headers import find_kernel_headers

TRACEFS = "/sys/kernel/tracing"
BTF = "/sys/kernel/btf/vmlinux"

_CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 38, 39
_SYS_BPF, _SYS_PERF_EVENT_OPEN = 321, 298  # x86-64
_BPF_MAP_CREATE, _BPF_MAP_TYPE_ARRAY = 0, 2
_PERF_TYPE_SOFTWARE, _PERF_COUNT_SW_CPU_CLOCK = 1, 0

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def has_privileges() -> bool:
    caps = _effective_caps()
    return os.geteuid() == 0 or bool(caps >> _CAP_SYS_ADMIN & 1) or (
        bool(caps >> _CAP_BPF & 1) and bool(caps >> _CAP_PERFMON & 1)
    )


def _check_privileges() -> Check:
    ok = has_privileges()
    return Check("privileges", ok, "root" if os.geteuid() == 0 else ("capabilities" if ok else "not root"),
                 "run as root: sudo bpfprof ... (or grant CAP_BPF and CAP_PERFMON)")


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


def _check_bpf_syscall() -> Check:
    # union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
    attr = (ctypes.c_uint32 * 32)(_BPF_MAP_TYPE_ARRAY, 4, 4, 1)
    fd = _libc.syscall(_SYS_BPF, _BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        return Check("bpf() syscall", False, _errno_text(),
                     "run as root on the host, not in a user namespace; the kernel needs CONFIG_BPF_SYSCALL=y")
    os.close(fd)
    return Check("bpf() syscall", True, "maps can be created")


def _check_perf_events() -> Check:
    # struct perf_event_attr: type, size, config; then sample_period/freq (unused here).
    attr = (ctypes.c_uint32 * 32)()
    attr[0], attr[1], attr[2] = _PERF_TYPE_SOFTWARE, ctypes.sizeof(attr), _PERF_COUNT_SW_CPU_CLOCK
    fd = _libc.syscall(_SYS_PERF_EVENT_OPEN, ctypes.byref(attr), -1, 0, -1, 0)
    if fd < 0:
        return Check("perf events", False, f"cpu-clock on CPU 0: {_errno_text()}",
                     "run as root, or: sysctl kernel.perf_event_paranoid=-1")
    os.close(fd)
    return Check("perf events", True, "cpu-clock can be opened on every CPU")


def _check_tracefs() -> Check:
    ok = os.path.isdir(os.path.join(TRACEFS, "events/sched"))
    return Check("tracefs", ok, TRACEFS if ok else f"{TRACEFS} not mounted",
                 f"mount -t tracefs tracefs {TRACEFS}")


def _check_headers() -> Check:
    try:
        return Check("kernel headers", True, find_kernel_headers().description)
    except CollectorError as e:
        return Check("kernel headers", False, "none found", str(e))


def _check_btf() -> Check:
    ok = os.path.exists(BTF)
    return Check("BTF", ok, BTF if ok else "no kernel BTF",
                 "a kernel built with CONFIG_DEBUG_INFO_BTF=y (needed for CPython thread lookup)")


def _check_bcc() -> Check:
    try:
        import bcc
    except ImportError:
        return Check("bcc", False, "python module not found",
                     "apt-get install python3-bpfcc, and a venv made with --system-site-packages")
    return Check("bcc", True, f"{getattr(bcc, '__version__', '?')} ({os.path.dirname(bcc.__file__)})")


def _check_unwind_tables() -> Check:
    from bpfprof.collector.probe.sampler import SamplerConfig

    config = SamplerConfig()
    return Check("unwind tables", True,
                 f"{config.unwind_memory_bytes() / 2**20:.1f} MiB of kernel memory when recording "
                 f"starts: {config.unwind_rows} rows (--unwind-rows), {config.unwind_mappings} mappings, "
                 f"{config.native_stack_entries()} native stacks per buffer (--no-dwarf: none)")


CHECKS: Tuple[Callable[[], Check], ...] = (
    _check_privileges, _check_bpf_syscall, _check_perf_events, _check_tracefs,
    _check_headers, _check_btf, _check_bcc, _check_unwind_tables,
)


def run_checks() -> List[Check]:
    return [check() for check in CHECKS]


def require_kernel_support() -> None:
    """SetupError naming the fix when this process may not use bpf() or perf events."""
    for check in (_check_bpf_syscall, _check_perf_events):
        result = check()
        if not result.ok:
            raise SetupError(f"cannot use {result.name} ({result.detail}): {result.fix}")


def mount_tracefs() -> None:
    """bcc reads tracepoint formats from tracefs; mount it where it is missing."""
    if not os.path.isdir(os.path.join(TRACEFS, "events")):
        if _libc.mount(b"tracefs", TRACEFS.encode(), b"tracefs", 0, None) != 0:
            raise SetupError(f"tracefs is not mounted and mounting it failed ({_errno_text()}): "
                                 f"mount -t tracefs tracefs {TRACEFS}")
