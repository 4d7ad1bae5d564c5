"""What every command group shares: the configuration, the operator's trace record, options, output."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from dpiguard.audit.chain import admin_log
from dpiguard.config import Config, ConfigError, load_config
from dpiguard.times import parse_time


def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument("--config", "-c", help="configuration file (default: $DPIGUARD_CONFIG)")
    return sp


def config_path(args) -> str | None:
    return getattr(args, "config", None) or os.environ.get("DPIGUARD_CONFIG")


def load(args, *, check_files: bool) -> Config:
    """The configuration of ``--config`` or ``DPIGUARD_CONFIG``. ``check_files``: also require the key,
    certificate and policy files to exist (commands that serve or sign); management commands that only
    talk to Redis do not need them all."""
    path = config_path(args)
    if not path:
        raise ConfigError("--config", "give --config FILE or set DPIGUARD_CONFIG")
    return load_config(path, check_files=check_files)


def time_arg(value: str) -> float:
    """argparse type: a date/time as :func:`dpiguard.times.parse_time` reads it (UTC unless an offset)."""
    try:
        return parse_time(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def audit_admin(cfg: Config, action: str, **fields) -> None:
    """Every management command leaves a trace record too."""
    log = admin_log(cfg)
    try:
        log.write({"event": "admin", "action": action, "outcome": "allow", "reason": "ok",
                   "operator": getpass.getuser(), **fields})
    finally:
        log.close()


def emit(text: str, out: str | None) -> None:
    """Write a command's output to ``out`` (a file) or standard output."""
    if out:
        Path(out).write_text(text, encoding="utf-8")
        print(f"written to {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
