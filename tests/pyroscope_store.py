"""A Pyroscope stand-in on loopback for the tests, and the push request as protoc decodes it
from our transcription of Pyroscope's .proto files (independent of the agent's encoder)."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from conftest import FIXTURES, skip_or_fail

PROTOS = FIXTURES / "pyroscope"
OK = (200, "")


@dataclass
class Received:
    method: str
    path: str
    headers: Message
    body: bytes


class _StoreHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, code = self.server.store.answer(Received(self.command, self.path, self.headers, body))
        if status == 200:  # an empty PushResponse
            payload, content_type = b"", "application/proto"
        elif code:  # a Connect error
            payload = json.dumps({"code": code, "message": f"stand-in says {code}"}).encode()
            content_type = "application/json"
        else:  # a proxy's error page
            payload, content_type = b"<html>bad gateway</html>", "text/html"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if 300 <= status < 400:
            self.send_header("Location", "http://127.0.0.1:1/elsewhere")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass  # quiet test output


class Store:
    """A Pyroscope stand-in: records every request; answers (status, Connect code) from
    `answers` in turn, then 200."""

    def __init__(self, answers: Sequence[Tuple[int, str]] = (), tls_files: Optional[Tuple[Path, Path]] = None):
        self.requests: List[Received] = []
        self._answers = list(answers)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _StoreHandler)
        self.server.store = self
        scheme = "http"
        if tls_files:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls_files)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def answer(self, request: Received) -> Tuple[int, str]:
        with self._lock:
            self.requests.append(request)
            return self._answers.pop(0) if self._answers else OK

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def push_request_class(tmp: Path):
    """push.v1.PushRequest as protoc compiles our transcription of Pyroscope's .proto files."""
    if shutil.which("protoc") is None:
        skip_or_fail("protoc is not installed (apt-get install protobuf-compiler)")
    descriptors = tmp / "push.desc"
    subprocess.run(["protoc", f"-I{PROTOS}", "--include_imports", f"--descriptor_set_out={descriptors}",
                    "push/v1/push.proto"], check=True)
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes()).file:
        pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("push.v1.PushRequest"))


def decode_with_protoc(body: bytes, message_class):
    """The body as `protoc --decode=push.v1.PushRequest` reads it; its text parsed back."""
    result = subprocess.run(["protoc", f"-I{PROTOS}", "--decode=push.v1.PushRequest", "push/v1/push.proto"],
                            input=body, capture_output=True, check=True)
    return text_format.Parse(result.stdout.decode(), message_class())
