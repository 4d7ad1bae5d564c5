"""The seal of a policy set: which exact files were checked and tested, so only those go into service.

``dpiguard policy seal`` loads the folder, runs the checks of ``policy check`` and the RSSI's decision
tests (``policy test``), and only if all pass writes ``seal.json`` beside the files:

    {"format": 1, "version": "<policy version>", "files": {"categories.yaml": "<sha256>", ...},
     "tests": {"tests/demo-policy.test.yaml": "<sha256>"}, "sealed_at": "...", "sealed_by": "..."}

A running proxy (start-up and hot reload, with ``policies.require_seal``, the default) puts a set in
service only if its files are exactly those of the seal: same names, same sha256 (:func:`check_seal`,
run on the very bytes the set is built from). The seal is written last and atomically (a temporary
file, fsync, rename), so a partial copy, a save on a full disk, an editor's half-written file or an
edit that skipped the checks never matches it and is refused, the running set staying in service.

What it protects against, and what not: it is an integrity manifest, not a signature. It stops
accidents and incomplete deployments (the cases above, a truncated file that is still valid YAML, a
file edited by hand on one host). Someone who may write to the policy folder may also run ``policy
seal``: access to that folder (file permissions, the deployment pipeline) stays the control.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Mapping

import orjson

from dpiguard.policy.files import PolicyError, read_regular_file
from dpiguard.policy.table import policy_version

SEAL_FILE = "seal.json"
FORMAT = 1


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(contents: Mapping[str, bytes], tests: Mapping[str, bytes] | None = None, *,
             sealed_by: str = "", now: float | None = None) -> dict:
    """The seal of ``contents`` (file name → bytes, as :func:`read_policy_files` gives them)."""
    return {
        "format": FORMAT,
        "version": policy_version(contents),
        "files": {name: sha256(data) for name, data in sorted(contents.items())},
        "tests": {name: sha256(data) for name, data in sorted((tests or {}).items())},
        "sealed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now)),
        "sealed_by": sealed_by,
    }


def write_seal(directory: str | Path, seal: dict) -> Path:
    """Write ``seal.json`` atomically (temporary file in the folder, fsync, rename, fsync the folder)."""
    directory = Path(directory)
    target = directory / SEAL_FILE
    tmp = directory / f".{SEAL_FILE}.{os.getpid()}.tmp"
    data = orjson.dumps(seal, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return target


def read_seal(directory: str | Path) -> dict:
    """The seal of a folder; PolicyError if it is missing or malformed."""
    path = Path(directory) / SEAL_FILE
    try:
        data = read_regular_file(path, limit=1024 * 1024)
    except FileNotFoundError:
        raise PolicyError(path, None, "the policy set is not sealed: run 'dpiguard policy seal' once "
                                      "'policy check' and 'policy test' pass") from None
    except OSError as exc:
        raise PolicyError(path, None, f"cannot read the seal ({exc.strerror or exc})") from None
    try:
        seal = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise PolicyError(path, None, "the seal is not valid JSON (written by hand, or cut short?): "
                                      "run 'dpiguard policy seal' again") from None
    if (not isinstance(seal, dict) or seal.get("format") != FORMAT or not isinstance(seal.get("files"), dict)
            or not all(isinstance(v, str) for v in seal["files"].values())):
        raise PolicyError(path, None, "the seal is malformed: run 'dpiguard policy seal' again")
    return seal


def check_seal(directory: str | Path, contents: Mapping[str, bytes]) -> dict:
    """PolicyError unless ``contents`` are exactly the sealed files (names and sha256); the seal."""
    directory = Path(directory)
    seal = read_seal(directory)
    sealed: dict = seal["files"]
    for name in sorted(set(sealed) | set(contents)):
        if name not in contents:
            raise PolicyError(directory / name, None, f"missing, but sealed in {SEAL_FILE}")
        if name not in sealed:
            raise PolicyError(directory / name, None, f"not in the seal ({SEAL_FILE}): a file added after "
                                                      "'policy seal'; seal the set again once it is checked")
        if sha256(contents[name]) != sealed[name]:
            raise PolicyError(directory / name, None,
                              f"does not match the seal ({SEAL_FILE}): changed after 'policy seal' "
                              "(still being copied or written?); the running set stays in service until "
                              "the files and the seal agree")
    return seal

