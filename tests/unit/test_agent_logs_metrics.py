"""The agent's own observability: JSON log lines, a log file reopened after rotation, /metrics."""

import json
import logging
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bpfprof.collector.agent.health import STALLED_AFTER_S, STARTUP_GRACE_S
from bpfprof.collector.agent.logs import log, setup_logging
from bpfprof.collector.agent.metrics import AgentStats, parse_address, serve_metrics
from bpfprof.collector.errors import UsageError


@pytest.fixture
def restore_logger():
    handlers, level, propagate = log.handlers[:], log.level, log.propagate
    yield
    for handler in log.handlers:
        handler.close()
    log.handlers[:], log.level, log.propagate = handlers, level, propagate


def test_log_lines_are_json_with_fields(tmp_path, restore_logger):
    path = tmp_path / "agent.log"
    setup_logging(str(path), "info")
    log.info("interval cut", extra={"fields": {"samples": {"cpu": 12}, "series": 2}})
    log.debug("not at info")
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        log.exception("cannot write")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["msg"] for line in lines] == ["interval cut", "cannot write"]
    assert lines[0]["level"] == "info" and lines[0]["samples"] == {"cpu": 12} and lines[0]["series"] == 2
    assert lines[0]["time"].endswith("Z") and "T" in lines[0]["time"]
    assert lines[1]["level"] == "error" and "No space left on device" in lines[1]["error"]


def test_reopen_follows_logrotate(tmp_path, restore_logger):
    path = tmp_path / "agent.log"
    handler = setup_logging(str(path), "info")
    log.info("before")
    path.rename(tmp_path / "agent.log.1")
    log.info("still to the moved file")
    handler.reopen()
    log.info("after")
    assert [json.loads(l)["msg"] for l in (tmp_path / "agent.log.1").read_text().splitlines()] == \
        ["before", "still to the moved file"]
    assert [json.loads(l)["msg"] for l in path.read_text().splitlines()] == ["after"]


def test_stderr_when_no_file(capsys, restore_logger):
    assert setup_logging(None, "warning") is None
    log.warning("push failed", extra={"fields": {"status": 503}})
    entry = json.loads(capsys.readouterr().err)
    assert entry["msg"] == "push failed" and entry["status"] == 503 and entry["level"] == "warning"
    assert logging.getLogger("bpfprof.agent").propagate is False


def test_metrics_addresses():
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address(":9464") == ("0.0.0.0", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "host:", "host:http", "host:70000"):
        with pytest.raises(UsageError, match="--metrics-addr takes HOST:PORT"):
            parse_address(bad)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served():
    """serve_metrics on a free loopback port; yields a function that starts it and returns
    the base URL."""
    servers = []

    def serve(read, clock) -> str:
        port = free_port()
        servers.append(serve_metrics(f"127.0.0.1:{port}", read, clock))
        return f"http://127.0.0.1:{port}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def get(url: str):
    """(status, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def metric_values(url: str) -> dict:
    status, text = get(url + "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_serves_the_stats_and_process_figures(served):
    stats = AgentStats(samples={"cpu": 570, "block": 31}, lost={"LOSS_COUNTS_FULL": 2}, processes=140,
                       processes_seen=2200, cached_binaries=48, cached_frames=9000, open_files=31, profiles_written=8,
                       profile_write_failures=1, profiles_removed=3, queue_depth=4, pushes=7, push_failures=5,
                       pushes_dropped=1, last_cut=1_800_000_000.5, last_drain=500.0,
                       cache_bytes={"native": 50 << 20, "python": 3 << 20})
    values = metric_values(served(lambda: stats, Clock(500.25)))
    assert values[("bpfprof_samples_total", (("type", "cpu"),))] == 570
    assert values[("bpfprof_samples_total", (("type", "block"),))] == 31
    assert values[("bpfprof_lost_total", (("reason", "LOSS_COUNTS_FULL"),))] == 2
    assert values[("bpfprof_symbol_cache_bytes", (("cache", "native"),))] == 50 << 20
    assert values[("bpfprof_symbol_cache_bytes", (("cache", "python"),))] == 3 << 20
    expected = {"bpfprof_processes": 140, "bpfprof_processes_seen_total": 2200, "bpfprof_symbol_cache_binaries": 48,
                "bpfprof_symbol_cache_frames": 9000, "bpfprof_open_files": 31, "bpfprof_profiles_written_total": 8,
                "bpfprof_profile_write_failures_total": 1, "bpfprof_profiles_removed_total": 3,
                "bpfprof_push_queue_depth": 4, "bpfprof_pushes_total": 7, "bpfprof_push_failures_total": 5,
                "bpfprof_pushes_dropped_total": 1, "bpfprof_last_interval_cut_timestamp_seconds": 1_800_000_000.5,
                "bpfprof_last_drain_age_seconds": 0.25, "bpfprof_healthy": 1}
    for name, value in expected.items():
        assert values[(name, ())] == value, name
    assert values[("process_resident_memory_bytes", ())] > 1 << 20
    assert ("process_cpu_seconds_total", ()) in values


def test_a_taken_metrics_port_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Exception, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            serve_metrics(f"127.0.0.1:{port}", AgentStats)


def test_healthz_turns_503_once_drains_stall(served):
    clock = Clock(1000.0)
    stats = AgentStats(last_drain=1000.0)
    url = served(lambda: stats, clock)
    assert get(url + "/healthz") == (200, "ok: last drain 0.0 s ago\n")
    clock.now += STALLED_AFTER_S  # at the bound: still healthy
    assert get(url + "/healthz")[0] == 200
    clock.now += 1  # no drain since: the loop is stuck, though this thread answers
    status, body = get(url + "/healthz")
    assert status == 503 and body.count("\n") == 1
    assert body.startswith(f"no drain for {STALLED_AFTER_S + 1:.0f} s")
    values = metric_values(url)
    assert values[("bpfprof_healthy", ())] == 0
    assert values[("bpfprof_last_drain_age_seconds", ())] == STALLED_AFTER_S + 1
    stats = AgentStats(last_drain=clock.now)  # drains resume
    assert get(url + "/healthz")[0] == 200 and metric_values(url)[("bpfprof_healthy", ())] == 1


def test_healthz_allows_the_start_up_then_fails_without_a_first_drain(served):
    clock = Clock(50.0)
    url = served(AgentStats, clock)  # started at 50, no drain yet
    clock.now += STARTUP_GRACE_S
    status, body = get(url + "/healthz")
    assert status == 200 and body.startswith("starting")
    clock.now += 1
    status, body = get(url + "/healthz")
    assert status == 503 and "never started sampling" in body
    assert metric_values(url)[("bpfprof_last_drain_age_seconds", ())] == STARTUP_GRACE_S + 1
