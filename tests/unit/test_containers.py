"""Container IDs and pod UIDs from /proc/PID/cgroup as docker, containerd and cri-o write
it, under cgroup v1 and v2 and both kubelet cgroup drivers."""

import pytest

from bpfprof.collector.processes.containers import Container, container_of

ID = "3f1c0a6d2b9e8f7a6c5b4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a"
UID = "6e1f6c1e-2d3b-4c5a-9e8f-7a6b5c4d3e2f"
UID_ = UID.replace("-", "_")
OTHER = "a" * 64
OTHER_UID = "11111111-2222-3333-4444-555555555555"


@pytest.mark.parametrize("cgroup, expected", [
    # docker, cgroup v1 (cgroupfs driver): one line per hierarchy
    (f"12:memory:/docker/{ID}\n11:cpu,cpuacct:/docker/{ID}\n0::/", Container(ID)),
    # docker, cgroup v2 (systemd driver)
    (f"0::/system.slice/docker-{ID}.scope", Container(ID)),
    # podman
    (f"0::/machine.slice/libpod-{ID}.scope/container", Container(ID)),
    # kubernetes + containerd, cgroup v1, cgroupfs driver
    (f"4:pids:/kubepods/burstable/pod{UID}/{ID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{ID}",
     Container(ID, UID)),
    # kubernetes + containerd, cgroup v2, systemd driver (UID with underscores)
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope",
     Container(ID, UID)),
    # kubernetes + cri-o, cgroup v2, guaranteed QoS
    (f"0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope", Container(ID, UID)),
    # kubernetes + docker (dockershim), cgroup v1
    (f"9:devices:/kubepods/besteffort/pod{UID}/{ID}", Container(ID, UID)),
    # cgroups a container made below its own, named to claim another container and pod
    (f"0::/kubepods/burstable/pod{UID}/{ID}/pod{OTHER_UID}/{OTHER}", Container(ID, UID)),
    (f"0::/system.slice/docker-{ID}.scope/x/docker-{OTHER}.scope", Container(ID)),
])
def test_container_and_pod(cgroup, expected):
    assert container_of(cgroup) == expected


@pytest.mark.parametrize("cgroup", [
    "0::/user.slice/user-1000.slice/session-3.scope",
    f"0::/user.slice/user-1000.slice/user@1000.service/docker-{ID}.scope",  # a user's cgroup claiming a container
    "0::/system.slice/containerd.service",
    f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{ID}.scope",
    "0::/",
    "",
    "garbage",
])
def test_host_processes_and_runtime_monitors_have_none(cgroup):
    assert container_of(cgroup) is None

