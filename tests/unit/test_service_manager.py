"""sd_notify for the systemd unit: READY=1 with the first drain, WATCHDOG=1 with every one."""

import logging
import socket

import pytest

from bpfprof.collector.agent.service_manager import ServiceManager


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    """A datagram socket where systemd would listen, and its NOTIFY_SOCKET value."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        value = str(tmp_path / "notify")
        listener.bind(value)
    else:
        listener.bind("\0bpfprof-test-" + tmp_path.name)
        value = "@" + listener.getsockname()[1:].decode()
    listener.settimeout(5)
    yield listener, value
    listener.close()


def test_ready_with_the_first_drain_then_a_keep_alive_with_each(notify_socket):
    listener, value = notify_socket
    manager = ServiceManager({"NOTIFY_SOCKET": value})
    for _ in range(3):
        manager.drained()
    assert [listener.recv(64) for _ in range(3)] == [b"READY=1\nWATCHDOG=1", b"WATCHDOG=1", b"WATCHDOG=1"]


def test_nothing_without_systemd():
    ServiceManager({}).drained()  # no socket, no error


def test_a_socket_gone_is_one_warning_and_the_agent_goes_on(tmp_path, caplog):
    manager = ServiceManager({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING, logger="bpfprof.agent"):
        manager.drained()
        manager.drained()
    assert [r.getMessage() for r in caplog.records] == ["cannot notify systemd"]
