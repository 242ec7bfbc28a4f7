"""Errors the symbolizer raises for input it cannot use: a binary, a debug file, another
process's memory. Every parser of untrusted input raises only these (or OSError from
the operating system); anything else escaping one is a bug, which containment counts
and which strict mode (BPFPROF_STRICT=1, the tests) lets through."""


class SymbolizerError(Exception):
    """Input that cannot be read or used; the message says why."""


class MalformedInput(SymbolizerError):
    """Data that breaks the rules of its format (ELF, DWARF, a CPython structure)."""


class Unsupported(SymbolizerError):
    """Input of a kind that is not read (a free-threaded CPython), said once where it enters."""


class TooLarge(SymbolizerError):
    """A size read from the input is over what is accepted; nothing of it was allocated."""


class NotRegularFile(SymbolizerError):
    """A file of another process that is no regular file (a FIFO, a device, a symlink
    where none is followed): never opened for reading."""
