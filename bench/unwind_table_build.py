"""How long an unwind table takes to build from .eh_frame, cold and from the on-disk cache, and how big it is.

For every pyenv CPython shared library (~/.pyenv/versions/*/lib/libpython*.so.1.0),
Debian's /usr/bin/python3.11 (static: no libpython) and libc: the table is built --runs
times into an empty cache directory (cold: parse and write the cache file) and read back
as many times (warm). Printed: one row per binary with the size of its .eh_frame, the
table's rows and bytes, the median cold and warm times, and the rows whose rules the BPF
unwinder cannot follow, by kind. With --pyelftools, also the time pyelftools takes to
decode the same CFI into its row tables (what this parser replaces).

    .venv/bin/python bench/unwind_table_build.py [--runs 3] [--pyelftools] [BINARY ...]

Needs neither root nor BPF.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import tempfile
import time
from typing import Callable, List

from elftools.elf.elffile import ELFFile

from _proc import ToolMissing, run_main

from bpfprof.symbolizer.native.unwind_cache import open_unwind_table
from bpfprof.symbolizer.native.unwind_table import UnwindTable

DEBIAN_BINARIES = ("/usr/bin/python3.11", "/lib/x86_64-linux-gnu/libc.so.6")


def default_binaries() -> List[str]:
    pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = sorted(glob.glob(f"{pyenv}/versions/*/lib/libpython*.so.1.0"),
                   key=lambda p: [int(n) if n.isdigit() else n for n in p.replace("/", ".").split(".")])
    return found + [p for p in DEBIAN_BINARIES if os.path.exists(p)]


def median_seconds(action: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def eh_frame_size(path: str) -> int:
    with open(path, "rb") as f:
        section = ELFFile(f).get_section_by_name(".eh_frame")
        return section["sh_size"] if section is not None else 0


def pyelftools_time(path: str) -> str:
    """How long pyelftools takes to parse .eh_frame and decode every FDE into its rule
    table, or that it cannot."""
    started = time.perf_counter()
    with open(path, "rb") as f:
        for entry in ELFFile(f).get_dwarf_info().EH_CFI_entries():
            if hasattr(entry, "get_decoded"):
                try:
                    entry.get_decoded()
                except Exception as e:  # whatever pyelftools raises: the row says it failed
                    return f"fails: {type(e).__name__}"
    return f"{time.perf_counter() - started:.2f}s"


def unsupported_summary(table: UnwindTable) -> str:
    kinds = table.cfa_kind_counts()
    parts = [f"{kind.name.lower()} {n}" for kind, n in sorted(kinds.items()) if not kind.supported]
    total = sum(n for kind, n in kinds.items() if not kind.supported)
    if table.num_rbp_other():
        parts.append(f"(and RBP not recoverable in {table.num_rbp_other()})")
    return f"{100 * total / max(1, table.num_rows()):.3f}% " + (", ".join(parts) if parts else "-")


def cold_build(path: str) -> UnwindTable:
    directory = tempfile.mkdtemp(prefix="bpfprof-unwind-")
    try:
        return open_unwind_table(path, directory)
    finally:
        shutil.rmtree(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binaries", nargs="*", help="binaries to measure (default: pyenv libpythons, python3.11, libc)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pyelftools", action="store_true", help="also time pyelftools' CFI decoding")
    args = parser.parse_args()
    binaries = args.binaries or default_binaries()
    if not binaries:
        raise ToolMissing("no binaries to measure: no pyenv CPython, python3.11 or libc here")

    header = f"{'binary':<28} {'.eh_frame':>10} {'rows':>7} {'table':>9} {'cold':>7} {'warm':>8}"
    header += f" {'pyelftools':>17}" if args.pyelftools else ""
    print(header + "  unsupported rows")
    for path in binaries:
        cold = median_seconds(lambda: cold_build(path), args.runs)
        with tempfile.TemporaryDirectory(prefix="bpfprof-unwind-") as directory:
            table = open_unwind_table(path, directory)
            warm = median_seconds(lambda: open_unwind_table(path, directory), args.runs)
            if not open_unwind_table(path, directory).from_cache:
                raise RuntimeError(f"{path}: the warm build did not read the cache ({table.cache_error or 'not written'})")
        line = (f"{os.path.basename(path):<28} {eh_frame_size(path) / 1024:>8.0f}Ki {table.num_rows():>7}"
                f" {len(table.records()) / 1024:>7.0f}Ki {cold:>6.3f}s {warm * 1000:>6.2f}ms")
        if args.pyelftools:
            line += f" {pyelftools_time(path):>17}"
        print(f"{line}  {unsupported_summary(table)}", flush=True)
    print(f"\ncold: parse the frame sections and write the cache file; warm: read the cache file back "
          f"(medians of {args.runs}); table: 8-byte records (struct unwind_row)")


if __name__ == "__main__":
    run_main(main, "unwind_table_build")
