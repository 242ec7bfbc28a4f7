"""Line tables decoded without an interpreter, checked against the interpreters' own
answers: each installed CPython 3.6-3.13 compiles one source and reports, per code
object, its raw table and which line every instruction is on."""

import json
import os
import subprocess

import pytest

from bpfprof.symbolizer.interpreters.python.lines import OPEN_END, line_for_offset, line_table
from conftest import PYTHON_MINORS, STATIC_PYTHON, pyenv_python, skip_or_fail

# name -> (minor of a pyenv build, or None for Debian's static python3, its version)
INTERPRETERS = {f"pyenv-3.{minor}": (minor, (3, minor)) for minor in PYTHON_MINORS}
INTERPRETERS["debian-3.11"] = (None, (3, 11))

# Blank stretches long enough for line deltas beyond a signed byte, both ways (the
# jump back to a loop head), and a line whose bytecode exceeds 255 bytes.
GAP = "\n" * 200
MANY_NAMES = ", ".join(f"v{i}" for i in range(150))

SOURCE = f'''\
import functools
{GAP}
def decorator(f):
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)
    return wrapper


@decorator
@functools.lru_cache(maxsize=None)
def loops(n):
    total = 0
    for i in range(n):
        if i % 2:

            total += i
        else:
            continue
    while total > 10:
        total -= 3
    return total


def multiline(a, b):
    value = (
        a
        +
        b
    )
    call = max(
        a,

        b,
    )
    return {{
        "x": value,
        "y": call,
    }}


def errors(x):
    try:
        y = 1 / x
    except ZeroDivisionError as exc:
        y = str(exc)
    except (TypeError, ValueError):
        raise
    else:
        y += 1
    finally:
        x = None
    with open(__file__) as f:
        f.read()
    return y


def nested(k):
    def inner(m):
        def innermost():
            return m * k
        return innermost
    squares = [i * i for i in range(k) if i]
    table = {{i: [j for j in range(i)] for i in range(k)}}
    gen = (x + 1 for x in squares)
    key = lambda item: (
        item,
        -item,
    )
    return inner, squares, table, sorted(gen, key=key)


class Thing:
    attr = 1

    def method(self):
        return self.attr

    @property
    def prop(self):
        return [
            self.attr
            for _ in range(3)
        ]


async def coroutine(source):
    async for item in source:
        await item
    return f"{{source!r}} done"


def generator():
    yield 1
    yield from range(3)
{GAP}
def long_function({MANY_NAMES}):
    first = 1
{GAP}
    second = ({MANY_NAMES})
{GAP}
    for i in range(3):
        a = i
{GAP}
        b = i
{GAP}
    third = [{MANY_NAMES}]
    return first, second, third, a, b


def long_loop(n):
    while n:
        n -= 1
{GAP}
        if n == 5:
            break
    return n
'''

# Runs inside each interpreter under test (so it must stay 3.6-compatible).
DUMPER = r'''
import dis, json, sys

def dump(code, out):
    entry = {"name": code.co_name, "firstlineno": code.co_firstlineno}
    if sys.version_info >= (3, 10):
        entry["table"] = code.co_linetable.hex()
        entry["lines"] = list(code.co_lines())
    else:
        entry["table"] = code.co_lnotab.hex()
        entry["starts"] = list(dis.findlinestarts(code))
        entry["offsets"] = [i.offset for i in dis.get_instructions(code)]
    out.append(entry)
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            dump(const, out)

codes = []
dump(compile(sys.stdin.read(), "lines_fixture.py", "exec"), codes)
json.dump({"version": list(sys.version_info[:2]), "codes": codes}, sys.stdout)
'''


def _expected_lines(entry):
    """{byte offset: line} for every instruction, per the interpreter; 0 for no line."""
    if "lines" in entry:
        return {offset: line or 0
                for start, end, line in entry["lines"]
                for offset in range(start, end, 2)}
    starts = sorted(entry["starts"])
    expected = {}
    for offset in entry["offsets"]:
        expected[offset] = [line for start, line in starts if start <= offset][-1]
    return expected


def _line_spans(ranges):
    """Adjacent ranges on the same line joined: the stretches a table had to split."""
    spans = []
    for start, end, line in ranges:
        if spans and spans[-1][2] == line and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end, line)
        else:
            spans.append((start, end, line))
    return spans


@pytest.mark.parametrize("name", sorted(INTERPRETERS))
def test_matches_interpreter(name):
    minor, version = INTERPRETERS[name]
    if minor is not None:
        python = pyenv_python(minor)
    elif os.path.isfile(STATIC_PYTHON):
        python = STATIC_PYTHON
    else:
        skip_or_fail(f"no {STATIC_PYTHON}")
    result = subprocess.run([str(python), "-I", "-c", DUMPER], input=SOURCE,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    dumped = json.loads(result.stdout)
    assert tuple(dumped["version"]) == version

    big_line_step = big_offset_step = False
    for entry in dumped["codes"]:
        table = bytes.fromhex(entry["table"])
        firstlineno = entry["firstlineno"]
        expected = _expected_lines(entry)
        assert expected, entry["name"]
        actual = {offset: line_for_offset(version, table, firstlineno, offset) for offset in expected}
        assert actual == expected, entry["name"]
        assert line_for_offset(version, table, firstlineno, -2) == firstlineno

        spans = _line_spans(line_table(version, table, firstlineno))
        lines = [line for _, _, line in spans if line]
        big_line_step |= any(abs(b - a) > 127 for a, b in zip(lines, lines[1:]))
        big_offset_step |= any(end - start > 255 for start, end, _ in spans if end != OPEN_END)
    # The fixture really exercises the multi-entry encodings of large steps.
    assert big_line_step and big_offset_step


def test_hand_made_lnotab_and_310_tables():
    table = bytes([6, 1, 0, 2, 4, -3 & 0xFF])
    assert line_table((3, 8), table, 10) == [(0, 6, 10), (6, 10, 13), (10, OPEN_END, 10)]
    table = bytes([4, 0, 6, 2, 2, 0x80, 0, 5, 4, 1])
    assert line_table((3, 10), table, 10) == [(0, 4, 10), (4, 10, 12), (10, 12, 0), (12, 16, 18)]


def test_negative_offset_is_firstlineno():
    for version in ((3, 8), (3, 9), (3, 10), (3, 11), (3, 12), (3, 13)):
        assert line_for_offset(version, b"", 42, -1) == 42


def test_empty_table():
    # 3.6-3.9: no pairs, so every instruction is on co_firstlineno.
    assert line_for_offset((3, 9), b"", 7, 0) == 7
    assert line_for_offset((3, 9), b"", 7, 100) == 7
    # 3.10+: no ranges, so no instruction has a line.
    assert line_for_offset((3, 10), b"", 7, 0) == 0
    assert line_for_offset((3, 12), b"", 7, 0) == 0


def test_location_table_forms():
    firstlineno = 100
    table = bytes([
        0x80 | (0 << 3) | 1, 0x12,          # short form, 2 units, same line
        0x80 | (12 << 3) | 0, 4, 9,         # one-line form, +2
        0x80 | (13 << 3) | 2, 0x40 | 1, 1,  # no columns, signed varint -32 (0b1000001)
        0x80 | (15 << 3) | 0,               # no location
        0x80 | (14 << 3) | 0, 6, 0, 1, 3,   # long form, +3
    ])
    assert line_table((3, 11), table, firstlineno) == [
        (0, 4, 100), (4, 6, 102), (6, 12, 70), (12, 14, 0), (14, 16, 73)]
    assert line_for_offset((3, 14), table, firstlineno, 7) == 70  # unknown 3.x >= 3.11
    assert line_for_offset((3, 11), table, firstlineno, 16) == 0  # past the table


def test_old_versions_rejected():
    with pytest.raises(ValueError):
        line_table((3, 5), b"", 1)


def test_a_varint_of_a_megabyte_is_read_in_one_pass():
    """A hostile line table: one entry whose line delta runs on for a megabyte (each byte
    continues the varint). Its bits past a line's are dropped, so the read is linear."""
    entry = bytes([0x80 | (13 << 3)]) + b"\x7f" * (1 << 20) + b"\x00"  # code 13: no columns, a varint
    (start, end, line), = line_table((3, 12), entry, 10)
    assert (start, end) == (0, 2) and abs(line) < 1 << 36
