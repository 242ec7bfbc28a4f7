"""Grafana Pyroscope's push API: the request as its push.proto defines it, sent the way
its Connect server takes a unary call, with credentials that never come from the command line."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from typing import Mapping, Optional, Sequence, Tuple

from bpfprof import __version__
from bpfprof.collector.errors import CollectorError, UsageError
from bpfprof.collector.output.pprof_schema import message_classes

log = logging.getLogger("bpfprof.agent")

# Field numbers as in Pyroscope's api/push/v1/push.proto and api/types/v1/types.proto.
# RawProfileSeries.annotations (3) is left out: the store drops annotations that are pushed.
_PUSH_MESSAGES = message_classes({
    "types.v1": {
        "LabelPair": [(1, "name", "string", False), (2, "value", "string", False)],
    },
    "push.v1": {
        "PushRequest": [(1, "series", "RawProfileSeries", True)],
        "RawProfileSeries": [(1, "labels", "types.v1.LabelPair", True), (2, "samples", "RawSample", True)],
        "RawSample": [(1, "raw_profile", "bytes", False), (2, "ID", "string", False)],
    },
})
PushRequest = _PUSH_MESSAGES["push.v1.PushRequest"]

PUSH_PATH = "/push.v1.PusherService/Push"
# The store rejects a series without a profile type (__name__) or a service name.
REQUIRED_LABELS = ("__name__", "service_name")
# Pyroscope's rule for tenant IDs (at most 150 of these characters; "." and ".." are not IDs).
_TENANT_ID = re.compile(r"[A-Za-z0-9!\-_.*'()]{1,150}")
# Connect error codes worth another try, as Grafana Alloy's pyroscope.write retries them.
_RETRYABLE_CODES = {
    "deadline_exceeded", "unknown", "resource_exhausted", "internal", "unavailable", "data_loss", "aborted",
}


@dataclass(frozen=True)
class Series:
    """One profile of one service and profile type, as the store indexes it."""

    labels: Tuple[Tuple[str, str], ...]  # includes ("__name__", "process_cpu"), ("service_name", ...)
    profile: bytes  # one gzipped pprof

    def __post_init__(self) -> None:
        names = [name for name, _ in self.labels]
        values = dict(self.labels)
        missing = [name for name in REQUIRED_LABELS if not values.get(name)]
        if missing:
            raise ValueError(f"a series needs the labels {', '.join(missing)}: {self.labels}")
        if len(set(names)) != len(names):
            raise ValueError(f"a series names a label twice: {self.labels}")


def encode_push_request(series: Sequence[Series]) -> bytes:
    """push.v1.PushRequest with one RawProfileSeries (one sample) per series, labels in their order."""
    request = PushRequest()
    for one in series:
        raw_series = request.series.add()
        for name, value in one.labels:
            raw_series.labels.add(name=name, value=value)
        raw_series.samples.add(raw_profile=one.profile)
    return request.SerializeToString()


@dataclass(frozen=True)
class Credentials:
    """Basic auth (username and password) or a bearer token, or nothing."""

    username: str = ""
    password: str = ""
    token: str = ""

    def __post_init__(self) -> None:
        if bool(self.username) != bool(self.password):
            raise UsageError("push credentials need both a username and a password")
        if self.token and self.username:
            raise UsageError("push credentials are a username and password or a token, not both")

    def __repr__(self) -> str:
        return f"Credentials({self.scheme or 'none'})"

    @property
    def scheme(self) -> str:
        """"Basic", "Bearer", or "" without credentials."""
        return "Basic" if self.username else "Bearer" if self.token else ""

    def authorization(self) -> str:
        """The Authorization header's value; "" without credentials."""
        if self.username:
            return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Bearer {self.token}" if self.token else ""

    @classmethod
    def load(cls, username_file: str = "", password_file: str = "", token_file: str = "",
             environ: Mapping[str, str] = os.environ) -> Credentials:
        """From the files given; without any, from BPFPROF_PUSH_USERNAME, BPFPROF_PUSH_PASSWORD
        and BPFPROF_PUSH_TOKEN. Files and environment are never mixed, so a stray variable
        cannot join a file's credentials."""
        if username_file or password_file or token_file:
            return cls(_read_secret(username_file, "username"), _read_secret(password_file, "password"),
                       _read_secret(token_file, "token"))
        return cls(environ.get("BPFPROF_PUSH_USERNAME", ""), environ.get("BPFPROF_PUSH_PASSWORD", ""),
                   environ.get("BPFPROF_PUSH_TOKEN", ""))


def _read_secret(path: str, what: str) -> str:
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            # Surrounding white space (the newline an editor or `echo` leaves) is no part of a secret.
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --push-{what}-file {path}: {getattr(e, 'strerror', None) or e}") from None
    if not secret:
        raise UsageError(f"--push-{what}-file {path} is empty")
    return secret


class PushError(CollectorError):
    """A push that did not reach the store; `retryable` when the same request may succeed later."""

    def __init__(self, message: str, retryable: bool, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status  # the HTTP status, None when no answer came


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        # Followed, a redirected POST turns into a GET without the profiles (and takes the
        # credentials elsewhere); as an error it tells the user which URL to give instead.
        return None


class PushClient:
    """POSTs encoded PushRequests to one store as Connect unary calls."""

    def __init__(self, url: str, credentials: Credentials, tenant: str = "", ca_file: str = "",
                 verify_tls: bool = True, timeout_s: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.username or parts.password:
            # Not echoed: it holds a secret.
            raise UsageError("--push-url must not carry credentials; give them in a file or the environment")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise UsageError(f"--push-url must be the store's base URL, http:// or https://, not {url!r}")
        if tenant and (not _TENANT_ID.fullmatch(tenant) or tenant in (".", "..")):
            raise UsageError(f"{tenant!r} is not a Pyroscope tenant ID (up to 150 of A-Z a-z 0-9 ! - _ . * ' ( ))")
        self.url = url.rstrip("/") + PUSH_PATH
        self.timeout_s = timeout_s
        self._headers = {
            "Content-Type": "application/proto",
            "Connect-Protocol-Version": "1",
            "User-Agent": f"bpfprof/{__version__}",
        }
        if credentials.scheme:
            self._headers["Authorization"] = credentials.authorization()
            if parts.scheme == "http":
                log.warning("the push credentials go to the store in clear text: give an https:// --push-url",
                            extra={"fields": {"url": url}})
            elif not verify_tls:
                log.warning("the push credentials go to a store whose certificate is not checked "
                            "(--push-insecure-skip-verify)", extra={"fields": {"url": url}})
        if tenant:
            self._headers["X-Scope-OrgID"] = tenant
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=_tls_context(ca_file, verify_tls)), _RefuseRedirects)

    def push(self, body: bytes) -> None:
        """One encoded PushRequest to the store; PushError when it is not accepted."""
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as e:
            raise _refusal(e) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, ssl.SSLCertVerificationError):
                # Trying again changes nothing until the certificate or the CA file does.
                raise PushError(f"{self.url}: the store's certificate is not trusted ({e.reason.verify_message});"
                                " give its CA with --push-ca-file", retryable=False) from None
            raise PushError(f"{self.url}: {e.reason}", retryable=True) from None
        except (OSError, HTTPException) as e:  # timeouts and connections cut while reading
            raise PushError(f"{self.url}: {str(e) or type(e).__name__}", retryable=True) from None


def _tls_context(ca_file: str, verify_tls: bool) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot read --push-ca-file {ca_file}: {getattr(e, 'strerror', None) or e}") from None
    if not verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _refusal(error: urllib.error.HTTPError) -> PushError:
    """The store's answer as a PushError; Connect puts {"code", "message"} in an error's
    JSON body, and its code says more than the HTTP status (a proxy's error has none)."""
    code, message = "", ""
    try:
        if error.headers.get_content_type() == "application/json":
            answer = json.loads(error.read(64 * 1024))
            code, message = str(answer.get("code", "")), str(answer.get("message", ""))
    except (OSError, ValueError, AttributeError):
        pass  # an unreadable body leaves the status to speak
    status = error.code
    retryable = code in _RETRYABLE_CODES if code else status >= 500 or status in (408, 429)
    said = ": ".join(part for part in (code, message[:300]) if part) or error.reason
    if 300 <= status < 400:
        said += f" (to {error.headers.get('Location', '?')}; give that URL)"
    return PushError(f"the store answered {status}: {said}", retryable=retryable, status=status)
