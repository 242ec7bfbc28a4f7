"""The pods on this node by container ID and pod UID, listed by the kubelet or the API server.

The cgroup gives each process's container ID and pod UID (collector/processes/containers.py); this
module names them: namespace, pod, container and the pod's labels. It polls a PodList over
HTTPS with the service account's token, as Grafana Alloy's discovery.kubelet polls
`<kubelet>/pods`, or lists `/api/v1/pods` restricted to this node by a field selector, as
Parca Agent and Alloy's discovery.kubernetes do; no watch, so no client library.

RBAC the service account needs (the DaemonSet's ClusterRole asks the kubelet):
  kubelet      apiGroups [""], resources ["nodes/pods"], verbs ["get"]: the kubelet
               authorizes /pods as nodes/pods from Kubernetes 1.33 on (KubeletFineGrainedAuthz,
               GA in 1.36), and before that as nodes/proxy, which also opens exec into
               every pod of the node.
  API server   apiGroups [""], resources ["pods"], verbs ["list"]: every pod of the
               cluster, as RBAC cannot restrict a list to a field selector.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple

from bpfprof.collector.errors import CollectorError, UsageError

log = logging.getLogger("bpfprof.agent")

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# Named in the log when the server answers 403, so the fix is one line away.
_API_SERVER_PERMISSION = 'list on "pods"'
_KUBELET_PERMISSION = ('get on "nodes/pods", which kubelets before Kubernetes 1.33 do not know: '
                       'there, list pods from the API server instead')
# Named when the kubelet's certificate fails the check, as most kubelets sign their own.
_KUBELET_CERTIFICATE_FIX = ("the kubelet's certificate is not signed by the cluster CA: have the kubelets' "
                            "serving certificates signed (serverTLSBootstrap), or list pods from the API server")

_STATUS_LISTS = ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses")


class KubernetesError(CollectorError):
    """The pods on this node could not be listed."""


@dataclass(frozen=True)
class PodContainer:
    namespace: str
    pod: str
    container: str  # "" when only the pod is known (e.g. the sandbox/pause container)
    pod_labels: Tuple[Tuple[str, str], ...]


class _Index(NamedTuple):
    by_container: Dict[str, PodContainer]
    by_pod_uid: Dict[str, PodContainer]


class PodMetadata:
    """Pods on this node by container ID and by pod UID.

    `fetch` returns a PodList (the JSON object the API returns) and raises KubernetesError
    when it cannot. Meant for one thread, the agent's main loop.
    """

    def __init__(self, fetch: Callable[[], dict], refresh_s: float = 30.0, min_retry_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self._fetch = fetch
        self._refresh_s = refresh_s
        self._min_retry_s = min_retry_s
        self._clock = clock
        self._fetched_at: Optional[float] = None
        self._tried_at: Optional[float] = None
        self._failing = False
        # The last two lists: a pod deleted since the last one still names the samples its
        # processes left in the interval being labelled.
        self._indexes: Tuple[_Index, ...] = ()

    def lookup(self, container_id: str, pod_uid: str = "") -> Optional[PodContainer]:
        """The pod and container of a container ID (bare hex, as the cgroup names it), or the
        pod alone (container "") when only its UID is known; None when neither is."""
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at >= self._refresh_s:
            self._refresh(now)
        found = self._find(container_id, pod_uid)
        if found is None or (container_id and not found.container):
            # Most often a container started since the last list; the sandbox container of a
            # pod is never listed, so its lookups cost one list per min_retry_s at most.
            self._refresh(now)
            found = self._find(container_id, pod_uid)
        return found

    def _find(self, container_id: str, pod_uid: str) -> Optional[PodContainer]:
        for index in self._indexes:
            if container_id in index.by_container:
                return index.by_container[container_id]
        for index in self._indexes:
            if pod_uid in index.by_pod_uid:
                return index.by_pod_uid[pod_uid]
        return None

    def _refresh(self, now: float) -> None:
        if self._tried_at is not None and now - self._tried_at < self._min_retry_s:
            return
        self._tried_at = now
        try:
            index = _index_pod_list(self._fetch())
        except KubernetesError as error:
            # Once per outage at warning level: the agent asks again every interval.
            log.log(logging.DEBUG if self._failing else logging.WARNING,
                    "cannot list the pods on this node; samples keep the pod names known so far",
                    extra={"fields": {"error": str(error)}})
            self._failing = True
            return
        if self._failing:
            log.info("listing the pods on this node works again")
            self._failing = False
        self._indexes = (index,) + self._indexes[:1]
        self._fetched_at = now
        log.debug("listed the pods on this node", extra={"fields": {
            "pods": len(index.by_pod_uid), "containers": len(index.by_container)}})

    @classmethod
    def from_environment(cls, node: str, kubelet_url: str = "", environ=os.environ,
                         secrets_dir: str = SERVICE_ACCOUNT_DIR, kubelet_insecure_tls: bool = False,
                         timeout_s: float = 5.0, refresh_s: float = 30.0, min_retry_s: float = 5.0,
                         clock: Callable[[], float] = time.monotonic) -> Optional["PodMetadata"]:
        """The kubelet's pod list when `kubelet_url` is given, else the API server's list of the
        pods on `node`; None when neither a kubelet URL nor in-cluster credentials exist.

        The kubelet's certificate is checked against the cluster CA (secrets_dir/ca.crt), which
        holds where its serving certificate is signed by the cluster (serverTLSBootstrap); most
        kubelets serve a self-signed one, which only `kubelet_insecure_tls` gets past.
        """
        token_path = os.path.join(secrets_dir, "token")
        ca_path = os.path.join(secrets_dir, "ca.crt")
        has_token = os.path.isfile(token_path)
        if kubelet_url:
            url = kubelet_url.rstrip("/") + "/pods"
            # The read-only port (http, 10255) takes no token, and must not see one in clear.
            send_token = has_token and url.startswith("https://")
            if send_token and kubelet_insecure_tls:
                log.warning("the service-account token goes to a kubelet whose certificate is not checked "
                            "(--kubelet-insecure-tls)", extra={"fields": {"url": url}})
            endpoint = PodListEndpoint(url, token_path if send_token else "", ca_path,
                                       verify=not kubelet_insecure_tls, timeout_s=timeout_s,
                                       permission=_KUBELET_PERMISSION, certificate_fix=_KUBELET_CERTIFICATE_FIX)
        else:
            host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
            if not (host and port and has_token):
                return None
            if not node:
                raise UsageError("the node's name is needed to list its pods: "
                                 "pass spec.nodeName through the downward API")
            if ":" in host:
                host = f"[{host}]"
            # resourceVersion=0 lets the API server answer from its watch cache, not etcd:
            # every node of the cluster asks every refresh_s.
            query = urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={node}", "resourceVersion": "0"})
            url = f"https://{host}:{port}/api/v1/pods?{query}"
            endpoint = PodListEndpoint(url, token_path, ca_path, timeout_s=timeout_s,
                                       permission=_API_SERVER_PERMISSION)
        log.info("pod names from the Kubernetes pod list", extra={"fields": {"url": url}})
        return cls(endpoint, refresh_s=refresh_s, min_retry_s=min_retry_s, clock=clock)


class PodListEndpoint:
    """GET a PodList over HTTP(S), with the service-account token read at each request:
    bound service-account tokens rotate, and so may the CA bundle beside them."""

    def __init__(self, url: str, token_path: str, ca_path: str, verify: bool = True,
                 timeout_s: float = 5.0, permission: str = "", certificate_fix: str = ""):
        self.url = url
        self._token_path = token_path  # "" sends no token
        self._ca_path = ca_path
        self._verify = verify
        self._timeout_s = timeout_s
        self._permission = permission
        self._certificate_fix = certificate_fix  # named when the server's certificate fails the check

    def __call__(self) -> dict:
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        try:
            if self._token_path:
                with open(self._token_path) as token_file:
                    # Unredirected: a redirect must not carry the token to wherever it points.
                    request.add_unredirected_header("Authorization", f"Bearer {token_file.read().strip()}")
            opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=self._tls_context()))
            with opener.open(request, timeout=self._timeout_s) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            error.close()
            needs = f"; the service account needs {self._permission}" if error.code == 403 else ""
            raise KubernetesError(f"GET {self.url}: HTTP {error.code} {error.reason}{needs}") from None
        except urllib.error.URLError as error:
            fix = (f"; {self._certificate_fix}"
                   if self._certificate_fix and isinstance(error.reason, ssl.SSLCertVerificationError) else "")
            raise KubernetesError(f"GET {self.url}: {error}{fix}") from None
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise KubernetesError(f"GET {self.url}: {error}") from None

    def _tls_context(self) -> ssl.SSLContext:
        if not self._verify:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        return ssl.create_default_context(cafile=self._ca_path if os.path.isfile(self._ca_path) else None)


def _index_pod_list(pod_list) -> _Index:
    items = pod_list.get("items") if isinstance(pod_list, dict) else None
    if not isinstance(items, list):
        raise KubernetesError(f"not a PodList: {str(pod_list)[:80]}")
    index = _Index({}, {})
    try:
        for pod in items:
            metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
            namespace, name = metadata.get("namespace", ""), metadata.get("name", "")
            labels = tuple(sorted((metadata.get("labels") or {}).items()))
            if metadata.get("uid"):
                index.by_pod_uid[metadata["uid"]] = PodContainer(namespace, name, "", labels)
            for key in _STATUS_LISTS:
                for container_status in status.get(key) or ():
                    container = PodContainer(namespace, name, container_status.get("name", ""), labels)
                    for container_id in _container_ids(container_status):
                        index.by_container[container_id] = container
    except (AttributeError, TypeError) as error:
        raise KubernetesError(f"malformed PodList: {error}") from None
    return index


def _container_ids(container_status: dict) -> Iterator[str]:
    """The bare IDs of a container status ("containerd://<id>", "cri-o://<id>"...): the running
    instance and the one before its last restart, whose samples may still be unlabelled."""
    previous = (container_status.get("lastState") or {}).get("terminated") or {}
    for runtime_id in (container_status.get("containerID"), previous.get("containerID")):
        if runtime_id:
            yield runtime_id.rpartition("://")[2]
