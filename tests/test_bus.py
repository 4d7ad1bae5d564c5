"""Invalidation bus + decision cache across two instances, against a real Redis-protocol server."""

from __future__ import annotations

import logging
import time

import pytest
import redis

from dpiguard.careteam.store import CareTeamStore
from dpiguard.decision.cache import DecisionCache
from dpiguard.storage.bus import InvalidationBus, format_event, parse_event
from tests.redis_server import RedisRelay

from .conftest import only_standalone

NOW = 1_700_000_000.0


def wait_until(predicate, timeout, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Instance:
    """One dpiguard instance: its own bus connection and its own decision cache."""

    def __init__(self, url: str, health_interval: float = 0.5):
        self.bus = InvalidationBus(url, health_interval=health_interval)
        self.cache = DecisionCache()
        self.resyncs = 0
        self.coherence: list[bool] = []
        self.events: list[tuple[str, str]] = []
        self.bus.bind_cache(self.cache)
        self.bus.on_resync(self._count_resync)
        self.bus.on_coherence(self.coherence.append)
        self.bus.subscribe(lambda kind, ident: self.events.append((kind, ident)))

    def _count_resync(self):
        self.resyncs += 1

    def cache_decision(self, user, patient):
        key = (user, patient, "clinical", "read")
        assert self.cache.put(key, "allow", NOW + 60, self.cache.generation(), now=NOW)
        return key


@pytest.fixture
def instances(redis_url, r):
    made = [Instance(redis_url), Instance(redis_url)]
    try:
        for inst in made:
            inst.bus.start()
        for inst in made:
            assert inst.bus.wait_coherent(5)
        yield made
    finally:
        for inst in made:
            inst.bus.stop()


def test_event_format_roundtrip():
    assert parse_event(b"patient:P1") == ("patient", "P1")
    assert parse_event("user:alice.b") == ("user", "alice.b")
    assert parse_event("all") == ("all", "")
    assert format_event("session", "ab12") == "session:ab12"
    for bad in (b"patient", "patient:", "robot:x", "user:a b", "all:x", b"\xff:x", "user:a:b"):
        with pytest.raises(ValueError):
            parse_event(bad)


def test_careteam_change_on_a_invalidates_cache_on_b(instances, r):
    a, b = instances
    assert a.cache.enabled and b.cache.enabled
    key_p1 = b.cache_decision("alice", "P1")
    key_p2 = b.cache_decision("alice", "P2")
    key_a = a.cache_decision("alice", "P1")

    CareTeamStore(r).add_stay("P1", "CARDIO", start=NOW)  # a write on instance A's side

    assert wait_until(lambda: b.cache.get(key_p1, NOW) is None, timeout=1.0)
    assert wait_until(lambda: a.cache.get(key_a, NOW) is None, timeout=1.0)
    assert b.cache.get(key_p2, NOW) == "allow"  # exact: other patients untouched
    assert ("patient", "P1") in b.events


def test_user_and_all_events(instances, r):
    a, b = instances
    key1 = b.cache_decision("alice", "P1")
    key2 = b.cache_decision("bob", "P1")
    a.bus.publish("user:alice")
    assert wait_until(lambda: b.cache.get(key1, NOW) is None, timeout=1.0)
    assert b.cache.get(key2, NOW) == "allow"
    a.bus.publish("all")
    assert wait_until(lambda: b.cache.get(key2, NOW) is None, timeout=1.0)
    with pytest.raises(ValueError):
        a.bus.publish("patient:not valid")


def test_malformed_message_is_ignored(instances, r, caplog):
    a, b = instances
    key = b.cache_decision("alice", "P1")
    resyncs = b.resyncs
    with caplog.at_level(logging.WARNING, logger="dpiguard.bus"):
        r.publish("dpiguard:events", b"garbage\xff")
        a.bus.publish("patient:P9")  # still processed afterwards
        assert wait_until(lambda: ("patient", "P9") in b.events, timeout=1.0)
    assert b.cache.get(key, NOW) == "allow"
    assert b.resyncs == resyncs and b.bus.coherent
    assert "malformed" in caplog.text


def test_callback_failure_triggers_resync_and_thread_survives(instances, r):
    a, b = instances

    def broken(kind, ident):
        raise RuntimeError("boom")

    b.bus.subscribe(broken)
    key = b.cache_decision("alice", "P1")
    resyncs = b.resyncs
    a.bus.publish("patient:P2")  # would not concern the entry, but a callback failed: drop all
    assert wait_until(lambda: b.resyncs > resyncs, timeout=1.0)
    assert b.cache.get(key, NOW) is None
    assert b.bus.coherent
    a.bus.publish("patient:P3")
    assert wait_until(lambda: ("patient", "P3") in b.events, timeout=1.0)


def test_outage_loses_then_restores_coherence(redis_server, instances):
    a, b = instances
    key = b.cache_decision("alice", "P1")
    resyncs = b.resyncs
    try:
        redis_server.kill()
        assert wait_until(lambda: not b.bus.coherent and not a.bus.coherent, timeout=3.0)
        assert b.resyncs >= resyncs + 1
        assert b.coherence[-1] is False
        assert not b.cache.enabled and b.cache.get(key, NOW) is None
        assert not b.cache.put(key, "allow", NOW + 60, b.cache.generation(), now=NOW)
        resyncs_during_outage = b.resyncs
    finally:
        redis_server.start()
    assert b.bus.wait_coherent(10) and a.bus.wait_coherent(10)
    assert b.resyncs >= resyncs_during_outage + 1
    assert b.coherence[-1] is True and b.cache.enabled
    # and the bus works again end to end
    key = b.cache_decision("alice", "P1")
    a.bus.publish("patient:P1")
    assert wait_until(lambda: b.cache.get(key, NOW) is None, timeout=1.0)


@only_standalone("the freezable relay sits in front of one server port")
def test_silent_peer_is_detected_by_liveness_ping(redis_server):
    proxy = RedisRelay(redis_server.port)
    bus = InvalidationBus(f"redis://127.0.0.1:{proxy.port}/0", health_interval=0.3)
    cache = DecisionCache()
    bus.bind_cache(cache)
    try:
        bus.start()
        assert bus.wait_coherent(5)
        proxy.frozen.set()
        assert wait_until(lambda: not bus.coherent, timeout=3.0)
        assert not cache.enabled
        proxy.frozen.clear()  # new connections relay again
        assert bus.wait_coherent(10)
        assert cache.enabled
    finally:
        bus.stop()
        proxy.close()


def test_stop_makes_bus_incoherent(redis_url):
    bus = InvalidationBus(redis_url)
    cache = DecisionCache()
    bus.bind_cache(cache)
    assert not cache.enabled  # not coherent before start
    bus.start()
    assert bus.wait_coherent(5) and cache.enabled
    bus.stop()
    assert not bus.coherent and not cache.enabled


def test_publish_raises_when_redis_is_unreachable():
    bus = InvalidationBus("redis://127.0.0.1:1/0")
    with pytest.raises(redis.RedisError):
        bus.publish("all")
    bus.stop()
