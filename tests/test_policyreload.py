"""Policy hot reload: valid edits swap atomically, invalid edits keep the running policy and are reported."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from dpiguard.audit.chain import AuditLog, read_records
from dpiguard.policy.reload import PolicyReloader
from dpiguard.policy.snapshot import PolicySet
from dpiguard.storage.keys import Keys
from tests.policyseal import seal

from .test_policy import BROKEN_VARIANTS, POLICIES, edit


class Target:
    """Stands for the Pipeline: only its ``policies`` attribute matters to the reloader."""

    def __init__(self, policies: PolicySet):
        self.policies = policies


@pytest.fixture
def setup(tmp_path, r):
    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    audit = AuditLog(tmp_path / "audit.jsonl", "t1").open()
    target = Target(PolicySet.load(directory))
    swaps, published = [], []
    reloader = PolicyReloader(target=target, directory=directory, interval=0.05, audit=audit,
                              load=lambda: PolicySet.load(directory),
                              on_swap=lambda: swaps.append(target.policies.version), redis_client=r,
                              prefix="pt", instance_id="t1", publish=published.append)
    yield directory, target, reloader, swaps, published, tmp_path / "audit.jsonl"
    reloader.stop()
    audit.close()


def test_valid_edit_is_swapped_and_announced(setup, r):
    directory, target, reloader, swaps, published, audit_path = setup
    old = target.policies
    assert reloader.check() is None  # nothing changed
    edit(directory / "policy.csv", "p, nurse, biology, read", "# p, nurse, biology, read")
    seal(directory)
    assert reloader.check() is True
    assert target.policies is not old and target.policies.version != old.version
    assert not target.policies.permits(["nurse"], "biology", "read")
    assert swaps == [target.policies.version] and published == ["all"]
    assert r.get(Keys("pt").policy_version).decode() == target.policies.version
    assert r.hget(Keys("pt").policy_instances, "t1").decode().startswith(target.policies.version + "|")
    rec = [x for x in read_records(audit_path) if x["event"] == "policy_reload"][-1]
    assert (rec["outcome"], rec["old_version"], rec["new_version"]) == ("allow", old.version, target.policies.version)
    status = reloader.status()
    assert status["policy_in_sync"] and status["policy_error"] is None and status["policy_reloads"] == 1


@pytest.mark.parametrize("breaker", BROKEN_VARIANTS, ids=lambda f: f.__name__)
def test_invalid_edit_keeps_running_policy(setup, breaker):
    directory, target, reloader, swaps, published, audit_path = setup
    old = target.policies
    file_name, _, words = breaker(directory)
    assert reloader.check() is False
    assert target.policies is old and swaps == [] and published == []
    assert words in reloader.error and file_name in reloader.error
    assert reloader.status()["policy_error"] == reloader.error
    rec = [x for x in read_records(audit_path) if x["event"] == "policy_reload"][-1]
    assert rec["outcome"] == "deny" and rec["policy_version"] == old.version and words in rec["detail"]
    assert reloader.check() is None  # reported once, not at every tick
    # Putting the files back clears the error without a swap.
    shutil.rmtree(directory)
    shutil.copytree(POLICIES, directory)
    assert reloader.check() is None
    assert reloader.error is None and target.policies is old


def test_watcher_thread_applies_edits_and_never_exposes_a_missing_policy(setup):
    directory, target, reloader, swaps, published, _ = setup
    seen_versions: set[str] = set()
    stop = threading.Event()
    problems = []

    def reader():
        while not stop.is_set():
            policy = target.policies
            if policy is None or not policy.routes.routes:
                problems.append("empty policy seen")
            seen_versions.add(policy.version)
            time.sleep(0.0005)

    thread = threading.Thread(target=reader)
    thread.start()
    reloader.start()
    try:
        first = target.policies.version
        (directory / "policy.csv").write_text("")  # broken: empty
        deadline = time.monotonic() + 5
        while reloader.error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reloader.error and "file is empty" in reloader.error
        assert target.policies.version == first
        shutil.copy(POLICIES / "policy.csv", directory / "policy.csv")
        with (directory / "policy.csv").open("a") as f:
            f.write("p, reception, clinical_notes, read\n")
        seal(directory)
        while target.policies.version == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert target.policies.permits(["reception"], "clinical_notes", "read")
        assert reloader.error is None
        while target.policies.version not in seen_versions and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert seen_versions == {first, target.policies.version}


def test_bus_all_event_triggers_an_immediate_look(setup):
    directory, target, reloader, *_ = setup
    reloader.interval = 3600  # only a poke can make it look
    reloader.start()
    time.sleep(0.1)
    edit(directory / "policy.csv", "p, nurse, biology, read", "# p, nurse, biology, read")
    seal(directory)
    old = target.policies.version
    reloader.on_bus_event("all", "")
    deadline = time.monotonic() + 5
    while target.policies.version == old and time.monotonic() < deadline:
        time.sleep(0.02)
    assert target.policies.version != old


# -- companion files (fhir.yaml, breakglass.yaml, careteam.yaml), through the real service wiring ----
# (fixture `services` in conftest.py: the composition root on a copy of policies/)

def test_companion_file_edit_is_versioned_validated_and_applied(services):
    directory, s = services
    old = s.policies
    assert old.breakglass.duration_seconds == 14400
    edit(directory / "breakglass.yaml", "duration_seconds: 14400", "duration_seconds: 3600")
    seal(directory)
    assert s.reloader.check() is True
    assert s.policies.version != old.version  # every decision record shows the change
    assert s.pipeline.policies is s.policies and s.portal.policies() is s.policies  # one set, everywhere
    assert s.policies.breakglass.duration_seconds == 3600
    assert old.breakglass.duration_seconds == 14400  # the old set is never mutated


def test_broken_companion_file_keeps_everything_running(services):
    directory, s = services
    old = s.policies
    edit(directory / "fhir.yaml", "category: biology", "category: biolgy")
    assert s.reloader.check() is False
    assert s.policies is old and s.policies.fhir is not None
    assert "fhir.yaml" in s.reloader.error and "biolgy" in s.reloader.error
    (directory / "fhir.yaml").unlink()
    assert s.reloader.check() is False and "restart" in s.reloader.error
    assert s.policies is old
