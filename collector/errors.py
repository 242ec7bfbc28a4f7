"""The collector's exceptions; only the CLI turns them into messages and exit codes."""


class CollectorError(Exception):
    """Base of every error the collector reports to the user as one line."""


class SetupError(CollectorError):
    """The machine lacks something profiling needs; the message names the fix."""


class UsageError(CollectorError):
    """The user asked for something that cannot be done (unknown PID, bad path...)."""
