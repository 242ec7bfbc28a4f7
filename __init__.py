"""bpfprof: an eBPF whole-system sampling profiler (kernel, native and Python frames)."""

__version__ = "0.1.0"
