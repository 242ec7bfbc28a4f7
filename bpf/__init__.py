"""The BPF side: its C (compiled by bcc at run time) and the numbers its header declares,
read from profile.h so that Python never retypes a layout, a limit or an enum."""

from __future__ import annotations

import re
from importlib import resources
from typing import Dict

BPF_DIR = resources.files("bpfprof.bpf")
HEADER = (BPF_DIR / "profile.h").read_text()
PROGRAM = (BPF_DIR / "profile.bpf.c").read_text()


def enum_names(enum: str) -> Dict[str, int]:
    """Names and values of a C enum in profile.h."""
    body = re.search(r"enum %s \{(.*?)\};" % enum, HEADER, re.S)
    if body is None:
        raise RuntimeError(f"enum {enum} not found in profile.h")
    names, value = {}, -1
    for name, explicit in re.findall(r"^\s*(\w+)\s*(?:=\s*(\d+))?\s*,", body.group(1), re.M):
        value = int(explicit) if explicit else value + 1
        names[name] = value
    return names


def define(name: str) -> int:
    """A number #defined in profile.h."""
    found = re.search(r"^#define %s (\d+)" % name, HEADER, re.M)
    if found is None:
        raise RuntimeError(f"#define {name} not found in profile.h")
    return int(found.group(1))
