"""The deployment files in deploy/: the Kubernetes manifests against the API schema, the
systemd unit through systemd-analyze, and of the Dockerfile what can be checked without
building it. Every command line they give the agent is read by the agent's own parser."""

from __future__ import annotations

import copy
import posixpath
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import kubernetes_validate
import pytest
import yaml

from bpfprof.collector.agent.agent import STOP_WITHIN_S
from bpfprof.collector.agent.health import STALLED_AFTER_S, STARTUP_GRACE_S
from bpfprof.collector.cli import cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONFIG = DEPLOY / "agent.yaml"
MANIFEST = DEPLOY / "kubernetes" / "daemonset.yaml"
UNIT = DEPLOY / "systemd" / "bpfprof-agent.service"
DOCKERFILE = DEPLOY / "Dockerfile"
CONFIG_PATH = "/etc/bpfprof/agent.yaml"  # in the image, the pod and on a VM alike

# The oldest Kubernetes with every field the manifest uses (securityContext.appArmorProfile
# is 1.30), and the newest the validator knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
CAPABILITIES = {"BPF", "PERFMON", "CHECKPOINT_RESTORE", "SYS_PTRACE", "DAC_READ_SEARCH", "SYSLOG",
                "SYS_RESOURCE"}
# Host path -> where the agent sees it; all read-only.
HOST_MOUNTS = {"/sys/kernel/tracing": "/sys/kernel/tracing", "/lib/modules": "/lib/modules",
               "/usr": "/host/usr"}
PROFILES_DIR = "/var/lib/bpfprof"  # the one host directory the agent writes


def agent_params(args: List[str], files: Dict[str, Path]) -> dict:
    """`bpfprof agent ARGS` as the agent's parser reads them (config file included), with the
    deployed paths in `files` read from the local copies. Raises click's errors on bad input."""
    local = [str(files.get(arg, arg)) for arg in args]
    return cli.commands["agent"].make_context("agent", local).params


def metrics_port(params: dict) -> int:
    return int(params["metrics_addr"].rpartition(":")[2])


# Kubernetes


@pytest.fixture(scope="module")
def documents() -> List[dict]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def the(documents: List[dict], kind: str) -> dict:
    found = [doc for doc in documents if doc["kind"] == kind]
    assert len(found) == 1, f"{MANIFEST.name} should hold one {kind}, holds {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def pod(documents) -> dict:
    return the(documents, "DaemonSet")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    (agent,) = pod["containers"]
    return agent


@pytest.fixture(scope="module")
def configmap_config(documents, tmp_path_factory) -> Path:
    """The ConfigMap's agent.yaml, as the pod reads it."""
    path = tmp_path_factory.mktemp("configmap") / "agent.yaml"
    path.write_text(the(documents, "ConfigMap")["data"]["agent.yaml"])
    return path


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_document_validates_against_the_schema(documents, version):
    for doc in documents:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(map(str, e.path))
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {e.message} (Kubernetes {version})")


def test_validation_is_strict_about_unknown_fields(documents):
    # Guards the test above: a misspelt field deep in the pod spec must fail.
    daemonset = copy.deepcopy(the(documents, "DaemonSet"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["priviledged"] = False
    with pytest.raises(kubernetes_validate.ValidationError, match="priviledged"):
        kubernetes_validate.validate(daemonset, K8S_VERSIONS[-1], strict=True)


def test_host_pid_without_privileged(documents, pod, container):
    assert pod["hostPID"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostIPC")
    assert "privileged: true" not in MANIFEST.read_text()
    assert container["securityContext"]["privileged"] is False
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_capabilities_are_the_listed_ones(container):
    capabilities = container["securityContext"]["capabilities"]
    assert capabilities["drop"] == ["ALL"]
    assert set(capabilities["add"]) == CAPABILITIES
    assert len(capabilities["add"]) == len(CAPABILITIES)


def test_host_mounts_present_and_read_only(pod, container):
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    seen = {}
    for name, host_path in host_paths.items():
        if host_path == PROFILES_DIR:
            assert not mounts[name].get("readOnly"), "the agent writes its profiles there"
            continue
        assert mounts[name].get("readOnly") is True, f"host {host_path} is mounted writable"
        seen[host_path] = mounts[name]["mountPath"]
    assert seen == HOST_MOUNTS
    # Everything else the pod mounts read-only too, but for its profiles and /tmp.
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {PROFILES_DIR, "/tmp"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_resources_have_requests_and_limits(container):
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) == {"cpu", "memory"}, kind


def test_node_name_from_the_downward_api(container):
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_pods_from_this_nodes_kubelet_with_its_certificate_checked(container, configmap_config):
    env = {e["name"]: e for e in container["env"]}
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    params = agent_params(container["args"], {CONFIG_PATH: configmap_config})
    # Kubernetes puts the node's address in for $(HOST_IP) in args.
    assert params["kubelet_url"] == "https://$(HOST_IP):10250"
    assert params["kubelet_insecure_tls"] is False


def test_runs_on_every_node_and_stops_in_time(pod):
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["terminationGracePeriodSeconds"] > STOP_WITHIN_S


def test_rbac_reads_kubelet_pod_lists_and_nothing_more(documents, pod):
    account = the(documents, "ServiceAccount")["metadata"]
    assert pod["serviceAccountName"] == account["name"]
    # Not "nodes/proxy" (exec into every pod), not "pods" (every pod through the API server).
    assert the(documents, "ClusterRole")["rules"] == [
        {"apiGroups": [""], "resources": ["nodes/pods"], "verbs": ["get"]}]
    binding = the(documents, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == the(documents, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                    "namespace": account["namespace"]}]
    assert account["namespace"] == the(documents, "Namespace")["metadata"]["name"]


def test_push_credentials_are_files_from_an_optional_secret(pod, container):
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["optional"] is True
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    # The paths deploy/agent.yaml names for the credential files are in that mount.
    for path in re.findall(r"push-\w+-file: (\S+)", CONFIG.read_text()):
        assert path.startswith(mount["mountPath"] + "/"), path
    assert "BPFPROF_PUSH" not in str(container.get("env"))


def test_configmap_holds_deploy_agent_yaml(documents):
    # deploy/agent.yaml is the one source; the ConfigMap carries a copy of it, word for word.
    assert the(documents, "ConfigMap")["data"]["agent.yaml"] == CONFIG.read_text(), (
        "copy deploy/agent.yaml into the ConfigMap's agent.yaml in " + str(MANIFEST.relative_to(ROOT)))


def test_container_args_parse_as_agent_options(pod, container, configmap_config):
    # No command: the image's entrypoint, `bpfprof agent`, takes the args.
    assert "command" not in container
    (config_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_PATH]
    (config_volume,) = [v for v in pod["volumes"] if v["name"] == config_mount["name"]]
    assert config_mount["subPath"] == "agent.yaml" and "configMap" in config_volume
    params = agent_params(container["args"], {CONFIG_PATH: configmap_config})
    assert params["output_dir"] or params["push_url"], "the agent needs somewhere to put profiles"
    assert params["output_dir"] is None or params["output_dir"].startswith(PROFILES_DIR + "/")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ports[container["livenessProbe"]["httpGet"]["port"]] == metrics_port(params)


def test_metrics_on_loopback_but_in_the_pods_own_network(pod, container, configmap_config):
    # deploy/agent.yaml, which the systemd unit and a docker run on the host's network read,
    # keeps metrics off the host's interfaces; the pod, in its own network namespace, serves
    # them on its address for Prometheus and the kubelet's probe.
    assert agent_params(["--config", CONFIG_PATH], {CONFIG_PATH: CONFIG})["metrics_addr"].startswith("127.0.0.1:")
    assert not pod.get("hostNetwork")
    assert agent_params(container["args"], {CONFIG_PATH: configmap_config})["metrics_addr"].startswith("0.0.0.0:")
    assert "--metrics-addr" not in unit_settings()["ExecStart"]


# systemd


def unit_settings() -> Dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_systemd_unit_verifies(tmp_path):
    # verify insists that ExecStart names an executable: point it at this venv's bpfprof.
    executable = Path(sys.executable).with_name("bpfprof")
    deployed = shlex.split(unit_settings()["ExecStart"])[0]
    unit = tmp_path / UNIT.name
    if not executable.exists():
        executable = Path(sys.executable)
    unit.write_text(UNIT.read_text().replace(deployed, str(executable)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30)
    # Unknown keys are only warned about, naming the file: any line that names it fails.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def test_systemd_unit_runs_the_agent_as_deployed():
    settings = unit_settings()
    executable, *args = shlex.split(settings["ExecStart"])
    assert executable == "/opt/bpfprof/.venv/bin/bpfprof"  # where deploy/README.md installs it
    assert args[0] == "agent"
    assert agent_params(args[1:], {CONFIG_PATH: CONFIG})["output_dir"].startswith(PROFILES_DIR + "/")
    assert settings["StateDirectory"] == PROFILES_DIR.rpartition("/")[2]
    assert shlex.split(settings["ExecReload"])[1:] == ["-HUP", "$MAINPID"]
    assert STOP_WITHIN_S < float(settings["TimeoutStopSec"].rstrip("s"))
    assert set(settings["CapabilityBoundingSet"].split()) == {f"CAP_{c}" for c in CAPABILITIES}


def test_systemd_restarts_a_stalled_agent_by_the_bounds_of_healthz():
    # The agent notifies READY=1 at its first drain and WATCHDOG=1 at each
    # (collector/agent/service_manager.py); systemd judges by the bounds /healthz uses.
    settings = unit_settings()
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert float(settings["TimeoutStartSec"].rstrip("s")) == STARTUP_GRACE_S
    assert float(settings["WatchdogSec"].rstrip("s")) == STALLED_AFTER_S
    assert settings["Restart"] in ("on-failure", "on-watchdog", "on-abnormal", "always")
    assert "AF_UNIX" in settings["RestrictAddressFamilies"].split()  # the notification socket


# Dockerfile (no engine here to build it)


def dockerfile_instructions() -> List[Tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = (line.strip() for line in text.splitlines())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def dockerfile_copies() -> Dict[str, str]:
    """Source in the build context (the repository root) -> its absolute path in the image."""
    copies, workdir = {}, "/"
    for instruction, rest in dockerfile_instructions():
        if instruction == "WORKDIR":
            workdir = posixpath.join(workdir, rest)
        elif instruction == "COPY":
            *sources, dest = [word for word in shlex.split(rest) if not word.startswith("--")]
            target = posixpath.normpath(posixpath.join(workdir, dest))
            for source in sources:
                # A directory's contents go into dest; files into dest/ by their own name.
                into = (dest.endswith("/") or len(sources) > 1) and not (ROOT / source).is_dir()
                copies[source] = posixpath.join(target, posixpath.basename(source)) if into else target
    return copies


def dockerfile_value(instruction: str) -> str:
    (value,) = [rest for word, rest in dockerfile_instructions() if word == instruction]
    return value


def test_dockerfile_copies_files_that_exist():
    for source in dockerfile_copies():
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_dockerfile_copies_every_package_and_what_the_install_reads():
    # Each lands where it is in the repository, under WORKDIR: scripts/setup installs from there.
    workdir = dockerfile_value("WORKDIR")
    copied = [source.rstrip("/") for source, target in dockerfile_copies().items()
              if target == posixpath.join(workdir, source.rstrip("/"))]
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.findall(r'"bpfprof((?:\.\w+)*)"', re.search(r"\npackages = \[(.*?)\]", pyproject).group(1))
    needed = [package.lstrip(".").replace(".", "/") for package in packages if package]
    needed += [path.name for path in ROOT.glob("*.py")]  # the bpfprof package itself: the root
    needed += ["pyproject.toml", re.search(r'\nreadme = "(.+?)"', pyproject).group(1), "scripts/setup"]
    for path in needed:
        assert any(path == source or path.startswith(source + "/") for source in copied), path


def test_image_installs_with_scripts_setup_and_runs_the_agent_on_the_config_it_copies():
    copies = dockerfile_copies()
    workdir = dockerfile_value("WORKDIR")
    assert copies["scripts/setup"] == f"{workdir}/scripts/setup"
    assert "scripts/setup;" in dockerfile_value("RUN")
    # scripts/setup makes the venv at .venv beside the sources.
    assert yaml.safe_load(dockerfile_value("ENTRYPOINT")) == [f"{workdir}/.venv/bin/bpfprof", "agent"]
    assert copies["deploy/agent.yaml"] == CONFIG_PATH
    params = agent_params(yaml.safe_load(dockerfile_value("CMD")), {CONFIG_PATH: CONFIG})
    assert params["output_dir"] or params["push_url"]


def test_the_daemonset_runs_the_image_this_dockerfile_builds(container):
    # The build command in the Dockerfile's header names the tag the DaemonSet pulls.
    assert f"-t {container['image']} " in DOCKERFILE.read_text()
