"""Values in a profile's units as people read them: ms and s for nanoseconds, KB and MB
for bytes, plain numbers for counts."""

from __future__ import annotations

_SECONDS = {"nanoseconds": 1e-9, "microseconds": 1e-6, "milliseconds": 1e-3, "seconds": 1.0}
_BYTES = (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10))


def format_value(value: float, unit: str) -> str:
    if value == 0:
        return "0"
    if unit in _SECONDS:
        seconds = value * _SECONDS[unit]
        if abs(seconds) >= 1:
            return f"{seconds:.2f} s"
        return f"{seconds * 1e3:.2f} ms" if abs(seconds) >= 0.01 else f"{seconds * 1e3:.3f} ms"
    if unit == "bytes":
        for name, size in _BYTES:
            if abs(value) >= size:
                return f"{value / size:.1f} {name}"
        return f"{value:.0f} B"
    return f"{value:.0f}" if value == int(value) else f"{value:.2f}"
