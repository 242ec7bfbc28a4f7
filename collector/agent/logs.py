"""The agent's structured logs: one JSON object per line, to stderr or a file reopened on SIGHUP."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Optional

LOGGER = "bpfprof.agent"
log = logging.getLogger(LOGGER)


class JsonFormatter(logging.Formatter):
    """{"time", "level", "msg", then the record's `fields` (extra={"fields": {...}})}."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class LogFile(logging.FileHandler):
    """A log file that can be reopened after logrotate moved it away."""

    def reopen(self) -> None:
        with self.lock:
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()


def setup_logging(path: Optional[str], level: str) -> Optional[LogFile]:
    """Send the agent's logs to `path` (stderr when None); returns the file handler to reopen."""
    handler: logging.Handler = LogFile(path, encoding="utf-8") if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    return handler if isinstance(handler, LogFile) else None
