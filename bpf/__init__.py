"""The BPF side: its C (compiled by bcc at run time as one program) and the numbers its
header declares, read from common.h so that Python never retypes a layout, a limit or an
enum."""

from __future__ import annotations

import re
from importlib import resources
from typing import Dict

BPF_DIR = resources.files("bpfprof.bpf")
HEADER = (BPF_DIR / "common.h").read_text()
# One file per concern, each using only those before it.
SOURCES = ("common", "python", "unwind", "cpu", "offcpu", "memory", "lifecycle")
PROGRAM = "\n".join(f'#line 1 "{name}.bpf.c"\n' + (BPF_DIR / f"{name}.bpf.c").read_text() for name in SOURCES)
# Maps kept twice, one per buffer, and the array of the two that samples reach them by.
BUFFERED_MAPS = tuple(re.findall(r'^BPF_ARRAY_OF_MAPS\((\w+), "\1_0", 2\);', PROGRAM, re.M))
if len(BUFFERED_MAPS) != PROGRAM.count("BPF_ARRAY_OF_MAPS("):
    raise RuntimeError("every BPF_ARRAY_OF_MAPS must be a pair: BPF_ARRAY_OF_MAPS(name, \"name_0\", 2);")


def enum_names(enum: str) -> Dict[str, int]:
    """Names and values of a C enum in common.h."""
    body = re.search(r"enum %s \{(.*?)\};" % enum, HEADER, re.S)
    if body is None:
        raise RuntimeError(f"enum {enum} not found in common.h")
    names, value = {}, -1
    for name, explicit in re.findall(r"^\s*(\w+)\s*(?:=\s*(\d+))?\s*,", body.group(1), re.M):
        value = int(explicit) if explicit else value + 1
        names[name] = value
    return names


def define(name: str) -> int:
    """A number #defined in common.h."""
    found = re.search(r"^#define %s (\d+)" % name, HEADER, re.M)
    if found is None:
        raise RuntimeError(f"#define {name} not found in common.h")
    return int(found.group(1))
