"""Hot reload end to end: two real proxies watching their policy files, a real Redis, the demo DPI.

Break the policy files ten different ways: `dpiguard policy check` names each problem, both proxies keep
serving with the previous version and report the error in their health output; then a valid edit is
applied by both instances within seconds and decisions follow it.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time

import httpx
import pytest

from dpiguard.audit.chain import read_records
from dpiguard.cli import main
from tests.policyseal import seal

from .stack import build_stack
from .test_policy import (
    POLICIES,
    break_model_too_permissive,
    duplicate_route,
    edit,
    empty_policy,
    missing_file,
    non_utf8_policy,
    truncated_routes,
    undeclared_category_setting,
    unknown_role,
    wrong_field_count,
)

pytestmark = pytest.mark.timeout(240)


def tab_indented_yaml(d):
    text = (d / "categories.yaml").read_text(encoding="utf-8")
    (d / "categories.yaml").write_text(text.replace("  nurse:\n", "\tnurse:\n", 1), encoding="utf-8")
    return "categories.yaml", None, "YAML syntax error"


TEN_WAYS = [wrong_field_count, unknown_role, duplicate_route, truncated_routes, empty_policy, non_utf8_policy,
            tab_indented_yaml, missing_file, break_model_too_permissive, undeclared_category_setting]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reload")
    policies = workdir / "policies"
    shutil.copytree(POLICIES, policies)
    s = build_stack(workdir, {"policies": {"dir": str(policies), "reload_interval": 0.3}})
    s.policies = policies
    s.start_proxy("a")
    s.start_proxy("b")
    yield s
    s.close()


def health(proxy) -> dict:
    return httpx.get(f"{proxy.url}/_dpiguard/health", timeout=5).json()


def wait_all(stack, predicate, timeout=10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        states = [health(p) for p in stack.proxies]
        if all(predicate(h) for h in states):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached on every instance: {states}")
        time.sleep(0.1)


def restore(stack) -> None:
    for name in ("categories.yaml", "model.conf", "policy.csv", "routes.yaml"):
        shutil.copy(POLICIES / name, stack.policies / name)


def policy_check(directory) -> tuple[int, str]:
    """`dpiguard policy check --dir DIR` (in process: the command line itself is tested in test_policytools)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["policy", "check", "--dir", str(directory)])
    return code, out.getvalue()


def test_broken_edits_are_named_and_never_applied_then_a_fix_applies_everywhere(stack):
    a, b = stack.proxies
    original = health(a)["policy_version"]
    assert health(b)["policy_version"] == original
    assert all(h["policy_error"] is None and h["policy_in_sync"] for h in (health(a), health(b)))
    # One login each; sessions live in Redis and cookies are per host, so the clients work on both ports.
    nurse_client, reception_client = stack.client(a, "inf.durand"), stack.client(a, "acc.robert")

    def get(client, p, path):
        return client.get(f"{p.url}{path}")

    for breaker in TEN_WAYS:
        file_name, _, words = breaker(stack.policies)
        code, out = policy_check(stack.policies)
        assert code == 1, (breaker.__name__, out)
        assert file_name in out and words in out, (breaker.__name__, out)
        states = wait_all(stack, lambda h: h["policy_error"] and file_name in h["policy_error"])
        for state in states:
            assert state["policy_version"] == original, breaker.__name__
            assert words in state["policy_error"], (breaker.__name__, state["policy_error"])
            assert state["ready"]
        for p in (a, b):  # still serving, with the old rules
            assert get(nurse_client, p, "/api/patients/P0001/biology").status_code == 200, breaker.__name__
            r = get(reception_client, p, "/api/patients/P0001/notes")
            assert r.status_code == 403 and r.json()["error"] == "category_not_permitted"
        restore(stack)
        wait_all(stack, lambda h: h["policy_error"] is None and h["policy_version"] == original)

    refusals = [rec for rec in read_records(stack.audit_path)
                if rec.get("event") == "policy_reload" and rec["outcome"] == "deny"]
    assert {rec["instance"] for rec in refusals} == {"a", "b"}
    assert len(refusals) >= 2 * len(TEN_WAYS)
    assert all(rec["policy_version"] == original for rec in refusals)

    # A valid edit: nurses lose lab results. Both instances apply it within seconds.
    edit(stack.policies / "policy.csv", "p, nurse, biology, read", "# p, nurse, biology, read")
    assert policy_check(stack.policies)[0] == 0
    seal(stack.policies)
    started = time.monotonic()
    states = wait_all(stack, lambda h: h["policy_version"] != original and h["policy_in_sync"], timeout=5)
    elapsed = time.monotonic() - started
    new_version = states[0]["policy_version"]
    assert states[1]["policy_version"] == new_version and states[0]["policy_shared_version"] == new_version
    for p in (a, b):
        r = get(nurse_client, p, "/api/patients/P0001/biology")
        assert r.status_code == 403 and r.json()["error"] == "category_not_permitted"
        rid = r.json()["request_id"]
        rec = [x for x in read_records(stack.audit_path) if x.get("request_id") == rid]
        assert rec and rec[0]["policy_version"] == new_version
    swaps = [rec for rec in read_records(stack.audit_path)
             if rec.get("event") == "policy_reload" and rec.get("reason") == "reloaded"]
    assert {(rec["instance"], rec["old_version"], rec["new_version"]) for rec in swaps} == {
        ("a", original, new_version), ("b", original, new_version)}
    print(f"new policy applied on both instances {elapsed:.2f} s after the edit")
