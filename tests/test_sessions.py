"""SessionStore: Redis records, in-process cache, expiry and invalidation, against a real server."""

from __future__ import annotations

import hashlib
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dpiguard.auth.sessions import Session, SessionStore
from dpiguard.storage import clients as redisconn

T0 = 1_700_000_000.0


@pytest.fixture
def store(r) -> SessionStore:
    return SessionStore(r, idle_timeout=100, absolute_lifetime=1000, touch_interval=10)


@pytest.fixture
def other(redis_url):
    """A second proxy instance: its own client and its own local cache."""
    client = redisconn.from_url(redis_url, decode_responses=True)
    yield SessionStore(client, idle_timeout=100, absolute_lifetime=1000, touch_interval=10)
    client.close()


class CountingRedis:
    """A real client (any topology) that counts every call made on it, scripts included (to prove
    the hot path skips Redis)."""

    commands = 0

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        if name == "register_script":
            def register(*a, **k):
                script = attr(*a, **k)

                def run(*sa, **sk):
                    CountingRedis.commands += 1
                    return script(*sa, **sk)
                return run
            return register

        def counted(*a, **k):
            CountingRedis.commands += 1
            return attr(*a, **k)
        return counted

    @classmethod
    def from_url(cls, url):
        return cls(redisconn.from_url(url))


def fields(r, session: Session) -> dict[str, str]:
    raw = r.hgetall(f"dpiguard:session:{{{session.sid_hash}}}")
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_create_stores_hash_not_id(r, store):
    sid, session = store.create("alice", ("nurse", "doctor"), now=T0)
    assert len(sid) >= 43
    assert session.sid_hash == hashlib.sha256(sid.encode()).hexdigest()
    stored = fields(r, session)
    assert stored["user"] == "alice" and stored["roles"] == "nurse,doctor"
    assert float(stored["abs_expiry"]) == T0 + 1000 and float(stored["last_seen"]) == T0
    assert stored["csrf"] == session.csrf and len(session.csrf) >= 43
    assert sid not in str(r.keys("*")) and sid not in str(stored)
    assert 0 < r.ttl(f"dpiguard:session:{{{session.sid_hash}}}") <= 100
    assert r.smembers("dpiguard:user-sessions:{alice}") == {session.sid_hash.encode()}
    _, second = store.create("alice", ("nurse",), now=T0)
    assert second.csrf != session.csrf


def test_ttl_capped_by_remaining_lifetime(r):
    store = SessionStore(r, idle_timeout=100, absolute_lifetime=50)
    _, session = store.create("alice", ("nurse",), now=T0)
    assert 0 < r.ttl(f"dpiguard:session:{{{session.sid_hash}}}") <= 50


def test_get_hits_local_cache_without_redis(redis_url, r):
    client = CountingRedis.from_url(redis_url)
    store = SessionStore(client, idle_timeout=100, absolute_lifetime=1000)
    sid, session = store.create("alice", ("nurse",), now=T0)
    before = CountingRedis.commands
    for i in range(50):
        got = store.get(sid, now=T0 + i)
        assert got.user == "alice" and got.roles == ("nurse",) and got.csrf == session.csrf
    assert CountingRedis.commands == before
    client.close()


def test_get_local_never_reads_redis(redis_url, store, other):
    sid, _ = store.create("alice", ("nurse",), now=T0)
    offline = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    assert other.get_local(sid, now=T0 + 1) is None  # miss: caller must use get() off the event loop
    assert other.get(sid, now=T0 + 1) is not None
    other.redis = offline  # from here any Redis access would raise
    assert other.get_local(sid, now=T0 + 2).user == "alice"
    assert other.get_local(sid, now=T0 + 150) is None  # locally idle: only Redis can tell
    assert other.get_local("bad sid", now=T0 + 2) is None
    other.local_enabled = False
    assert other.get_local(sid, now=T0 + 3) is None


def test_get_from_redis_on_another_instance(store, other):
    sid, session = store.create("alice", ("nurse",), now=T0)
    got = other.get(sid, now=T0 + 1)
    assert got.sid_hash == session.sid_hash and got.roles == ("nurse",) and got.csrf == session.csrf
    assert other.local_size() == 1


def test_identity_source_and_rpps_kept_across_instances(store, other):
    sid, _ = store.create("psc.durand", ("doctor",), now=T0, source="psc", rpps="10001234567")
    got = other.get(sid, now=T0 + 1)
    assert (got.source, got.rpps) == ("psc", "10001234567")
    sid2, _ = store.create("alice", ("nurse",), now=T0)
    assert (other.get(sid2, now=T0 + 1).source, other.get(sid2, now=T0 + 1).rpps) == ("local", "")
    with pytest.raises(ValueError):
        store.create("mallory", ("nurse",), now=T0, source="forged")


def test_idle_expiry(store):
    sid, _ = store.create("alice", ("nurse",), now=T0)
    assert store.get(sid, now=T0 + 99) is not None
    assert store.get(sid, now=T0 + 198) is not None  # activity at +99 kept it alive locally
    assert store.get(sid, now=T0 + 298) is None
    assert store.local_size() == 0


def test_idle_expiry_real_ttl(r):
    store = SessionStore(r, idle_timeout=1, absolute_lifetime=100)
    sid, session = store.create("alice", ("nurse",))
    assert store.get(sid) is not None
    time.sleep(1.1)
    assert store.get(sid) is None
    assert not r.exists(f"dpiguard:session:{{{session.sid_hash}}}")


def test_absolute_expiry_despite_activity(store):
    sid, session = store.create("alice", ("nurse",), now=T0)
    for t in range(0, 1000, 50):
        assert store.get(sid, now=T0 + t) is not None
        store.touch(session, now=T0 + t)
    assert store.get(sid, now=T0 + 1000) is None


def test_locally_idle_session_rereads_redis(store, other):
    sid, _ = store.create("alice", ("nurse",), now=T0)
    assert store.get(sid, now=T0 + 1) is not None
    # The user kept working through the other instance, which touched Redis.
    seen = other.get(sid, now=T0 + 90)
    assert other.needs_touch(seen, now=T0 + 90)
    assert other.touch(seen, now=T0 + 90)
    assert not other.needs_touch(seen, now=T0 + 95)
    # Locally idle for 150 s, but Redis says last seen 60 s ago: still valid.
    assert store.get(sid, now=T0 + 150) is not None
    # Without further touches it ends 100 s after the last activity anywhere.
    assert other.get(sid, now=T0 + 250) is None


def test_touch_writes_last_seen_and_ttl(r, store):
    sid, session = store.create("alice", ("nurse",), now=T0)
    got = store.get(sid, now=T0 + 5)
    assert not store.needs_touch(got, now=T0 + 5)
    got = store.get(sid, now=T0 + 10)
    assert store.needs_touch(got, now=T0 + 10)
    assert store.touch(got, now=T0 + 10)
    assert float(fields(r, session)["last_seen"]) == T0 + 10
    assert not store.needs_touch(store.get(sid, now=T0 + 12), now=T0 + 12)
    # an out-of-order (older) touch never moves last_seen backwards
    assert store.touch(session, now=T0 + 3)
    assert float(fields(r, session)["last_seen"]) == T0 + 10


def test_touch_does_not_resurrect(r, store):
    sid, session = store.create("alice", ("nurse",), now=T0)
    r.delete(f"dpiguard:session:{{{session.sid_hash}}}")
    assert not store.touch(session, now=T0 + 20)
    assert not r.exists(f"dpiguard:session:{{{session.sid_hash}}}")
    assert store.get(sid, now=T0 + 21) is None


def test_destroy(r, store, other):
    sid, session = store.create("alice", ("nurse",), now=T0)
    assert other.get(sid, now=T0 + 1) is not None
    pubsub = r.pubsub()
    pubsub.subscribe("dpiguard:events")
    assert pubsub.get_message(timeout=1.0)["type"] == "subscribe"
    assert store.destroy(sid)
    assert pubsub.get_message(timeout=1.0)["data"] == f"session:{session.sid_hash}".encode()
    pubsub.close()
    assert store.get(sid, now=T0 + 2) is None
    assert not r.exists(f"dpiguard:session:{{{session.sid_hash}}}")
    assert r.smembers("dpiguard:user-sessions:{alice}") == set()
    other.drop_local(session.sid_hash)  # what the bus listener does on session:H
    assert other.get(sid, now=T0 + 2) is None
    assert not store.destroy(sid)


def test_revoke_user_seen_by_second_instance(r, store, other):
    sid1, _ = store.create("alice", ("nurse",), now=T0)
    sid2, _ = store.create("alice", ("nurse",), now=T0)
    bob_sid, _ = store.create("bob", ("doctor",), now=T0)
    for sid in (sid1, sid2, bob_sid):
        assert other.get(sid, now=T0 + 1) is not None
    pubsub = r.pubsub()
    pubsub.subscribe("dpiguard:events")
    assert pubsub.get_message(timeout=1.0)["type"] == "subscribe"
    assert store.revoke_user("alice") == 2
    assert pubsub.get_message(timeout=1.0)["data"] == b"user:alice"
    pubsub.close()
    assert store.get(sid1, now=T0 + 2) is None and store.get(sid2, now=T0 + 2) is None
    # Until the bus message arrives the other instance still answers from its cache...
    assert other.get(sid1, now=T0 + 2) is not None
    other.drop_local_user("alice")  # ...what the bus listener does on user:alice
    assert other.get(sid1, now=T0 + 3) is None and other.get(sid2, now=T0 + 3) is None
    assert other.get(bob_sid, now=T0 + 3) is not None
    assert r.smembers("dpiguard:user-sessions:{alice}") == set()
    assert store.revoke_user("alice") == 0


def test_rotate(store):
    old_sid, old = store.create("alice", ("nurse",), now=T0)
    new_sid, new = store.rotate(old_sid, "alice", ("nurse", "doctor"), now=T0 + 5)
    assert new_sid != old_sid and new.sid_hash != old.sid_hash
    assert store.get(old_sid, now=T0 + 6) is None
    assert store.get(new_sid, now=T0 + 6).roles == ("nurse", "doctor")
    third_sid, _ = store.rotate(None, "alice", ("nurse",), now=T0 + 7)
    assert store.get(third_sid, now=T0 + 8) is not None


@pytest.mark.parametrize(
    "sid",
    ["", "a" * 129, "abc def", "abc/def", "abc{x}", "ab\x00cd", "é" * 10, None, 12345, "../../etc"],
)
def test_hostile_sids_refused_without_redis(sid):
    offline = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    store = SessionStore(offline)
    assert store.get(sid) is None  # would raise ConnectionError if it called Redis
    assert store.destroy(sid) is False


def test_unknown_sid(store):
    assert store.get("A" * 43, now=T0) is None
    assert store.local_size() == 0


def test_local_disabled_always_reads_redis(r, store):
    sid, session = store.create("alice", ("nurse",), now=T0)
    assert store.get(sid, now=T0 + 1) is not None
    store.local_enabled = False
    assert store.local_size() == 0
    assert store.get(sid, now=T0 + 2) is not None
    assert store.local_size() == 0
    r.delete(f"dpiguard:session:{{{session.sid_hash}}}")
    assert store.get(sid, now=T0 + 3) is None  # no stale local answer
    store.local_enabled = True
    assert store.get(sid, now=T0 + 4) is None


def test_clear_local_and_bounded_cache(r):
    store = SessionStore(r, max_local=3)
    sids = [store.create(f"user{i}", ("nurse",), now=T0)[0] for i in range(5)]
    assert store.local_size() == 3
    assert all(store.get(sid, now=T0 + 1) is not None for sid in sids)  # evicted ones come from Redis
    assert store.local_size() == 3
    store.clear_local()
    assert store.local_size() == 0
    assert store.get(sids[0], now=T0 + 2) is not None


def test_corrupt_record_is_no_session(r, store):
    sid, session = store.create("alice", ("nurse",), now=T0)
    store.clear_local()
    r.hdel(f"dpiguard:session:{{{session.sid_hash}}}", "abs_expiry")
    assert store.get(sid, now=T0 + 1) is None


def test_redis_errors_propagate():
    offline = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    store = SessionStore(offline)
    with pytest.raises(redis.ConnectionError):
        store.get("A" * 43)
    with pytest.raises(redis.ConnectionError):
        store.create("alice", ("nurse",))
