"""Errors the symbolizer raises for a file it cannot use."""


class SymbolizerError(Exception):
    """A binary or debug file that cannot be read or parsed; the message says why."""
