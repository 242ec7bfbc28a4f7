"""Tells systemd that the agent is ready, and after each drain that it still profiles
(sd_notify(3): READY=1, WATCHDOG=1), when the unit gives it a notification socket
(Type=notify and WatchdogSec= in deploy/systemd/bpfprof-agent.service)."""

from __future__ import annotations

import os
import socket
from typing import Mapping

from bpfprof.collector.agent.logs import log


class ServiceManager:
    def __init__(self, environ: Mapping[str, str] = os.environ):
        address = environ.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace, whose name starts with a NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._ready = False
        self._failing = False

    def drained(self) -> None:
        """Called after each drain: READY=1 with the first (sampling has begun), WATCHDOG=1 with
        each. A stalled drain sends nothing, and systemd restarts the agent past WatchdogSec."""
        if not self._address:
            return
        message = b"WATCHDOG=1" if self._ready else b"READY=1\nWATCHDOG=1"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
                notify.sendto(message, self._address)
        except OSError as error:
            if not self._failing:  # once while it fails: it is tried again every drain
                log.warning("cannot notify systemd", extra={"fields": {"error": str(error)}})
            self._failing = True
            return
        self._ready, self._failing = True, False
