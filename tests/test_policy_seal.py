"""Policies go into service only as a sealed set (dpiguard/policy/seal.py), and the watcher never
blocks on a file that is not a regular file (a FIFO, a directory)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import threading
import time
from pathlib import Path

import orjson
import pytest

from dpiguard.cli import main
from dpiguard.config import load_config
from dpiguard.edge.ops import public_text
from dpiguard.policy.files import PolicyError
from dpiguard.policy.reload import files_fingerprint
from dpiguard.policy.seal import SEAL_FILE, read_seal
from dpiguard.policy.snapshot import PolicySet
from dpiguard.services import build_services
from tests.test_policy import edit

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "policies"

pytestmark = pytest.mark.timeout(120)


def cli(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(argv))
    return code, out.getvalue()


def truncate_before_masks(directory: Path) -> None:
    """fhir.yaml cut just before its masks: section (a partial copy): still valid YAML."""
    text = (directory / "fhir.yaml").read_text(encoding="utf-8")
    (directory / "fhir.yaml").write_text(text[:text.index("\nmasks:") + 1], encoding="utf-8")


def test_the_shipped_policies_are_sealed():
    """The repository's policies/ (and so the demo, and the wheel's copy) carry a seal that matches."""
    policies = PolicySet.load(POLICIES, sealed=True)
    seal = read_seal(POLICIES)
    assert seal["version"] == policies.version and set(seal["files"]) == set(policies.contents)
    assert "tests/demo-policy.test.yaml" in seal["tests"]


def test_a_truncated_fhir_yaml_never_goes_into_service(services, r):
    directory, s = services
    before = s.policies
    assert before.fhir.masks  # pharmacists have Patient.address masked
    truncate_before_masks(directory)
    # It is valid: the editing tools accept it (that is the trap) ...
    assert not PolicySet.load(directory).fhir.masks
    code, out = cli("policy", "check", "--dir", str(directory))
    assert code == 0 and "not sealed" in out and "fhir.yaml" in out  # valid, but says it is not in service
    # ... but it does not match the seal, so the running proxy keeps the sealed set.
    assert s.reloader.check() is False
    assert s.policies is before and s.policies.fhir.masks
    assert "fhir.yaml" in s.reloader.error and "seal" in s.reloader.error
    assert s.health()["policy_error"] == public_text(s.reloader.error)  # no folder of the host
    # Readiness stays green: the sealed set in service is still valid (documented choice).
    s.monitor.probe()
    readiness = s.monitor.readiness()
    assert readiness["policy_loaded"] and readiness["policy_version"] == before.version


def test_a_proxy_does_not_start_on_an_unsealed_set(tmp_path, services):
    directory, s = services
    truncate_before_masks(directory)
    with pytest.raises(PolicyError, match="does not match the seal"):
        build_services(s.config)
    (directory / SEAL_FILE).unlink()
    with pytest.raises(PolicyError, match="not sealed"):
        build_services(s.config)


def test_policy_seal_checks_and_tests_first_then_the_edit_goes_into_service(services):
    directory, s = services
    before = s.policies
    sealed_before = (directory / SEAL_FILE).read_bytes()
    # An edit that breaks the RSSI's decision tests (nurses lose lab results): not sealed.
    edit(directory / "policy.csv", "p, nurse, biology, read", "# p, nurse, biology, read")
    code, out = cli("policy", "seal", "--dir", str(directory))
    assert code == 1 and "failed: not sealed" in out
    assert (directory / SEAL_FILE).read_bytes() == sealed_before
    assert s.reloader.check() is False and s.policies is before
    # An invalid file: not sealed either.
    (directory / "policy.csv").write_text("p, nurse\n")
    code, out = cli("policy", "seal", "--dir", str(directory))
    assert code == 1 and "policy.csv" in out and "not sealed" in out
    # A valid edit that passes the tests: sealed, and the proxy applies it.
    shutil.copy(POLICIES / "policy.csv", directory / "policy.csv")
    with (directory / "policy.csv").open("a", encoding="utf-8") as f:
        f.write("p, secretary, prescriptions, read\n")
    code, out = cli("policy", "seal", "--dir", str(directory), "--by", "rssi.dupont")
    assert code == 0 and "sealed version" in out, out
    seal = orjson.loads((directory / SEAL_FILE).read_bytes())
    assert seal["sealed_by"] == "rssi.dupont" and seal["tests"]
    assert s.reloader.check() is True
    assert s.policies.version == seal["version"] != before.version
    assert s.policies.permits(["secretary"], "prescriptions", "read")


def test_policy_seal_without_tests_is_refused_unless_asked(tmp_path):
    directory = tmp_path / "p"
    shutil.copytree(POLICIES, directory, ignore=shutil.ignore_patterns("tests"))
    code, out = cli("policy", "seal", "--dir", str(directory))
    assert code == 1 and "no decision tests" in out
    code, out = cli("policy", "seal", "--dir", str(directory), "--without-tests")
    assert code == 0


def _in_thread(fn, timeout=5.0):
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn} blocked"
    return result[0]


def test_a_fifo_in_place_of_policy_csv_is_refused_without_blocking(services):
    directory, s = services
    before = s.policies
    (directory / "policy.csv").unlink()
    os.mkfifo(directory / "policy.csv")  # nobody ever writes to it: a plain open() would wait forever
    started = time.monotonic()
    assert _in_thread(lambda: files_fingerprint(directory)) != ""
    assert _in_thread(s.reloader.check) is False
    assert time.monotonic() - started < 3.0
    assert "policy.csv" in s.reloader.error and "FIFO" in s.reloader.error
    assert s.policies is before
    code, out = _in_thread(lambda: cli("policy", "check", "--dir", str(directory)))
    assert code == 1 and "FIFO" in out


def test_a_directory_in_place_of_fhir_yaml_is_refused(services):
    directory, s = services
    (directory / "fhir.yaml").unlink()
    (directory / "fhir.yaml").mkdir()
    assert _in_thread(s.reloader.check) is False
    assert "fhir.yaml" in s.reloader.error and "directory" in s.reloader.error


def test_the_demo_configuration_requires_the_seal(tmp_path):
    from dpiguard.demo.runner import write_demo_config

    path = write_demo_config(tmp_path, host="127.0.0.1", port=1, upstream_port=2, redis_url="redis://127.0.0.1:1/0",
                             policies_dir=POLICIES)
    assert load_config(path).policies.require_seal is True
