"""Names from profiled processes and profile files, made safe to print."""

from bpfprof.symbolizer.text import printable


def test_controls_and_reordering_characters_are_escaped():
    assert printable("a\nb\r\x1b[31m\x7f\x85\u202e\u2066") == "a\\x0ab\\x0d\\x1b[31m\\x7f\\x85\\u202e\\u2066"


def test_everything_else_is_kept():
    names = ["main", "ns::work<a;b>", "grö\u00dfe", "\u30b9\u30ec\u30c3\u30c9", "n\u00e4\U0001f9f5", "\\x41"]
    assert [printable(name) for name in names] == names


def test_nothing_printed_is_below_space():
    assert all(ord(c) >= 0x20 for c in printable("".join(map(chr, range(0x300)))))
