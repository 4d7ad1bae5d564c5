"""Test helper: seal a policy folder as it is, the way ``dpiguard policy seal`` does once its checks
and decision tests pass (tests that edit policies put their edit in service with it)."""

from __future__ import annotations

from pathlib import Path

from dpiguard.policy.seal import manifest, write_seal
from dpiguard.policy.table import read_policy_files


def seal(directory: str | Path) -> Path:
    return write_seal(directory, manifest(read_policy_files(directory), sealed_by="tests"))
