"""Policy hot reload: valid edits swap atomically, invalid edits keep the running policy and are reported."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from dpiguard.audit.chain import AuditLog, read_records
from dpiguard.policy.table import Policy
from dpiguard.policy.reload import PolicyReloader, instances_key, version_key

from .test_policy import BROKEN_VARIANTS, POLICIES, edit


class Target:
    """Stands for the Pipeline: only its ``policy`` attribute matters to the reloader."""

    def __init__(self, policy: Policy):
        self.policy = policy


@pytest.fixture
def setup(tmp_path, r):
    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    audit = AuditLog(tmp_path / "audit.jsonl", "t1").open()
    target = Target(Policy.load(directory))
    swaps, published = [], []
    reloader = PolicyReloader(target=target, directory=directory, interval=0.05, audit=audit,
                              on_swap=lambda: swaps.append(target.policy.version), redis_client=r,
                              prefix="pt", instance_id="t1", publish=published.append)
    yield directory, target, reloader, swaps, published, tmp_path / "audit.jsonl"
    reloader.stop()
    audit.close()


def test_valid_edit_is_swapped_and_announced(setup, r):
    directory, target, reloader, swaps, published, audit_path = setup
    old = target.policy
    assert reloader.check() is None  # nothing changed
    edit(directory / "policy.csv", "p, nurse, biology, read", "# p, nurse, biology, read")
    assert reloader.check() is True
    assert target.policy is not old and target.policy.version != old.version
    assert not target.policy.permits(["nurse"], "biology", "read")
    assert swaps == [target.policy.version] and published == ["all"]
    assert r.get(version_key("pt")).decode() == target.policy.version
    assert r.hget(instances_key("pt"), "t1").decode().startswith(target.policy.version + "|")
    rec = [x for x in read_records(audit_path) if x["event"] == "policy_reload"][-1]
    assert (rec["outcome"], rec["old_version"], rec["new_version"]) == ("allow", old.version, target.policy.version)
    status = reloader.status()
    assert status["policy_in_sync"] and status["policy_error"] is None and status["policy_reloads"] == 1


@pytest.mark.parametrize("breaker", BROKEN_VARIANTS, ids=lambda f: f.__name__)
def test_invalid_edit_keeps_running_policy(setup, breaker):
    directory, target, reloader, swaps, published, audit_path = setup
    old = target.policy
    file_name, _, words = breaker(directory)
    assert reloader.check() is False
    assert target.policy is old and swaps == [] and published == []
    assert words in reloader.error and file_name in reloader.error
    assert reloader.status()["policy_error"] == reloader.error
    rec = [x for x in read_records(audit_path) if x["event"] == "policy_reload"][-1]
    assert rec["outcome"] == "deny" and rec["policy_version"] == old.version and words in rec["detail"]
    assert reloader.check() is None  # reported once, not at every tick
    # Putting the files back clears the error without a swap.
    shutil.rmtree(directory)
    shutil.copytree(POLICIES, directory)
    assert reloader.check() is None
    assert reloader.error is None and target.policy is old


def test_watcher_thread_applies_edits_and_never_exposes_a_missing_policy(setup):
    directory, target, reloader, swaps, published, _ = setup
    seen_versions: set[str] = set()
    stop = threading.Event()
    problems = []

    def reader():
        while not stop.is_set():
            policy = target.policy
            if policy is None or not policy.routes.routes:
                problems.append("empty policy seen")
            seen_versions.add(policy.version)
            time.sleep(0.0005)

    thread = threading.Thread(target=reader)
    thread.start()
    reloader.start()
    try:
        first = target.policy.version
        (directory / "policy.csv").write_text("")  # broken: empty
        deadline = time.monotonic() + 5
        while reloader.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reloader.error and "file is empty" in reloader.error
        assert target.policy.version == first
        shutil.copy(POLICIES / "policy.csv", directory / "policy.csv")
        with (directory / "policy.csv").open("a") as f:
            f.write("p, reception, clinical_notes, read\n")
        while target.policy.version == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert target.policy.permits(["reception"], "clinical_notes", "read")
        assert reloader.error is None
        while target.policy.version not in seen_versions and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert seen_versions == {first, target.policy.version}


def test_bus_all_event_triggers_an_immediate_look(setup):
    directory, target, reloader, *_ = setup
    reloader.interval = 3600  # only a poke can make it look
    reloader.start()
    time.sleep(0.1)
    edit(directory / "policy.csv", "p, nurse, biology, read", "# p, nurse, biology, read")
    old = target.policy.version
    reloader.on_bus_event("all", "")
    deadline = time.monotonic() + 5
    while target.policy.version == old and time.monotonic() < deadline:
        time.sleep(0.02)
    assert target.policy.version != old


# -- companion files (fhir.yaml, breakglass.yaml, careteam.yaml), through the real service wiring ----
@pytest.fixture
def services(tmp_path, redis_server, r):
    from dpiguard.config import load_config
    from dpiguard.demo.runner import write_demo_config
    from dpiguard.demo.redis import free_port
    from dpiguard.services import build_services

    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    config_path = write_demo_config(tmp_path, host="127.0.0.1", port=free_port(), upstream_port=free_port(),
                                    redis_url=redis_server.url, policies_dir=directory,
                                    extra={"policies": {"dir": str(directory), "reload_interval": 5}})
    s = build_services(load_config(config_path))
    yield directory, s
    s.stop()


def test_companion_file_edit_is_versioned_validated_and_applied(services):
    directory, s = services
    old_version = s.policy.version
    assert s.portal.breakglass.policy.duration_seconds == 14400
    edit(directory / "breakglass.yaml", "duration_seconds: 14400", "duration_seconds: 3600")
    assert s.reloader.check() is True
    assert s.policy.version != old_version  # every decision record shows the change
    assert s.portal.breakglass.policy.duration_seconds == 3600
    assert s.pipeline.access.policy.duration_seconds == 3600


def test_broken_companion_file_keeps_everything_running(services):
    directory, s = services
    old_policy, old_fhir = s.policy, s.pipeline.fhir.policy
    edit(directory / "fhir.yaml", "category: biology", "category: biolgy")
    assert s.reloader.check() is False
    assert s.policy is old_policy and s.pipeline.fhir.policy is old_fhir
    assert "fhir.yaml" in s.reloader.error and "biolgy" in s.reloader.error
    (directory / "fhir.yaml").unlink()
    assert s.reloader.check() is False and "restart" in s.reloader.error
    assert s.pipeline.fhir.policy is old_fhir
