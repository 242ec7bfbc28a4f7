"""Fuzz: pprof files that our writer made, with one mutation each (in the protobuf
message, its bytes, or the gzip stream around them), read as `bpfprof report` reads a
profile: loaded, narrowed, tabled and formatted. A result or a UsageError (which the CLI
tells in one line), nothing else."""

from __future__ import annotations

import gzip

from fuzzing import Case, INTERESTING_WORDS, assert_no_failures, case_rng, mutate, run_family
from bpfprof.collector.errors import UsageError
from bpfprof.collector.output.functions import diff_rows, function_rows, narrow
from bpfprof.collector.output.pprof import load_profile, to_pprof
from bpfprof.collector.output.pprof_schema import PprofProfile
from bpfprof.collector.output.report import format_diff_table, format_table
from bpfprof.collector.profile import Labels, block_profile, cpu_profile
from bpfprof.symbolizer.frames import Frame, FrameKind, Module

CASES = 1600
APP, KERNEL = Module("/usr/bin/app", "ab12cd34"), Module("[kernel.kallsyms]")
# Native frames with and without lines, a kernel frame and a Python frame.
MAIN, WORK, UNKNOWN, READ, CALC = (
    Frame(kind, name, module, address, file, line, start)
    for kind, name, module, address, file, line, start in (
        (FrameKind.NATIVE, "main", APP, 0x1100, "app.c", 30, 28),
        (FrameKind.NATIVE, "work", APP, 0x1200, "app.c", 12, 10),
        (FrameKind.NATIVE, "[app+0x1300]", APP, 0x1300, "", 0, 0),
        (FrameKind.KERNEL, "ksys_read", KERNEL, 0xFFFFFFFF81000000, "", 0, 0),
        (FrameKind.PYTHON, "Handler.calc", None, 0, "app.py", 41, 39)))
A, B = Labels(10, 11, "app", "worker", (("pod", "web-1"),)), Labels(20, 20, "other", "other")


def messages():
    cpu = cpu_profile(hz=99, start_ns=1)
    for stack, labels, n in (((WORK, MAIN), A, 40), ((READ, WORK, MAIN), A, 20), ((CALC, MAIN), B, 15),
                             ((UNKNOWN, WORK, WORK, MAIN), B, 5)):
        cpu.add(stack, labels, [n, n * 10_000_000])
    block = block_profile(start_ns=1)
    block.add((READ, CALC, MAIN), A, [3, 5_000_000])
    return [to_pprof(cpu), to_pprof(block)]


def _scalar_fields(message, path=""):
    """(message, field name, place) of every integer field set in a message and the
    messages in it, repeated fields by element."""
    found = []
    for field, value in message.ListFields():
        name = f"{path}{field.name}"
        if field.message_type is not None:
            items = value if field.is_repeated else [value]
            for i, item in enumerate(items):
                found += _scalar_fields(item, f"{name}[{i}].")
        elif field.cpp_type in (field.CPPTYPE_INT64, field.CPPTYPE_UINT64, field.CPPTYPE_INT32, field.CPPTYPE_UINT32):
            found.append((message, field, name))
    return found


def mutate_message(rng, message) -> str:
    """One change that keeps the message well-formed protobuf: a field emptied, an integer
    set to an interesting value, an element duplicated or one string made strange."""
    kind = rng.randrange(4)
    if kind == 0:
        name = rng.choice(["sample_type", "sample", "mapping", "location", "function", "string_table",
                           "period_type", "default_sample_type"])
        message.ClearField(name)
        return f"{name} cleared"
    if kind == 1:
        target, field, name = rng.choice(_scalar_fields(message))
        bits = 32 if field.cpp_type in (field.CPPTYPE_INT32, field.CPPTYPE_UINT32) else 64
        signed = field.cpp_type in (field.CPPTYPE_INT32, field.CPPTYPE_INT64)
        value = rng.choice(INTERESTING_WORDS + (len(message.string_table), -1)) % (1 << bits)
        if signed and value >= 1 << (bits - 1):
            value -= 1 << bits
        if field.is_repeated:
            values = getattr(target, field.name)
            values[rng.randrange(len(values))] = value
        else:
            setattr(target, field.name, value)
        return f"{name} = {value}"
    if kind == 2:
        name = rng.choice(["sample", "location", "function", "mapping", "sample_type"])
        items = getattr(message, name)
        if items:
            items.add().CopyFrom(items[rng.randrange(len(items))])
        return f"a {name} duplicated"
    index = rng.randrange(len(message.string_table))
    message.string_table[index] = rng.choice(["", "\x1b[2J", "a\nb", "\ud7ff" * 3, "x" * 5000, "[", "(?"])
    return f"string {index} changed"


def make_case(bases, number: int) -> Case:
    rng = case_rng("pprof", number)
    message = PprofProfile()
    message.CopyFrom(rng.choice(bases))
    where = rng.randrange(4)
    if where == 0:
        what = mutate_message(rng, message)
        data = gzip.compress(message.SerializeToString(), mtime=0)
    elif where == 1:
        raw = bytearray(message.SerializeToString())
        what, raw = mutate(rng, raw, 0, len(raw))
        what = f"protobuf bytes: {what}"
        data = gzip.compress(bytes(raw), mtime=0)
    elif where == 2:
        raw = bytearray(message.SerializeToString())
        what, raw = mutate(rng, raw, 0, len(raw))
        what = f"protobuf bytes, not gzipped: {what}"
        data = bytes(raw)
    else:
        what, data = mutate(rng, bytearray(gzip.compress(message.SerializeToString(), mtime=0)), 0, 0)
        what = f"gzip bytes: {what}"
    return Case(what, bytes(data))


def report(path: str) -> None:
    """What `bpfprof report` does with a file: the table, narrowed, and a diff."""
    profile = load_profile(path)
    rows = function_rows(profile)
    format_table(rows, profile.total(), profile.main_type.unit, 100)
    for sample_type in [None] + [t.type for t in profile.sample_types]:
        narrowed = narrow(profile, (10,), "work|calc", sample_type)
        format_table(function_rows(narrowed), narrowed.total(), narrowed.main_type.unit, 60)
    format_diff_table(diff_rows(profile, narrow(profile, (20,))), 80)


def test_mutated_pprof_files_give_a_report_or_one_usage_error(tmp_path):
    bases = messages()
    path = tmp_path / "profile.pb.gz"

    def run(case: Case) -> None:
        path.write_bytes(case.data)
        report(str(path))

    def warm_up() -> None:
        for message in bases:
            path.write_bytes(gzip.compress(message.SerializeToString()))
            report(str(path))

    failures = run_family("pprof", CASES, lambda n: make_case(bases, n), run, (UsageError,), warm_up)
    assert_no_failures("pprof", failures)
