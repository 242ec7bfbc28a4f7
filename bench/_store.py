"""A Pyroscope stand-in on loopback for the agent benchmarks: takes pushes, counts what they
hold, and can be taken down and brought back on the same port."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from bpfprof.collector.agent.pyroscope import PUSH_PATH, PushRequest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackStore:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests = 0
        self.series = 0
        self.bytes = 0
        self._server: Optional[ThreadingHTTPServer] = None

    def up(self) -> None:
        store = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != PUSH_PATH:
                    self.send_response(404)
                else:
                    store.requests += 1
                    store.series += len(PushRequest.FromString(body).series)
                    store.bytes += len(body)
                    self.send_response(200)
                self.send_header("Content-Type", "application/proto")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        """Gone: connections are refused until up() again."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
