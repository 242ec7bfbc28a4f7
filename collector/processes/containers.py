"""Which container and Kubernetes pod a process runs in, from its /proc/PID/cgroup: the
container runtimes name the cgroup after the container's ID, and the kubelet names the
pod's cgroup after the pod's UID.

Paths as the runtimes make them (cgroup v1 lines carry controllers, v2 lines start "0::"):
  docker, cgroupfs driver          /docker/<id>
  docker, systemd driver           /system.slice/docker-<id>.scope
  kubelet, cgroupfs driver         /kubepods/burstable/pod<uid>/<id>
  kubelet, systemd driver          /kubepods.slice/kubepods-burstable.slice/
                                   kubepods-burstable-pod<uid, "_" for "-">.slice/cri-containerd-<id>.scope
  cri-o                            .../crio-<id>.scope   (crio-conmon-<id>: the monitor, not the container)

Below its own cgroup a container (or a user, under user.slice) may make cgroups of any
name, so only the runtime's level counts: the outermost segment named like a container,
outside user.slice, and the pod above it. (Rootless containers, under user.slice, are
labelled as the host.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Tuple

_CONTAINER = re.compile(r"^(?:docker-|cri-containerd-|crio-|containerd-|libpod-)?([0-9a-f]{64})(?:\.scope)?$")
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?$")


@dataclass(frozen=True)
class Container:
    container_id: str
    pod_uid: str = ""  # "" outside Kubernetes

    @cached_property
    def labels(self) -> Tuple[Tuple[str, str], ...]:
        """The labels every sample of its processes carries."""
        ids = (("container_id", self.container_id), ("pod_uid", self.pod_uid))
        return tuple((key, value) for key, value in ids if value)


def container_of(cgroup_text: str) -> Optional[Container]:
    """The container of a process given its /proc/PID/cgroup, None on the host."""
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        segments = parts[2].split("/")
        if "user.slice" in segments:
            continue
        for i, segment in enumerate(segments):
            match = _CONTAINER.match(segment)
            if match:
                return Container(match.group(1), _pod_uid(segments[:i]))
    return None


def _pod_uid(segments) -> str:
    for segment in reversed(segments):
        match = _POD.search(segment)
        if match:
            return match.group(1).replace("_", "-")
    return ""
