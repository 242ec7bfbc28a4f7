"""The agent's labels: node, pod names and service_name on every sample, one profile per service."""

import json

from bpfprof.collector.agent.kubernetes import PodMetadata
from bpfprof.collector.agent.labels import Labeller, split_by_service
from bpfprof.collector.profile import Labels, cpu_profile
from bpfprof.symbolizer.frames import Frame, FrameKind
from conftest import FIXTURES

CHECKOUT_ID = "41a9fe42631735e5598e5032c36c9d8df5023a2a6ef8e87a7c423f492f3d0a43"
CHECKOUT_POD = "0b7a3c52-5f3e-4d6b-9a1e-2c4d6e8f0a1b"
WORK = Frame(FrameKind.NATIVE, "work")
MAIN = Frame(FrameKind.NATIVE, "main")


def profile_of_three_processes():
    profile = cpu_profile(hz=19, start_ns=1_700_000_000_000_000_000)
    profile.duration_ns = 15_000_000_000
    in_pod = (("container_id", CHECKOUT_ID), ("pod_uid", CHECKOUT_POD))
    profile.add((WORK, MAIN), Labels(10, 10, "checkout", "main", in_pod), [3, 3])
    profile.add((MAIN,), Labels(10, 11, "checkout", "worker", in_pod), [1, 1])
    profile.add((WORK, MAIN), Labels(20, 20, "sshd", "sshd"), [2, 2])
    profile.add((WORK,), Labels(30, 30, "", "kworker"), [1, 1])
    return profile


def pods() -> PodMetadata:
    return PodMetadata(lambda: json.loads((FIXTURES / "kubernetes" / "pods.json").read_text()))


def test_every_sample_gets_node_pod_names_and_service():
    labelled = Labeller("node-a", pods()).label(profile_of_three_processes())
    extra = {(labels.pid, labels.tid): dict(labels.extra) for _, labels in labelled.samples}
    assert extra[(10, 10)] == {"node": "node-a", "container_id": CHECKOUT_ID, "pod_uid": CHECKOUT_POD,
                               "namespace": "shop", "pod": "checkout-7d9f8b6c5d-x2x4q", "container": "checkout",
                               "service_name": "checkout"}
    assert extra[(10, 11)] == extra[(10, 10)]
    assert extra[(20, 20)] == {"node": "node-a", "service_name": "sshd"}  # on the host: the process name
    assert extra[(30, 30)]["service_name"] == "unknown"
    assert labelled.num_samples() == 7 and labelled.duration_ns == 15_000_000_000


def test_service_name_label_and_no_kubernetes():
    labelled = Labeller("node-a", pods(), service_name_label="team").label(profile_of_three_processes())
    assert {dict(l.extra)["service_name"] for _, l in labelled.samples} == {"payments", "sshd", "unknown"}
    outside = Labeller("vm-1").label(profile_of_three_processes())
    extra = {labels.pid: dict(labels.extra) for _, labels in outside.samples}
    assert extra[10] == {"node": "vm-1", "container_id": CHECKOUT_ID, "pod_uid": CHECKOUT_POD,
                         "service_name": "checkout"}


def test_one_profile_per_service():
    parts = split_by_service(Labeller("node-a", pods()).label(profile_of_three_processes()))
    assert {service: part.num_samples() for service, part in parts.items()} == {"checkout": 4, "sshd": 2,
                                                                                 "unknown": 1}
    assert all(part.start_ns == 1_700_000_000_000_000_000 for part in parts.values())
