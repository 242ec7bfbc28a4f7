"""The `service_name` a sample is filed under in a profile store such as Grafana Pyroscope."""

from __future__ import annotations

from typing import Optional

from bpfprof.collector.agent.kubernetes import PodContainer

# Pod labels that name the application, the recommended one first, then the older `app` and
# the `k8s-app` of cluster add-ons. Not app.kubernetes.io/instance: it names a whole Helm
# release, whose components would share one service.
APP_LABELS = ("app.kubernetes.io/name", "app", "k8s-app")
UNNAMED = "unknown"  # the store refuses a series without a service name


def service_name(pod: Optional[PodContainer], comm: str, label_key: str = "") -> str:
    """The pod's `label_key` label (--service-name-label), else its first app label, else
    "<namespace>/<container>" as Grafana Alloy names pods' profiles, else the process name
    (never empty)."""
    if pod is not None:
        labels = dict(pod.pod_labels)
        for key in (label_key, *APP_LABELS):
            if key and labels.get(key):
                return labels[key]
        if pod.container:
            return f"{pod.namespace}/{pod.container}"
    return comm or UNNAMED
