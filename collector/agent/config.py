"""The agent's settings: a YAML file of long option names under the command-line flags, and
the duration and size values they take."""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable

import click
import yaml

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)?$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(|B|K|KB|KiB|M|MB|MiB|G|GB|GiB|T|TB|TiB)$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "15m", "24h" or "7d"."""
    match = _DURATION.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 15m, 24h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def parse_size(text: str) -> int:
    """Bytes in "4096", "500MiB", "1G"...: K, M, G and T count in 1024s, with or without B/iB."""
    match = _SIZE.match(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a size (e.g. 500MiB, 1GiB)")
    return int(float(match.group(1)) * 1024 ** _SIZE_POWERS[match.group(2)[:1].lower()])


class Duration(click.ParamType):
    name = "DURATION"

    def convert(self, value, param, ctx):
        try:
            return value if isinstance(value, float) else parse_duration(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        try:
            return value if isinstance(value, int) and not isinstance(value, bool) else parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def read_config_file(path: str, options: Iterable[click.Option]) -> Dict[str, Any]:
    """The file's settings, keyed by the options' long names (push-url or push_url, type),
    as their parameters are named; an unreadable file or an unknown key is a bad --config value."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror or e}", param_hint="--config") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise click.BadParameter(f"{path} is not valid YAML{line}", param_hint="--config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of option names to values", param_hint="--config")
    known = {name.lstrip("-").replace("-", "_"): option for option in options if option.name != "config"
             for name in option.opts + [f"--{option.name}"] if name.startswith("--")}
    settings = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise click.BadParameter(f"{path}: unknown setting {key!r}", param_hint="--config")
        settings[known[name].name] = [value] if known[name].multiple and not isinstance(value, list) else value
    return settings


def load_config(ctx: click.Context, _param, path: str) -> None:
    """--config's callback: run before the other options, so the file's settings become their
    defaults and a flag given on the command line wins."""
    if path:
        options = [p for p in ctx.command.params if isinstance(p, click.Option)]
        ctx.default_map = {**(ctx.default_map or {}), **read_config_file(path, options)}
