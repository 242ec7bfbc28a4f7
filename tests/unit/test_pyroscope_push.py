"""The Pyroscope sink against a real HTTP(S) store stand-in on loopback: requests decoded by
protoc as Pyroscope's push.proto defines them, credentials, TLS, retries and the queue's bounds."""

from __future__ import annotations

import gzip
import logging
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Callable, List, Tuple

import pytest

from bpfprof.collector.agent.push_queue import PushQueue
from bpfprof.collector.agent.pyroscope import Credentials, PushClient, PushError, Series, encode_push_request
from bpfprof.collector.errors import UsageError
from bpfprof.collector.output.pprof import from_pprof, pprof_bytes
from bpfprof.collector.output.pprof_schema import PprofProfile
from bpfprof.collector.profile import Labels, cpu_profile
from bpfprof.symbolizer.frames import Frame, FrameKind, Module
from conftest import skip_or_fail
from pyroscope_store import Store, decode_with_protoc, push_request_class

APP = Module("/usr/bin/app", "0616edaa9c4bf8606ff426f28ff906fe92a91700")
MAIN = Frame(FrameKind.NATIVE, "main", APP, 0x1100, "app.c", 30, 28)
WORK = Frame(FrameKind.NATIVE, "work", APP, 0x1200, "app.c", 12, 10)
PY = Frame(FrameKind.PYTHON, "Handler.calc", None, 0, "app.py", 41, 39)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")  # loopback, whatever proxy the machine is set up with


@pytest.fixture
def store():
    stores = []

    def start(*answers: Tuple[int, str], tls_files=None) -> Store:
        stores.append(Store(answers, tls_files))
        return stores[-1]

    yield start
    for s in stores:
        s.close()


@pytest.fixture(scope="module")
def fixture_push_request(tmp_path_factory):
    return push_request_class(tmp_path_factory.mktemp("protoc"))


def gzipped_cpu_pprof(comm: str, pid: int) -> bytes:
    profile = cpu_profile(hz=100, start_ns=1_700_000_000_000_000_000)
    labels = Labels(pid=pid, tid=pid, comm=comm, thread=comm)
    profile.add((WORK, MAIN), labels, [3, 30_000_000])
    profile.add((PY, MAIN), labels, [pid, pid * 10_000_000])
    return pprof_bytes(profile)


def samples_of(raw_profile: bytes):
    profile = from_pprof(PprofProfile.FromString(gzip.decompress(raw_profile)))
    return {(tuple(f.name for f in stack), labels.comm): values for (stack, labels), values in profile.samples.items()}


def push_body(size: int = 8) -> bytes:
    """A request whose body tells it apart by its size; the store stand-in does not read the profile."""
    return encode_push_request([Series((("__name__", "process_cpu"), ("service_name", "web")), bytes(size))])


# The request on the wire

WEB = (("__name__", "process_cpu"), ("service_name", "web"), ("node", "n1"), ("namespace", "shop"))
DB = (("__name__", "process_cpu"), ("service_name", "db"), ("node", "n1"))


@pytest.mark.parametrize("credentials, authorization, tenant", [
    (Credentials(username="agent", password="s3cret:x"), "Basic YWdlbnQ6czNjcmV0Ong=", "team-a"),
    (Credentials(token="tok.en"), "Bearer tok.en", "team-b"),
    (Credentials(), None, ""),
], ids=["basic", "bearer", "anonymous"])
def test_push_reaches_the_store_as_pyroscope_defines_it(store, fixture_push_request, credentials, authorization,
                                                        tenant):
    web, db = gzipped_cpu_pprof("web", 7), gzipped_cpu_pprof("db", 9)
    pyroscope = store()
    client = PushClient(pyroscope.url + "/", credentials, tenant=tenant)
    client.push(encode_push_request([Series(WEB, web), Series(DB, db)]))

    [request] = pyroscope.requests
    assert (request.method, request.path) == ("POST", "/push.v1.PusherService/Push")
    assert request.headers["Content-Type"] == "application/proto"
    assert request.headers["Connect-Protocol-Version"] == "1"
    assert request.headers["Authorization"] == authorization
    assert request.headers["X-Scope-OrgID"] == (tenant or None)

    decoded = decode_with_protoc(request.body, fixture_push_request)
    assert [tuple((label.name, label.value) for label in s.labels) for s in decoded.series] == [WEB, DB]
    assert [len(s.samples) for s in decoded.series] == [1, 1]
    web_samples, db_samples = (samples_of(s.samples[0].raw_profile) for s in decoded.series)
    assert web_samples == {(("work", "main"), "web"): [3, 30_000_000],
                           (("Handler.calc", "main"), "web"): [7, 70_000_000]}
    assert db_samples == {(("work", "main"), "db"): [3, 30_000_000],
                          (("Handler.calc", "main"), "db"): [9, 90_000_000]}


@pytest.mark.parametrize("labels, problem", [
    ((("service_name", "web"),), "__name__"),
    ((("__name__", "process_cpu"), ("service_name", "")), "service_name"),
    ((("__name__", "process_cpu"), ("service_name", "a"), ("service_name", "b")), "twice"),
])
def test_a_series_the_store_would_refuse_is_not_made(labels, problem):
    with pytest.raises(ValueError, match=problem):
        Series(labels, b"")


# How the store's answers are understood

@pytest.mark.parametrize("answer, retryable", [
    ((503, "unavailable"), True),
    ((429, "resource_exhausted"), True),
    ((500, "internal"), True),
    ((502, ""), True),  # a proxy in front of a store that is down
    ((400, "invalid_argument"), False),
    ((401, "unauthenticated"), False),
    ((501, "unimplemented"), False),  # Connect's code says more than the 5xx
    ((302, ""), False),  # never followed: a POST would turn into a GET
])
def test_refusals_say_whether_to_retry(store, answer, retryable):
    pyroscope = store(answer)
    with pytest.raises(PushError) as refused:
        PushClient(pyroscope.url, Credentials()).push(push_body())
    assert (refused.value.status, refused.value.retryable) == (answer[0], retryable)
    assert str(answer[0]) in str(refused.value) and answer[1] in str(refused.value)
    assert len(pyroscope.requests) == 1


def test_a_store_that_is_not_there_is_retried():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PushError) as refused:
        PushClient(f"http://127.0.0.1:{port}", Credentials()).push(push_body())
    assert refused.value.retryable and refused.value.status is None


@pytest.fixture
def silent_store():
    """Accepts connections (the kernel's backlog does) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_store_that_never_answers_times_out(silent_store):
    with pytest.raises(PushError, match="timed out") as refused:
        PushClient(silent_store, Credentials(), timeout_s=0.3).push(push_body())
    assert refused.value.retryable


@pytest.mark.parametrize("url", ["ftp://store:4040", "store:4040", "http://", "http://store:4040/?tenant=a"])
def test_a_push_url_that_is_no_store_url(url):
    with pytest.raises(UsageError, match="--push-url"):
        PushClient(url, Credentials())


def test_a_push_url_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(UsageError) as refused:
        PushClient("https://agent:hunter2@store:4040", Credentials())
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("tenant", ["a b", "..", "x" * 151, "team/a"])
def test_a_tenant_pyroscope_would_refuse(tenant):
    with pytest.raises(UsageError, match="tenant"):
        PushClient("http://store:4040", Credentials(), tenant=tenant)


# TLS

@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> Tuple[Path, Path]:
    """A certificate for 127.0.0.1 that signs itself, and its key."""
    if shutil.which("openssl") is None:
        skip_or_fail("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=bpfprof test store",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_tls_is_verified_by_default(store, self_signed):
    pyroscope = store(tls_files=self_signed)
    with pytest.raises(PushError, match="certificate") as refused:
        PushClient(pyroscope.url, Credentials(token="t")).push(push_body())
    assert not refused.value.retryable
    assert pyroscope.requests == []


def test_tls_with_the_stores_ca_file(store, self_signed):
    pyroscope = store(tls_files=self_signed)
    PushClient(pyroscope.url, Credentials(token="t"), ca_file=str(self_signed[0])).push(push_body())
    PushClient(pyroscope.url, Credentials(token="t"), verify_tls=False).push(push_body())
    assert len(pyroscope.requests) == 2
    assert pyroscope.requests[0].headers["Authorization"] == "Bearer t"


def test_an_unreadable_ca_file(tmp_path):
    with pytest.raises(UsageError, match="--push-ca-file"):
        PushClient("https://store:4040", Credentials(), ca_file=str(tmp_path / "none.pem"))


# Credentials

ENVIRON = {"BPFPROF_PUSH_USERNAME": "env-user", "BPFPROF_PUSH_PASSWORD": "env-pass", "BPFPROF_PUSH_TOKEN": ""}


def secret_file(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_credentials_from_files(tmp_path):
    basic = Credentials.load(username_file=secret_file(tmp_path, "user", "agent\n"),
                             password_file=secret_file(tmp_path, "pass", "s3cret\n"), environ={})
    assert (basic.username, basic.password, basic.token) == ("agent", "s3cret", "")
    bearer = Credentials.load(token_file=secret_file(tmp_path, "token", "tok\n"), environ={})
    assert bearer.authorization() == "Bearer tok"


def test_credentials_from_the_environment():
    assert Credentials.load(environ=ENVIRON) == Credentials("env-user", "env-pass")
    assert Credentials.load(environ={"BPFPROF_PUSH_TOKEN": "env-tok"}) == Credentials(token="env-tok")
    assert Credentials.load(environ={}).authorization() == ""


def test_credential_files_win_over_the_environment(tmp_path):
    token_file = secret_file(tmp_path, "token", "file-tok")
    assert Credentials.load(token_file=token_file, environ=ENVIRON) == Credentials(token="file-tok")


def test_repr_hides_secrets(tmp_path):
    for credentials in (Credentials("agent", "s3cret"), Credentials(token="tok3n")):
        shown = repr(credentials) + str(credentials) + f"{[credentials]}"
        assert "s3cret" not in shown and "tok3n" not in shown and "agent" not in shown
    assert repr(Credentials(token="tok3n")) == "Credentials(Bearer)"


def test_an_unusable_credentials_file_is_one_clear_error(tmp_path):
    missing, empty, directory = str(tmp_path / "none"), secret_file(tmp_path, "token", "\n"), str(tmp_path)
    for path, match in [(missing, "cannot read --push-token-file"), (empty, "--push-token-file .* is empty"),
                        (directory, "cannot read --push-token-file")]:
        with pytest.raises(UsageError, match=match) as refused:
            Credentials.load(token_file=path, environ={})
        assert "\n" not in str(refused.value)


def test_half_or_doubled_credentials_are_refused():
    with pytest.raises(UsageError, match="both a username and a password"):
        Credentials.load(environ={"BPFPROF_PUSH_USERNAME": "agent"})
    with pytest.raises(UsageError, match="not both"):
        Credentials.load(environ={**ENVIRON, "BPFPROF_PUSH_TOKEN": "tok"})


# The queue

def fields_of(caplog, message: str):
    return [r.fields for r in caplog.records if r.getMessage() == message]


WAIT_S = 10.0  # how long a test waits for what the sender thread is to do before it fails


class Sends:
    """A send for the queue: another send, with every call counted as it starts and as it
    ends, so that a test waits for what the sender did rather than for time to pass."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send = send
        self._changed = threading.Condition()
        self.started = self.accepted = self.failed = 0

    def __call__(self, body: bytes) -> None:
        self._count("started")
        try:
            self._send(body)
        except Exception:
            self._count("failed")
            raise
        self._count("accepted")

    def _count(self, what: str) -> None:
        with self._changed:
            setattr(self, what, getattr(self, what) + 1)
            self._changed.notify_all()

    def wait_until(self, what: str, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: getattr(self, what) >= count, WAIT_S), f"{what} never {count}"


def test_a_store_that_is_down_gets_the_same_request_again_later(store, caplog):
    caplog.set_level(logging.INFO, logger="bpfprof.agent")
    pyroscope = store((503, "unavailable"), (503, "unavailable"), (502, ""))
    waits: List[Tuple[int, float]] = []  # (requests the store had, delay) of each backoff

    def backoff(_closing: threading.Event, delay: float) -> bool:
        waits.append((len(pyroscope.requests), delay))
        return False  # the delay passed and close() did not come

    sends = Sends(PushClient(pyroscope.url, Credentials()).push)
    queue = PushQueue(sends, capacity=4, base_delay_s=0.04, rng=lambda: 0.5, wait=backoff)
    queue.start()
    first, second = push_body(1), push_body(2)
    queue.put(first)
    sends.wait_until("accepted", 1)
    queue.put(second)
    sends.wait_until("accepted", 2)
    queue.close(1.0)

    assert [r.body for r in pyroscope.requests] == [first] * 4 + [second]
    assert [f["retry_in_s"] for f in fields_of(caplog, "push failed")] == [0.02, 0.04, 0.08]
    assert [f["status"] for f in fields_of(caplog, "push failed")] == [503, 503, 502]
    assert waits == [(1, 0.02), (2, 0.04), (3, 0.08)]
    assert fields_of(caplog, "push resumed") == [{"failed_attempts": 3}]
    assert (queue.pushed, queue.failed, queue.dropped, queue.depth) == (2, 3, 0, 0)


def test_a_refused_request_is_dropped_not_retried(store, caplog):
    pyroscope = store((400, "invalid_argument"))
    sends = Sends(PushClient(pyroscope.url, Credentials()).push)
    queue = PushQueue(sends, capacity=4, base_delay_s=0.01)
    queue.start()
    refused, accepted = push_body(1), push_body(2)
    queue.put(refused)
    queue.put(accepted)
    sends.wait_until("accepted", 1)
    queue.close(1.0)
    assert [r.body for r in pyroscope.requests] == [refused, accepted]
    assert (queue.pushed, queue.failed, queue.dropped) == (1, 1, 1)
    assert fields_of(caplog, "push refused, profile dropped")[0]["status"] == 400


def test_a_full_queue_drops_the_oldest(store):
    pyroscope = store()
    queue = PushQueue(PushClient(pyroscope.url, Credentials()).push, capacity=3)
    bodies = [push_body(n) for n in range(5)]
    for body in bodies:  # before the sender starts, as when the store has been down a while
        queue.put(body)
    assert (queue.depth, queue.dropped) == (3, 2)
    queue.start()
    queue.close(2.0)
    assert [r.body for r in pyroscope.requests] == bodies[2:]
    assert (queue.pushed, queue.dropped, queue.depth) == (3, 2, 0)


def test_close_wakes_a_backoff_and_sends_again_before_the_deadline(store):
    pyroscope = store(*[(503, "unavailable")] * 100)
    backing_off = threading.Event()
    backoffs: List[Tuple[float, bool]] = []  # (delay, whether close() cut it short) of each backoff

    def backoff(closing: threading.Event, delay: float) -> bool:
        backing_off.set()
        backoffs.append((delay, closing.wait(delay)))
        return backoffs[-1][1]

    queue = PushQueue(PushClient(pyroscope.url, Credentials()).push, capacity=4, base_delay_s=30, rng=lambda: 1.0,
                      wait=backoff)
    queue.start()
    queue.put(push_body(1))
    queue.put(push_body(2))
    assert backing_off.wait(WAIT_S), "the first push never failed"
    queue.close(1.0)
    assert backoffs == [(30, True)]
    assert len(pyroscope.requests) == 2, "close() retries at once, then backs off within the deadline"
    assert (queue.pushed, queue.failed, queue.dropped, queue.depth) == (0, 2, 2, 0)


def test_close_returns_by_the_deadline_when_the_store_never_answers(silent_store):
    sends = Sends(PushClient(silent_store, Credentials(), timeout_s=WAIT_S).push)
    queue = PushQueue(sends, capacity=4)
    queue.start()
    queue.put(push_body())
    sends.wait_until("started", 1)
    queue.close(0.3)
    assert sends.failed == 0, "close() returned only once the send had timed out"
    assert (queue.pushed, queue.dropped, queue.depth) == (0, 1, 0)


def test_close_sends_what_is_queued(store):
    pyroscope = store()
    queue = PushQueue(PushClient(pyroscope.url, Credentials()).push, capacity=8)
    for n in range(3):
        queue.put(push_body(n))
    queue.start()
    queue.close(2.0)
    assert (len(pyroscope.requests), queue.pushed, queue.depth) == (3, 3, 0)
    queue.put(push_body())  # nothing sends it any more
    assert (queue.dropped, queue.depth) == (1, 0)


def test_a_sender_that_breaks_does_not_stop_the_queue(caplog):
    sent = []

    def send(body: bytes) -> None:
        if not sent:
            sent.append(None)
            raise RuntimeError("a bug")
        sent.append(body)

    sends = Sends(send)
    queue = PushQueue(sends, capacity=4)
    queue.start()
    queue.put(b"first")
    queue.put(b"second")
    sends.wait_until("accepted", 1)
    queue.close(1.0)
    assert sent == [None, b"second"]
    assert (queue.failed, queue.dropped) == (1, 1)
    assert "push failed unexpectedly" in caplog.text


@pytest.mark.parametrize("url, verify, warning", [
    ("http://store:4040", True, "the push credentials go to the store in clear text: give an https:// --push-url"),
    ("https://store:4040", False, "the push credentials go to a store whose certificate is not checked "
                                  "(--push-insecure-skip-verify)"),
    ("https://store:4040", True, None),
], ids=["http", "unverified", "https"])
def test_credentials_sent_unprotected_are_warned_of(url, verify, warning, caplog):
    caplog.set_level(logging.INFO, logger="bpfprof.agent")
    PushClient(url, Credentials(token="secret"), verify_tls=verify)
    PushClient(url, Credentials(), verify_tls=verify)  # nothing to protect: no warning
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ([warning] if warning else [])
