"""Cached care-team decisions stay out of the cycle collector's walks (dpiguard/decision/pipeline.py,
``Pipeline.care_team``; why: ``dpiguard.edge.runner.FreezeStartupHeap``), and come back as the decision
that was stored. Real services on a real Redis."""

from __future__ import annotations

import gc
import time

from dpiguard.decision.access import AccessDecision, facts_key


def settle(cache, quiet: float = 0.5, timeout: float = 10.0) -> None:
    """Wait until no invalidation has reached ``cache`` for ``quiet`` seconds: what the set-up published
    before the bus listened can still arrive once it does (a Redis Cluster relays PUBLISH between its
    nodes), and would drop what a test just put in the cache."""
    deadline = time.monotonic() + timeout
    seen = cache.stats()["invalidations"]
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = cache.stats()["invalidations"]
        if now == seen:
            return
        seen = now
    raise AssertionError("invalidations kept arriving")


def _entry(cache, key):
    return cache._entries[key]  # noqa: SLF001 — the stored form is what this test is about


def test_cached_decisions_are_untracked_and_come_back_equal(services):
    _, s = services
    p = s.pipeline
    s.careteam.assign("ide.martin", "P0042")  # before the bus listens
    s.start()  # the invalidation bus connected: the caches serve
    settle(p.cache)  # a Redis Cluster may still deliver the assignment's invalidation after the start
    assert p.cache.enabled
    now = time.time()
    allowed = p.care_team("ide.martin", "P0042", "biology", "read", True, now, p.policies)
    refused = p.care_team("ide.martin", "P0043", "biology", "read", True, now, p.policies)
    assert isinstance(allowed, AccessDecision) and allowed.member
    assert not refused.member and refused.reason == "not_in_care_team"

    gc.collect()  # untracks the decision; its entry (decision, expiry) may be looked at before it:
    gc.collect()  # the next pass of the entry's generation untracks that
    for key in (("ide.martin", "P0042", "biology", "read"), ("ide.martin", "P0043", "biology", "read"),
                facts_key("ide.martin", "P0042"), facts_key("ide.martin", "P0043")):  # the facts read for them too
        entry = _entry(p.cache, key)
        assert not gc.is_tracked(entry) and not gc.is_tracked(entry[0]), entry

    # served from the cache (io=False raises NeedIO on a miss): the same decisions
    assert p.care_team("ide.martin", "P0042", "biology", "read", False, now, p.policies) == allowed
    assert p.care_team("ide.martin", "P0043", "biology", "read", False, now, p.policies) == refused
