"""The agent's settings: durations, sizes, and a config file under the flags."""

import pytest

from bpfprof.collector.agent.config import parse_duration, parse_size
from bpfprof.collector.cli import main
from bpfprof.collector.cli.agent import agent


def test_durations():
    assert parse_duration("90") == 90
    assert parse_duration("15s") == 15
    assert parse_duration("1.5m") == 90
    assert parse_duration("24h") == 86400
    assert parse_duration("7d") == 7 * 86400
    for bad in ("", "m", "15 minutes", "-1s", "1w"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_sizes():
    assert parse_size("4096") == 4096
    assert parse_size("64K") == 65536
    assert parse_size("500MiB") == 500 << 20
    assert parse_size("1G") == parse_size("1GB") == parse_size("1gib") == 1 << 30
    for bad in ("", "MiB", "1 PB", "-5M"):
        with pytest.raises(ValueError):
            parse_size(bad)


def parse(*args):
    """The agent's settings as its command line and config file give them, without running it."""
    return agent.make_context("agent", list(args)).params


def test_defaults():
    params = parse("--output-dir", "/tmp/x")
    assert params["frequency"] == 19
    assert params["interval"] == 15
    assert params["retention_age"] == 86400
    assert params["retention_size"] == 1 << 30
    assert params["push_queue"] == 60
    assert params["types"] == ()


def test_config_file_sets_defaults_and_flags_win(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text(
        "frequency: 49\n"
        "interval: 30s\n"
        "type: block\n"  # a single value for a repeatable option
        "output_dir: /var/lib/bpfprof\n"
        "push-url: https://pyroscope.example:4040\n"
        "retention-size: 200MiB\n"
        "no-kernel: true\n"
    )
    params = parse("--config", str(config))
    assert params["frequency"] == 49
    assert params["interval"] == 30
    assert params["types"] == ("block",)
    assert params["output_dir"] == "/var/lib/bpfprof"
    assert params["push_url"] == "https://pyroscope.example:4040"
    assert params["retention_size"] == 200 << 20
    assert params["no_kernel"] is True
    # The flags win, wherever --config stands on the line.
    params = parse("-F", "99", "--config", str(config), "-t", "cpu", "-t", "wall", "--interval", "5s")
    assert params["frequency"] == 99
    assert params["types"] == ("cpu", "wall")
    assert params["interval"] == 5
    assert params["output_dir"] == "/var/lib/bpfprof"


@pytest.mark.parametrize("text, message", [
    ("push_password: hunter2\n", "unknown setting 'push_password'"),
    ("interval: soon\n", "'soon' is not a duration"),
    ("frequency: [\n", "is not valid YAML (line 2)"),
    ("- a list\n", "must hold a mapping"),
])
def test_bad_config_file_is_one_line(tmp_path, capsys, text, message):
    config = tmp_path / "agent.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit:
        main(["agent", "--config", str(config)])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("args, message", [
    (["--config", "/nonexistent/agent.yaml"], "cannot read /nonexistent/agent.yaml"),
    ([], "needs somewhere to put profiles"),
    (["--output-dir", "/tmp", "--interval", "0.5s"], "--interval must be at least 1s"),
    (["--output-dir", "/tmp", "--retention-size", "lots"], "'lots' is not a size"),
])
def test_bad_settings_are_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        main(["agent", *args])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
