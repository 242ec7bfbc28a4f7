"""The agent's labels: every sample gets its node, its pod's names and a service name; a
profile splits into one per service for the store."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from bpfprof.collector.agent.kubernetes import PodContainer, PodMetadata
from bpfprof.collector.agent.service_name import service_name
from bpfprof.collector.profile import Labels, Profile

SERVICE_NAME = "service_name"


class Labeller:
    def __init__(self, node: str, pods: Optional[PodMetadata] = None, service_name_label: str = ""):
        self._node = node
        self._pods = pods
        self._service_name_label = service_name_label

    def label(self, profile: Profile) -> Profile:
        """The profile with node, pod names and service_name added to every sample."""
        extra_by_source: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], Tuple[Tuple[str, str], ...]] = {}
        labelled = profile.empty_copy()
        for (stack, labels), values in profile.samples.items():
            source = (labels.comm, labels.extra)
            extra = extra_by_source.get(source)
            if extra is None:
                extra = extra_by_source[source] = self._extra(labels)
            labelled.add(stack, Labels(labels.pid, labels.tid, labels.comm, labels.thread, extra), values)
        return labelled

    def _extra(self, labels: Labels) -> Tuple[Tuple[str, str], ...]:
        ids = dict(labels.extra)
        pod: Optional[PodContainer] = None
        if self._pods is not None and (ids.get("container_id") or ids.get("pod_uid")):
            pod = self._pods.lookup(ids.get("container_id", ""), ids.get("pod_uid", ""))
        names = (("namespace", pod.namespace), ("pod", pod.pod), ("container", pod.container)) if pod else ()
        service = service_name(pod, labels.comm, self._service_name_label)
        return (("node", self._node),) + labels.extra + tuple((k, v) for k, v in names if v) + ((SERVICE_NAME, service),)


def split_by_service(profile: Profile) -> Dict[str, Profile]:
    """One profile per service_name label, as the store keeps one series per service."""
    parts: Dict[str, Profile] = {}
    for (stack, labels), values in profile.samples.items():
        service = dict(labels.extra).get(SERVICE_NAME, "")
        part = parts.get(service)
        if part is None:
            part = parts[service] = profile.empty_copy()
        part.add(stack, labels, values)
    return parts
