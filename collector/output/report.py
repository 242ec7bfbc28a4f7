"""Tables of functions for a terminal: one profile's self and total, or the change between
two, aligned and cut to the terminal's width."""

from __future__ import annotations

from typing import List, Sequence, Tuple

from bpfprof.collector.output.functions import DiffRow, Row
from bpfprof.collector.output.units import format_value
from bpfprof.symbolizer.text import printable

MIN_TEXT = 12  # narrowest a function or file column gets, however narrow the terminal


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def _layout(numbers: List[Tuple[str, ...]], texts: List[Tuple[str, str]], headers: Sequence[str],
            width: int) -> List[str]:
    """Right-aligned number columns, then the function and its place, both cut so that each
    line fits `width` (the place first, as the name matters more). Names come from profiled
    processes: they are printed escaped."""
    texts = [(printable(name), printable(where)) for name, where in texts]
    n = len(headers) - 2
    widths = [max([len(headers[i])] + [len(r[i]) for r in numbers]) for i in range(n)]
    fixed = sum(widths) + 2 * n
    name_width = max([len(headers[n])] + [len(t[0]) for t in texts])
    where_width = max([len(headers[n + 1])] + [len(t[1]) for t in texts])
    room = max(width - fixed - 2, 2 * MIN_TEXT)
    if name_width + where_width > room:
        where_width = max(min(where_width, room // 3), MIN_TEXT)
        name_width = max(room - where_width, MIN_TEXT)
    lines = []
    for cells, (name, where) in [(tuple(headers[:n]), tuple(headers[n:])), *zip(numbers, texts)]:
        numbers_part = "  ".join(c.rjust(w) for c, w in zip(cells, widths))
        lines.append(f"{numbers_part}  {_cut(name, name_width).ljust(name_width)}  {_cut(where, where_width)}".rstrip())
    return lines


def format_table(rows: Sequence[Row], total: int, unit: str, width: int = 100) -> str:
    """Self %, Self, Total %, Total, Function, File:line or module."""
    numbers = [(_percent(r.self, total), format_value(r.self, unit), _percent(r.total, total),
                format_value(r.total, unit)) for r in rows]
    texts = [(r.function.display_name, r.function.where) for r in rows]
    headers = ("Self %", "Self", "Total %", "Total", "Function", "File:line or module")
    return "\n".join(_layout(numbers, texts, headers, width))


def _change(points: float) -> str:
    return f"{100 * points:+.2f}"


def format_diff_table(rows: Sequence[DiffRow], width: int = 100) -> str:
    """The change of each function's share of the whole, in percentage points, with the
    shares before and after."""
    numbers = [(_change(r.change("self")), f"{100 * r.share('base', 'self'):.2f} → {100 * r.share('new', 'self'):.2f}",
                _change(r.change("total")), f"{100 * r.share('base', 'total'):.2f} → {100 * r.share('new', 'total'):.2f}")
               for r in rows]
    texts = [(r.function.display_name, r.function.where) for r in rows]
    headers = ("Self Δ", "Self % base → new", "Total Δ", "Total % base → new", "Function", "File:line or module")
    return "\n".join(_layout(numbers, texts, headers, width))
