"""The ``dpiguard`` command line: one module per command group, the shared helpers in ``common``.

    dpiguard demo                         everything on localhost, in one command        (run.py)
    dpiguard run --config FILE            the proxy in front of a real DPI                (run.py)
    dpiguard config check | keys init | totp-code                                         (run.py)
    dpiguard users ... | sessions revoke USER                                             (users.py)
    dpiguard careteam unit-add|unit-remove|stay-add|stay-end|stay-remove|assign|unassign|show  (careteam.py)
    dpiguard adt listen|send|replay|visits | import stays|members|assignments              (adt.py)
    dpiguard breakglass review | objections add|remove|list|import                        (breakglass.py)
    dpiguard policy check|test|explain|diff                                               (policy.py)
    dpiguard audit verify|prune|unthrottle|query|who-accessed|summary|report|ship|collect|export  (audit.py)
    dpiguard privacy monitor|alerts|mark|figures|staff ...|vip ...                         (privacy.py)

The configuration file comes from ``--config`` or the ``DPIGUARD_CONFIG`` environment variable.
Exit codes: 0 success, 1 operation refused or failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import sys

import redis

from dpiguard.cli import adt, audit, breakglass, careteam, policy, privacy, run, users
from dpiguard.config import ConfigError
from dpiguard.policy.files import PolicyError

GROUPS = (run, users, careteam, adt, policy, breakglass, audit, privacy)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpiguard", description="Access-control proxy for hospital patient records.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"dpiguard: {exc}", file=sys.stderr)
        return 2
    except PolicyError as exc:
        print(f"dpiguard: policy error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (ValueError, KeyError) as exc:  # clear message, no traceback for operator errors
        print(f"dpiguard: {exc}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"dpiguard: Redis error: {exc}", file=sys.stderr)
        return 1
