"""In-process decision cache: expiry, exact invalidation, generation race, bounds, threads."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpiguard.decision.cache import DecisionCache

NOW = 1_700_000_000.0



def patient_keys(keys) -> set:
    """The patient index holds one key itself, a list of a few keys, or a set of more."""
    return {keys} if type(keys) is tuple else set(keys)

def key(user="alice", patient="P1", category="clinical", action="read"):
    return (user, patient, category, action)


def test_hit_miss_and_expiry():
    cache = DecisionCache(ttl=60)
    assert cache.get(key(), NOW) is None
    assert cache.put(key(), "allow", NOW + 10, cache.generation(), now=NOW)
    assert cache.get(key(), NOW + 9.9) == "allow"
    assert cache.get(key(), NOW + 10) is None  # expired at expires_at
    assert len(cache) == 0  # expired entry removed
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 2, 0)


def test_ttl_caps_expiry():
    cache = DecisionCache(ttl=5)
    cache.put(key(), "allow", None, cache.generation(), now=NOW)
    cache.put(key(user="bob"), "allow", NOW + 1000, cache.generation(), now=NOW)
    assert cache.get(key(), NOW + 4) == "allow"
    assert cache.get(key(), NOW + 5) is None
    assert cache.get(key(user="bob"), NOW + 5) is None


def test_none_values_are_refused():
    cache = DecisionCache()
    with pytest.raises(ValueError):
        cache.put(key(), None, NOW + 1, cache.generation(), now=NOW)


def fill(cache):
    gen = cache.generation()
    for user in ("alice", "bob"):
        for patient in ("P1", "P2", None):
            cache.put(key(user, patient), f"{user}/{patient}", NOW + 30, gen, now=NOW)


def test_invalidate_user_is_exact():
    cache = DecisionCache()
    fill(cache)
    assert cache.invalidate_user("alice") == 3
    for patient in ("P1", "P2", None):
        assert cache.get(key("alice", patient), NOW) is None
        assert cache.get(key("bob", patient), NOW) == f"bob/{patient}"
    assert cache.stats()["invalidations"] == 1
    assert cache.invalidate_user("nobody") == 0


def test_invalidate_patient_is_exact():
    cache = DecisionCache()
    fill(cache)
    assert cache.invalidate_patient("P1") == 2
    assert cache.get(key("alice", "P1"), NOW) is None
    assert cache.get(key("bob", "P1"), NOW) is None
    assert cache.get(key("alice", "P2"), NOW) == "alice/P2"
    assert cache.get(key("bob", None), NOW) == "bob/None"
    # indexes stay consistent: invalidating the user afterwards drops only what is left
    assert cache.invalidate_user("alice") == 2
    assert len(cache) == 2


def test_clear_and_apply_event():
    cache = DecisionCache()
    fill(cache)
    cache.apply_event("patient", "P2")
    assert len(cache) == 4
    cache.apply_event("user", "bob")
    assert len(cache) == 2
    cache.apply_event("session", "abc")
    assert len(cache) == 2
    cache.apply_event("all", "")
    assert len(cache) == 0


def test_stale_insert_is_refused_after_invalidation():
    cache = DecisionCache()
    gen = cache.generation()          # worker starts computing from Redis...
    cache.invalidate_patient("P1")    # ...the bus processes an invalidation meanwhile
    assert cache.put(key(), "allow", NOW + 30, gen, now=NOW) is False
    assert cache.get(key(), NOW) is None
    assert cache.stats()["rejected_puts"] == 1
    assert cache.stats()["puts"] == 0
    assert cache.put(key(), "allow", NOW + 30, cache.generation(), now=NOW) is True
    assert cache.stats()["puts"] == 1


def test_disabled_cache_serves_and_stores_nothing():
    cache = DecisionCache()
    fill(cache)
    gen = cache.generation()
    cache.enabled = False
    assert len(cache) == 0
    assert cache.get(key(), NOW) is None
    assert cache.put(key(), "allow", NOW + 30, cache.generation(), now=NOW) is False
    cache.enabled = True
    assert cache.put(key(), "allow", NOW + 30, gen, now=NOW) is False  # computed before the outage
    assert cache.put(key(), "allow", NOW + 30, cache.generation(), now=NOW) is True
    assert cache.get(key(), NOW) == "allow"


def test_bounded_eviction_keeps_indexes_consistent():
    cache = DecisionCache(max_entries=3)
    gen = cache.generation()
    for i in range(5):
        cache.put(key(f"u{i}", f"P{i % 2}"), i, NOW + 30, gen, now=NOW)
    assert len(cache) == 3
    assert cache.get(key("u0", "P0"), NOW) is None and cache.get(key("u1", "P1"), NOW) is None
    assert [cache.get(key(f"u{i}", f"P{i % 2}"), NOW) for i in (2, 3, 4)] == [2, 3, 4]
    assert cache.stats()["evictions"] == 2
    assert cache._by_user.keys() == {"u2", "u3", "u4"}
    assert {p: len(patient_keys(keys)) for p, keys in cache._by_patient.items()} == {"P0": 2, "P1": 1}
    assert cache.invalidate_patient("P0") == 2
    assert cache.invalidate_user("u3") == 1
    assert len(cache) == 0 and not cache._by_user and not cache._by_patient


def test_reput_refreshes_insertion_order():
    cache = DecisionCache(max_entries=2)
    gen = cache.generation()
    cache.put(key("a"), 1, NOW + 30, gen, now=NOW)
    cache.put(key("b"), 2, NOW + 30, gen, now=NOW)
    cache.put(key("a"), 3, NOW + 30, gen, now=NOW)
    cache.put(key("c"), 4, NOW + 30, gen, now=NOW)
    assert cache.get(key("b"), NOW) is None
    assert cache.get(key("a"), NOW) == 3


def test_thread_safety_smoke():
    cache = DecisionCache(max_entries=500)
    errors = []
    stop = threading.Event()

    def writer(n):
        try:
            for i in range(5000):
                gen = cache.generation()
                cache.put(key(f"u{i % 50}", f"P{(i + n) % 40}"), i, NOW + 30, gen, now=NOW)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader():
        try:
            while not stop.is_set():
                for i in range(50):
                    cache.get(key(f"u{i}", f"P{i % 40}"), NOW)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    def invalidator():
        try:
            for i in range(2000):
                if i % 2:
                    cache.invalidate_patient(f"P{i % 40}")
                else:
                    cache.invalidate_user(f"u{i % 50}")
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=invalidator)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads + readers:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    # indexes exactly describe the entries
    entries = set(cache._entries)
    assert entries == {k for keys in cache._by_user.values() for k in keys}
    assert entries == {k for keys in cache._by_patient.values() for k in patient_keys(keys)}
    assert all(type(keys) is tuple or len(keys) > 1 for keys in cache._by_patient.values())
    assert len(entries) <= 500


def test_patient_index_grows_from_a_list_to_a_set_and_drops_exactly():
    """Past SMALL_INDEX keys a patient's index is a set; evictions, expiries and user drops unindex exactly."""
    from dpiguard.decision.cache import SMALL_INDEX

    cache = DecisionCache(max_entries=SMALL_INDEX + 3)
    gen = cache.generation()
    users = [f"u{i}" for i in range(SMALL_INDEX + 3)]
    for i, u in enumerate(users):
        cache.put(key(u, "P0"), i + 1, NOW + 30, gen, now=NOW)
        assert type(cache._by_patient["P0"]) is (tuple if i == 0 else list if i < SMALL_INDEX else set)
        assert patient_keys(cache._by_patient["P0"]) == {key(v, "P0") for v in users[:i + 1]}
    cache.put(key("other", "P1"), "x", NOW + 30, gen, now=NOW)  # evicts u0's entry (the oldest)
    assert patient_keys(cache._by_patient["P0"]) == {key(v, "P0") for v in users[1:]}
    for u in users[1:-1]:
        assert cache.invalidate_user(u) == 1
    assert cache._by_patient["P0"] == key(users[-1], "P0")
    assert cache.invalidate_patient("P0") == 1 and cache.invalidate_patient("P0") == 0
    assert len(cache) == 1 and cache.get(key("other", "P1"), NOW) == "x"


def test_patient_index_one_key_then_a_set_then_one_key_again():
    """The compact patient index (the key itself for one entry) drops exactly what it should at each step."""
    cache = DecisionCache(max_entries=100)
    gen = cache.generation()
    cache.put(key("u1", "P0"), "a", NOW + 30, gen, now=NOW)
    assert cache._by_patient["P0"] == key("u1", "P0")
    cache.put(key("u2", "P0"), "b", NOW + 30, gen, now=NOW)
    cache.put(key("u3", "P0"), "c", NOW + 30, gen, now=NOW)
    assert patient_keys(cache._by_patient["P0"]) == {key("u1", "P0"), key("u2", "P0"), key("u3", "P0")}
    assert cache.invalidate_user("u1") == 1
    assert cache.invalidate_user("u2") == 1
    assert cache._by_patient["P0"] == key("u3", "P0")  # back to the key itself
    assert cache.get(key("u3", "P0"), NOW) == "c"
    assert cache.invalidate_patient("P0") == 1
    assert cache.get(key("u3", "P0"), NOW) is None and not cache._by_patient and not cache._by_user
    cache.put(key("u4", "P1"), "d", NOW + 30, cache.generation(), now=NOW)
    assert cache.get(key("u4", "P1"), NOW + 31) is None  # expired: removed with its index
    assert not cache._by_patient and not cache._by_user and len(cache) == 0


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 12), st.lists(st.tuples(st.sampled_from(("put", "put", "put", "user", "patient", "get")),
                                              st.integers(0, 3), st.integers(0, 11), st.integers(0, 1)),
                                    max_size=80))
def test_indexes_match_a_model_under_any_operations(max_entries, ops):
    """Against a model (an LRU dict): every invalidation drops exactly the entries of its user or patient,
    whatever list or set the patient index holds, so no dropped decision is ever served again."""
    from collections import OrderedDict

    cache = DecisionCache(max_entries=max_entries)
    model: OrderedDict = OrderedDict()
    for i, (op, u, p, c) in enumerate(ops):
        k = key(f"u{u}", f"P{p}", f"c{c}")
        if op == "put":
            assert cache.put(k, i + 1, NOW + 30, cache.generation(), now=NOW)
            if k in model:
                model.move_to_end(k)
            model[k] = i + 1
            while len(model) > max_entries:
                model.popitem(last=False)
        elif op == "user":
            assert cache.invalidate_user(f"u{u}") == sum(1 for m in model if m[0] == f"u{u}")
            model = OrderedDict((m, v) for m, v in model.items() if m[0] != f"u{u}")
        elif op == "patient":
            assert cache.invalidate_patient(f"P{p}") == sum(1 for m in model if m[1] == f"P{p}")
            model = OrderedDict((m, v) for m, v in model.items() if m[1] != f"P{p}")
        else:
            assert cache.get(k, NOW) == model.get(k)
        assert len(cache) == len(model)
        indexed = set()
        for keys in cache._by_patient.values():
            indexed |= patient_keys(keys)
        assert indexed == set(model)
        assert set().union(*cache._by_user.values()) == set(model)
