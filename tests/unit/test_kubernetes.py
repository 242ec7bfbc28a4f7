"""Pod metadata from a real HTTPS server on 127.0.0.1 standing in for the API server and the
kubelet, and the service-name rule."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List, NamedTuple, Optional
from urllib.parse import parse_qs, urlsplit

import pytest

from bpfprof.collector.agent.kubernetes import PodContainer, PodMetadata
from bpfprof.collector.agent.service_name import service_name
from bpfprof.collector.errors import UsageError

POD_LIST = json.loads((Path(__file__).parent.parent / "fixtures" / "kubernetes" / "pods.json").read_text())

CHECKOUT_ID = "41a9fe42631735e5598e5032c36c9d8df5023a2a6ef8e87a7c423f492f3d0a43"
CHECKOUT_BEFORE_RESTART_ID = "d17f1190668bc4fd947880cf2dedd87eb61e5f2aa9bf8885d7aa77e7475aa942"
MIGRATE_ID = "c938272f30e085544900ec93701329a8db889699beb30ea3955d0e9c272bbf6b"
COREDNS_ID = "907b13c82a73f16922c0af250e7640aaa74e94ee50440cb8244712709d12b886"
DEBUGGER_ID = "5c303590cdfb5130ec14527ca4695a2cb89e1fd6c42f11e16351159eb90aaf34"
NEW_ID = "dc0c2730b744ba72793748f544c9bccae3b2ded926e709d2e2166e5d61b66487"
SANDBOX_ID = "79ee776d34ccc2e63023c4319c835b1f7a35b08f28943c3dc3fd6adb1a212375"
CHECKOUT_UID = "0b7a3c52-5f3e-4d6b-9a1e-2c4d6e8f0a1b"

CHECKOUT_LABELS = (("app.kubernetes.io/instance", "shop"), ("app.kubernetes.io/name", "checkout"),
                   ("pod-template-hash", "7d9f8b6c5d"), ("team", "payments"))
COREDNS_LABELS = (("k8s-app", "kube-dns"), ("pod-template-hash", "5dd5756b68"))


class Request(NamedTuple):
    path: str
    authorization: Optional[str]


class PodListServer:
    """HTTPS on 127.0.0.1 answering every GET with its pod list (or `status`/`body` when set),
    recording each request."""

    def __init__(self, certificate, key):
        self.pod_list = copy.deepcopy(POD_LIST)
        self.requests: List[Request] = []
        self.status = 200
        self.body: Optional[bytes] = None
        self.redirect = ""  # when set, /pods answers 302 to this path
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append(Request(self.path, self.headers.get("Authorization")))
                if owner.redirect and self.path == "/pods":
                    self.send_response(302)
                    self.send_header("Location", owner.redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = owner.body if owner.body is not None else json.dumps(owner.pod_list).encode()
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        # A short poll keeps shutdown, which waits for the next poll, from costing 0.5 s a test.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()
        self.port = self._server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, serving both as the server's and as ca.crt."""
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem")],
                   check=True, capture_output=True)
    return directory / "cert.pem", directory / "key.pem"


@pytest.fixture
def server(certificate):
    pod_list_server = PodListServer(*certificate)
    yield pod_list_server
    pod_list_server.stop()


@pytest.fixture
def secrets(tmp_path, certificate):
    """A service-account directory as the kubelet mounts it: token and the cluster's ca.crt."""
    (tmp_path / "token").write_text("token-1\n")
    shutil.copy(certificate[0], tmp_path / "ca.crt")
    return tmp_path


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def metadata(server, secrets, clock):
    """Pod metadata from the API server, as in a pod with mounted credentials."""
    environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.port)}
    return PodMetadata.from_environment("node-1", environ=environ, secrets_dir=str(secrets), clock=clock)


def new_pod() -> dict:
    pod = copy.deepcopy(POD_LIST["items"][1])
    pod["metadata"].update(name="coredns-5dd5756b68-zz9rt", uid="9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a")
    pod["status"]["containerStatuses"][0]["containerID"] = f"containerd://{NEW_ID}"
    return pod


def test_api_server_request_lists_this_node_with_the_token(metadata, server):
    metadata.lookup(CHECKOUT_ID)
    [request] = server.requests
    url = urlsplit(request.path)
    assert url.path == "/api/v1/pods"
    assert parse_qs(url.query) == {"fieldSelector": ["spec.nodeName=node-1"], "resourceVersion": ["0"]}
    assert request.authorization == "Bearer token-1"


@pytest.mark.parametrize("container_id, expected", [
    (CHECKOUT_ID, PodContainer("shop", "checkout-7d9f8b6c5d-x2x4q", "checkout", CHECKOUT_LABELS)),
    (CHECKOUT_BEFORE_RESTART_ID, PodContainer("shop", "checkout-7d9f8b6c5d-x2x4q", "checkout", CHECKOUT_LABELS)),
    (MIGRATE_ID, PodContainer("shop", "checkout-7d9f8b6c5d-x2x4q", "migrate", CHECKOUT_LABELS)),
    (COREDNS_ID, PodContainer("kube-system", "coredns-5dd5756b68-abc12", "coredns", COREDNS_LABELS)),
    (DEBUGGER_ID, PodContainer("kube-system", "coredns-5dd5756b68-abc12", "debugger-q7k2p", COREDNS_LABELS)),
])
def test_lookup_by_container_id(metadata, container_id, expected):
    assert metadata.lookup(container_id, "any-pod-uid") == expected


def test_lookup_by_pod_uid_when_the_container_is_not_listed(metadata):
    assert metadata.lookup(SANDBOX_ID, CHECKOUT_UID) == PodContainer(
        "shop", "checkout-7d9f8b6c5d-x2x4q", "", CHECKOUT_LABELS)
    assert metadata.lookup(SANDBOX_ID, "5b4a3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d") is None


def test_unknown_container_refreshes_once_and_finds_the_new_pod(metadata, server, clock):
    metadata.lookup(CHECKOUT_ID)
    server.pod_list["items"].append(new_pod())
    clock.now += 5
    assert metadata.lookup(NEW_ID).pod == "coredns-5dd5756b68-zz9rt"
    assert metadata.lookup(NEW_ID).container == "coredns"
    assert metadata.lookup(CHECKOUT_ID).container == "checkout"
    assert len(server.requests) == 2


def test_a_burst_of_unknown_ids_costs_one_list_per_min_retry(metadata, server, clock):
    metadata.lookup(CHECKOUT_ID)
    clock.now += 5
    for unknown in ("a" * 64, "b" * 64, "c" * 64):
        assert metadata.lookup(unknown) is None
    assert len(server.requests) == 2
    clock.now += 4.9
    metadata.lookup("d" * 64)
    assert len(server.requests) == 2
    clock.now += 0.1
    metadata.lookup("d" * 64)
    assert len(server.requests) == 3


def test_stale_list_is_refreshed_with_the_rotated_token(metadata, server, secrets, clock):
    metadata.lookup(CHECKOUT_ID)
    (secrets / "token").write_text("token-2\n")
    clock.now += 29
    metadata.lookup(CHECKOUT_ID)
    assert [request.authorization for request in server.requests] == ["Bearer token-1"]
    clock.now += 1
    metadata.lookup(CHECKOUT_ID)
    assert [request.authorization for request in server.requests] == ["Bearer token-1", "Bearer token-2"]


def test_a_pod_deleted_since_the_last_list_still_names_its_container(metadata, server, clock):
    metadata.lookup(COREDNS_ID)
    del server.pod_list["items"][1]
    clock.now += 30
    assert metadata.lookup(COREDNS_ID).container == "coredns"
    assert len(server.requests) == 2


@pytest.mark.parametrize("failure", ["server down", "HTTP 500", "not JSON", "not a PodList"])
def test_failed_list_keeps_the_old_data_and_warns_once(metadata, server, clock, caplog, failure):
    expected = metadata.lookup(CHECKOUT_ID)
    if failure == "server down":
        server.stop()
    elif failure == "HTTP 500":
        server.status = 500
    else:
        server.body = b"<html>busy</html>" if failure == "not JSON" else b'{"kind": "Status", "code": 429}'
    caplog.set_level(logging.DEBUG, logger="bpfprof.agent")
    for _ in range(2):
        clock.now += 30
        assert metadata.lookup(CHECKOUT_ID) == expected
    failures = [record for record in caplog.records if "cannot list" in record.getMessage()]
    assert [record.levelno for record in failures] == [logging.WARNING, logging.DEBUG]
    assert failures[0].fields["error"]
    assert "token-1" not in caplog.text + str(failures[0].fields)


def test_forbidden_names_the_permission_needed(metadata, server, caplog):
    server.status = 403
    with caplog.at_level(logging.WARNING, logger="bpfprof.agent"):
        assert metadata.lookup(CHECKOUT_ID) is None
    assert 'list on "pods"' in caplog.records[0].fields["error"]


def test_a_kubelet_that_refuses_names_nodes_pods_and_the_way_for_older_clusters(server, secrets, clock, caplog):
    # A kubelet before Kubernetes 1.33 asks for nodes/proxy, which the DaemonSet does not grant.
    server.status = 403
    metadata = PodMetadata.from_environment("", kubelet_url=server.url, environ={}, secrets_dir=str(secrets),
                                            clock=clock)
    with caplog.at_level(logging.WARNING, logger="bpfprof.agent"):
        assert metadata.lookup(CHECKOUT_ID) is None
    error = caplog.records[-1].fields["error"]
    assert 'HTTP 403' in error and 'get on "nodes/pods"' in error and "from the API server" in error
    assert "nodes/proxy" not in error


@pytest.mark.parametrize("environ, token", [
    ({}, True),  # not in a pod
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, False),  # no token mounted
])
def test_without_credentials_there_is_no_metadata(tmp_path, environ, token):
    if token:
        (tmp_path / "token").write_text("token-1")
    assert PodMetadata.from_environment("node-1", environ=environ, secrets_dir=str(tmp_path)) is None


def test_api_server_without_the_node_name_is_a_usage_error(secrets):
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(UsageError, match="spec.nodeName"):
        PodMetadata.from_environment("", environ=environ, secrets_dir=str(secrets))


def test_kubelet_pods_endpoint(server, secrets, clock):
    metadata = PodMetadata.from_environment("", kubelet_url=server.url + "/", environ={},
                                            secrets_dir=str(secrets), clock=clock)
    assert metadata.lookup(COREDNS_ID).pod == "coredns-5dd5756b68-abc12"
    assert server.requests == [Request("/pods", "Bearer token-1")]


def test_kubelet_self_signed_certificate_needs_insecure_tls(server, tmp_path, clock, caplog):
    (tmp_path / "token").write_text("token-1")  # no ca.crt that vouches for the kubelet
    checked = PodMetadata.from_environment("", kubelet_url=server.url, environ={}, secrets_dir=str(tmp_path),
                                           clock=clock)
    assert checked.lookup(COREDNS_ID) is None
    (failure,) = [r for r in caplog.records if "cannot list" in r.getMessage()]
    assert "CERTIFICATE_VERIFY_FAILED" in failure.fields["error"]
    assert "not signed by the cluster CA" in failure.fields["error"] and "serverTLSBootstrap" in failure.fields["error"]
    unchecked = PodMetadata.from_environment("", kubelet_url=server.url, environ={}, secrets_dir=str(tmp_path),
                                             kubelet_insecure_tls=True, clock=clock)
    assert unchecked.lookup(COREDNS_ID).container == "coredns"
    token_warnings = [r.getMessage() for r in caplog.records if "service-account token" in r.getMessage()]
    assert token_warnings == [
        "the service-account token goes to a kubelet whose certificate is not checked (--kubelet-insecure-tls)"]


def test_a_redirect_does_not_carry_the_token(server, secrets, clock):
    server.redirect = "/elsewhere"
    metadata = PodMetadata.from_environment("", kubelet_url=server.url, environ={}, secrets_dir=str(secrets),
                                            clock=clock)
    metadata.lookup(COREDNS_ID)
    assert server.requests == [Request("/pods", "Bearer token-1"), Request("/elsewhere", None)]


CHECKOUT = PodContainer("shop", "checkout-7d9f8b6c5d-x2x4q", "checkout", CHECKOUT_LABELS)


@pytest.mark.parametrize("pod, label_key, expected", [
    (CHECKOUT, "team", "payments"),  # --service-name-label
    (CHECKOUT, "absent", "checkout"),  # falls back to app.kubernetes.io/name
    (PodContainer("shop", "p", "c", (("app", "legacy"), ("app.kubernetes.io/name", "modern"))), "", "modern"),
    (PodContainer("shop", "p", "c", (("app", "legacy"), ("team", ""))), "team", "legacy"),  # empty value skipped
    (PodContainer("kube-system", "p", "coredns", COREDNS_LABELS), "", "kube-dns"),
    (PodContainer("shop", "p", "worker", (("pod-template-hash", "x"),)), "", "shop/worker"),
    (PodContainer("shop", "p", "", ()), "", "python3"),  # only the pod is known
    (None, "team", "python3"),  # not in a pod
])
def test_service_name(pod, label_key, expected):
    assert service_name(pod, "python3", label_key) == expected


def test_service_name_is_never_empty():
    assert service_name(None, "") == "unknown"
