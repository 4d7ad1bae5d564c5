"""The care-team facts tier of the decision cache (dpiguard/decision/pipeline.py, ``Pipeline.care_team``;
dpiguard/decision/access.py, ``AccessFacts``): a decision for another category or action of a user and
patient is taken in-process from the facts read for the first one, and it is the decision a fresh Redis
read would give at that time. Real services on a real Redis, invalidations through the real bus.

The oracle is :meth:`AccessDecider.decide_with_units`, which reads Redis every time."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpiguard.decision.access import AccessFacts, facts_key
from dpiguard.decision.verdict import NeedIO

from .test_decision_cache_gc import settle

CATEGORIES = ("administrative", "clinical_notes", "biology", "vital_signs", "prescriptions", "imaging")
ACTIONS = ("read", "write")
USER = "ide.facts"


def _wait(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("the invalidation did not arrive")
        time.sleep(0.01)


@pytest.fixture
def running(services):
    """Services with some care-team data written before the bus listens, then started."""
    _, s = services
    now = time.time()
    ct = s.careteam
    ct.add_unit_member(USER, "CARDIO")
    ct.add_unit_member(USER, "RADIO")  # transversal: imaging only, for patients with an open stay
    ct.add_stay("PF1", "CARDIO", now - 3600)  # in the user's unit, open
    ct.add_stay("PF2", "CARDIO", now - 3600, now + 20)  # in the user's unit, ends in 20 s
    ct.add_stay("PF3", "NEURO", now - 3600)  # elsewhere: RADIO reaches it for imaging only
    ct.assign(USER, "PF4", start=now - 60, end=now + 30)  # assigned for a while
    s.pipeline.access.objections.add("PF5", "user", USER)  # objects to this user
    ct.add_stay("PF5", "CARDIO", now - 3600)
    s.start()
    settle(s.pipeline.cache)  # what the set-up published may still arrive (Redis Cluster)
    assert s.pipeline.cache.enabled
    return s, now


def _fresh(s, patient, category, action, now):
    decision, valid_until, units = s.pipeline.access.decide_with_units(
        USER, patient, category, action, True, now, s.pipeline.policies)
    return decision


def test_another_category_is_decided_from_the_facts_without_redis(running):
    s, now = running
    p = s.pipeline
    first = p.care_team(USER, "PF1", "biology", "read", True, now, p.policies)
    assert first.member
    stats = p.cache.stats()
    assert stats["fact_puts"] == 1 and stats["puts"] == 1
    for category in CATEGORIES:
        for action in ACTIONS:
            # io=False: NeedIO if this needed Redis; the facts of (USER, PF1) are enough
            got = p.care_team(USER, "PF1", category, action, False, now, p.policies)
            assert got == _fresh(s, "PF1", category, action, now), (category, action)
    assert p.cache.stats()["fact_puts"] == 1  # no other read
    # another patient: its own facts, never PF1's
    with pytest.raises(NeedIO):
        p.care_team(USER, "PF3", "biology", "read", False, now, p.policies)
    assert not p.care_team(USER, "PF3", "biology", "read", True, now, p.policies).member
    assert p.care_team(USER, "PF3", "imaging", "read", False, now, p.policies).member  # RADIO, same facts


def test_the_facts_are_decided_again_at_the_time_of_the_request(running):
    s, now = running
    p = s.pipeline
    assert p.care_team(USER, "PF4", "biology", "read", True, now, p.policies).member
    later = now + 40  # the assignment ended 10 s before
    got = p.care_team(USER, "PF4", "clinical_notes", "read", False, later, p.policies)
    assert not got.member and got == _fresh(s, "PF4", "clinical_notes", "read", later)
    # a decision taken from the facts lives no longer than one taken at their read
    assert p.care_team(USER, "PF1", "biology", "read", True, now, p.policies).member
    read_at = AccessFacts.unpacked(p.cache.get(facts_key(USER, "PF1"), now)).read_at
    assert p.care_team(USER, "PF1", "imaging", "read", False, now + 5, p.policies).member
    expires = p.cache._entries[(USER, "PF1", "imaging", "read")][1]  # noqa: SLF001 — the expiry is the point
    assert expires <= read_at + p.decision_ttl


def test_invalidations_drop_the_facts_with_the_decisions(running):
    s, now = running
    p = s.pipeline
    assert p.care_team(USER, "PF1", "biology", "read", True, now, p.policies).member
    s.pipeline.access.objections.add("PF1", "user", USER)  # publishes patient:PF1
    _wait(lambda: p.cache.get(facts_key(USER, "PF1"), time.time()) is None)
    with pytest.raises(NeedIO):
        p.care_team(USER, "PF1", "imaging", "read", False, now, p.policies)
    got = p.care_team(USER, "PF1", "imaging", "read", True, time.time(), p.policies)
    assert not got.member and got.reason == "patient_objection"

    assert p.care_team(USER, "PF3", "imaging", "read", True, now, p.policies).member
    s.careteam.remove_unit_member(USER, "RADIO")  # publishes user:USER
    _wait(lambda: p.cache.get(facts_key(USER, "PF3"), time.time()) is None)
    with pytest.raises(NeedIO):
        p.care_team(USER, "PF3", "clinical_notes", "read", False, now, p.policies)


def test_facts_read_without_privacy_facts_are_not_used_when_the_policy_acts_on_them():
    without = AccessFacts(0.0, {}, {}, None, {}, None, None)
    quiet = SimpleNamespace(privacy=SimpleNamespace(decision_actions={}))
    acting = SimpleNamespace(privacy=SimpleNamespace(decision_actions={"vip": "require_break_glass"}))
    assert without.usable_with(quiet)
    assert not without.usable_with(acting)
    assert without._replace(privacy_matches=()).usable_with(acting)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(("PF1", "PF2", "PF3", "PF4", "PF5", "PF6")), st.sampled_from(CATEGORIES),
                          st.sampled_from(ACTIONS), st.sampled_from((0.0, 10.0, 25.0, 35.0, 59.0))),
                min_size=1, max_size=25))
def test_every_tier_gives_the_decision_of_a_fresh_read(running, steps):
    """Whatever the order of categories, actions, patients and times, the pipeline's decision (whichever
    tier answers) is the one a fresh Redis read gives at that time."""
    s, now = running
    p = s.pipeline
    p.cache.clear()
    for patient, category, action, dt in sorted(steps, key=lambda x: x[3]):  # time only moves forward
        at = now + dt
        got = p.care_team(USER, patient, category, action, True, at, p.policies)
        assert got == _fresh(s, patient, category, action, at), (patient, category, action, dt)


def test_repeated_decisions_share_one_cached_tuple(running):
    """Assignment decisions and refusals repeat across patients: the cache keeps one tuple for equal ones;
    a decision from a stay names its stay and keeps its own. Each still equals a fresh read."""
    s, now = running
    p = s.pipeline
    s.careteam.assign(USER, "PF6", kind="referent")
    s.careteam.assign(USER, "PF7", kind="referent")
    settle(p.cache)
    values = {}
    for patient in ("PF1", "PF6", "PF7", "PF8", "PF9"):
        decision = p.care_team(USER, patient, "biology", "read", True, now, p.policies)
        assert decision == _fresh(s, patient, "biology", "read", now)
        values[patient] = p.cache.get((USER, patient, "biology", "read"), now)
    assert values["PF6"] == values["PF7"] and values["PF6"] is values["PF7"]  # assignment:referent
    assert values["PF8"] is values["PF9"] and values["PF8"][0] is False  # the same refusal
    assert values["PF1"][1].startswith("unit:CARDIO stay:")
    assert values["PF1"] is not p._shared_values.get(values["PF1"])  # a stay's decision is not kept there
