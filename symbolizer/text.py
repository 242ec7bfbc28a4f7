"""Names that came from profiled processes (comm, thread names, symbols, paths, Python
qualnames) or from a profile file, made safe to print: control characters and the
characters that reorder text on a terminal are written as escapes, so that no name can
start a new line of output or send a terminal a command."""

from __future__ import annotations

# C0 controls and DEL, C1 controls, and the bidirectional embeddings, overrides and isolates.
_UNSAFE = [*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = {code: (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}") for code in _UNSAFE}


def printable(text: str) -> str:
    """The text with every unsafe character written as its escape (\\x1b, \\u202e)."""
    return text.translate(_ESCAPES)
