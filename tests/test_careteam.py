"""Care-team store against a real Redis-protocol server."""

from __future__ import annotations

import time

import orjson
import pytest

from dpiguard.careteam.membership import CareTeamDataError, Membership, compute_membership
from dpiguard.careteam.store import CareTeamStore

T0 = 1_700_000_000
HOUR = 3600
DAY = 86400


@pytest.fixture
def store(r):
    return CareTeamStore(r, prefix="dpiguard", grace_seconds=2 * HOUR)


def test_member_via_unit_stay(store):
    store.add_unit_member("alice", "CARDIO")
    sid = store.add_stay("P1", "CARDIO", start=T0, stay_id="S123")
    assert sid == "S123"
    m = store.membership("alice", "P1", now=T0 + HOUR)
    assert m == Membership(True, "unit:CARDIO stay:S123", None)


def test_not_member_for_another_unit(store):
    store.add_unit_member("alice", "NEURO")
    store.add_stay("P1", "CARDIO", start=T0)
    m = store.membership("alice", "P1", now=T0 + HOUR)
    assert m == Membership(False, "none", None)
    assert store.membership("nobody", "P1", now=T0 + HOUR).member is False
    assert store.membership("alice", "P-unknown", now=T0 + HOUR).member is False


def test_unit_names_are_case_insensitive(store):
    store.add_unit_member("alice", "cardio")
    store.add_stay("P1", "Cardio", start=T0)
    assert store.membership("alice", "P1", now=T0).member
    assert store.user_units("alice", now=T0) == ["CARDIO"]


def test_ended_stay_member_during_grace_only(store):
    store.add_unit_member("alice", "CARDIO")
    sid = store.add_stay("P1", "CARDIO", start=T0)
    store.end_stay("P1", sid, T0 + DAY)
    end_of_grace = T0 + DAY + 2 * HOUR
    during = store.membership("alice", "P1", now=T0 + DAY + HOUR)
    assert during.member and during.valid_until == end_of_grace
    assert store.membership("alice", "P1", now=end_of_grace).member  # inclusive
    after = store.membership("alice", "P1", now=end_of_grace + 1)
    assert after == Membership(False, "none", None)


def test_membership_validity_window(store):
    store.add_unit_member("alice", "CARDIO", start=T0 + HOUR, end=T0 + 5 * HOUR)
    store.add_stay("P1", "CARDIO", start=T0)
    before = store.membership("alice", "P1", now=T0)
    assert before == Membership(False, "none", T0 + HOUR)
    inside = store.membership("alice", "P1", now=T0 + 2 * HOUR)
    assert inside == Membership(True, "unit:CARDIO stay:" + store.patient_stays("P1")[0]["id"], T0 + 5 * HOUR)
    assert store.membership("alice", "P1", now=T0 + 6 * HOUR) == Membership(False, "none", None)
    assert store.user_units("alice", now=T0 + 2 * HOUR) == ["CARDIO"]
    assert store.user_units("alice", now=T0) == []
    assert store.remove_unit_member("alice", "CARDIO") is True
    assert store.remove_unit_member("alice", "CARDIO") is False
    assert store.membership("alice", "P1", now=T0 + 2 * HOUR).member is False


def test_assignment_grants_and_is_reported_first(store):
    store.add_unit_member("bob", "CARDIO")
    store.add_stay("P1", "CARDIO", start=T0)
    store.assign("bob", "P1", kind="referring_physician", end=T0 + DAY)
    m = store.membership("bob", "P1", now=T0 + HOUR)
    assert m == Membership(True, "assignment:referring_physician", T0 + DAY)
    store.assign("carol", "P2", start=T0 + HOUR)
    assert store.membership("carol", "P2", now=T0) == Membership(False, "none", T0 + HOUR)
    assert store.membership("carol", "P2", now=T0 + HOUR).source == "assignment:assigned"
    assert store.unassign("carol", "P2") is True
    assert store.membership("carol", "P2", now=T0 + HOUR).member is False


def test_future_stay_not_yet(store):
    store.add_unit_member("alice", "CARDIO")
    store.add_stay("P1", "CARDIO", start=T0 + DAY, end=T0 + 2 * DAY)
    m = store.membership("alice", "P1", now=T0)
    assert m == Membership(False, "none", T0 + DAY)
    assert store.membership("alice", "P1", now=T0 + DAY).member


def test_valid_until_is_earliest_boundary(store):
    store.add_unit_member("alice", "CARDIO", end=T0 + 10 * HOUR)
    store.add_unit_member("alice", "ICU")
    store.add_stay("P1", "CARDIO", start=T0, end=T0 + 3 * HOUR)      # ends + 2 h grace = T0+5h
    store.add_stay("P1", "ICU", start=T0 + 7 * HOUR)                 # future start
    store.add_stay("P1", "NEURO", start=T0, end=T0 + HOUR)           # alice not in NEURO: ignored
    m = store.membership("alice", "P1", now=T0 + HOUR)
    assert m.member and m.valid_until == T0 + 5 * HOUR
    gap = store.membership("alice", "P1", now=T0 + 6 * HOUR)
    assert gap == Membership(False, "none", T0 + 7 * HOUR)
    icu = store.membership("alice", "P1", now=T0 + 11 * HOUR)
    assert icu.member and icu.source.startswith("unit:ICU ") and icu.valid_until is None


def test_now_defaults_to_current_time(store):
    store.add_unit_member("alice", "CARDIO")
    store.add_stay("P1", "CARDIO", start=time.time() - 10)
    assert store.membership("alice", "P1").member


def test_malformed_stay_json_raises(store, r):
    store.add_unit_member("alice", "CARDIO")
    store.add_stay("P1", "CARDIO", start=T0)
    r.hset("dpiguard:ct:stays:{P1}", "BROKEN", b"{not json")
    with pytest.raises(CareTeamDataError):
        store.membership("alice", "P1", now=T0)
    r.hset("dpiguard:ct:stays:{P1}", "BROKEN", orjson.dumps({"unit": "CARDIO", "start": "yesterday"}))
    with pytest.raises(CareTeamDataError):
        store.membership("alice", "P1", now=T0)


def test_malformed_membership_and_assignment_raise(store, r):
    store.add_stay("P1", "CARDIO", start=T0)
    r.hset("dpiguard:ct:user-units:{alice}", "CARDIO", "soon")
    with pytest.raises(CareTeamDataError):
        store.membership("alice", "P1", now=T0)
    r.hset("dpiguard:ct:assign:{P1}", "bob", b"[1, 2]")
    with pytest.raises(CareTeamDataError):
        store.membership("bob", "P1", now=T0)


def test_compute_membership_is_pure():
    m = compute_membership(
        {b"CARDIO": b"|"},
        {b"S1": orjson.dumps({"unit": "CARDIO", "start": 10, "end": 20})},
        None,
        now=25,
        grace=10,
    )
    assert m == Membership(True, "unit:CARDIO stay:S1", 30)
    assert compute_membership({}, {}, None, now=0) == Membership(False, "none", None)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.add_unit_member("bad login", "CARDIO"),
        lambda s: s.add_unit_member("alice", "CAR/DIO"),
        lambda s: s.add_unit_member("alice", "CARDIO", start=10, end=5),
        lambda s: s.add_unit_member("x" * 65, "CARDIO"),
        lambda s: s.add_stay("P1", "CARDIO", start=None),
        lambda s: s.add_stay("P1", "CARDIO", start=10, end=5),
        lambda s: s.add_stay("P1", "CARDIO", start=float("nan")),
        lambda s: s.add_stay("P1", "CARDIO", start=True),
        lambda s: s.add_stay("P{1}", "CARDIO", start=10),
        lambda s: s.add_stay("P1", "CARDIO", start=10, stay_id="a b"),
        lambda s: s.assign("alice", "P1", kind="not allowed!"),
        lambda s: s.assign("alice", "P1", start=20, end=10),
        lambda s: s.membership("alice\n", "P1", now=0),
    ],
)
def test_validation_errors(store, r, call):
    with pytest.raises(ValueError):
        call(store)
    assert r.dbsize() == 0


def test_end_and_remove_stay(store, r):
    sid = store.add_stay("P1", "CARDIO", start=T0)
    with pytest.raises(ValueError):
        store.end_stay("P1", sid, T0 - 1)
    with pytest.raises(KeyError):
        store.end_stay("P1", "nope", T0 + 1)
    with pytest.raises(KeyError):
        store.remove_stay("P1", "nope")
    other = store.add_stay("P1", "CARDIO", start=T0 + DAY)
    store.remove_stay("P1", sid)
    assert r.smembers("dpiguard:ct:unit-patients:CARDIO") == {b"P1"}  # other stay still there
    store.remove_stay("P1", other)
    assert r.smembers("dpiguard:ct:unit-patients:CARDIO") == set()
    assert store.patient_stays("P1") == []


def test_replacing_a_stay_moves_the_unit_index(store, r):
    store.add_stay("P1", "CARDIO", start=T0, stay_id="S1")
    store.add_stay("P1", "ICU", start=T0, stay_id="S1")
    assert r.smembers("dpiguard:ct:unit-patients:CARDIO") == set()
    assert r.smembers("dpiguard:ct:unit-patients:ICU") == {b"P1"}
    assert store.patient_stays("P1") == [{"id": "S1", "unit": "ICU", "start": T0, "end": None}]


def test_key_layout(store, r):
    store.add_unit_member("alice", "CARDIO", start=T0, end=T0 + 1.5)
    store.add_stay("P1", "CARDIO", start=T0, stay_id="S1")
    store.assign("bob", "P1", kind="consultant")
    assert set(r.keys("dpiguard:ct:*")) == {
        b"dpiguard:ct:user-units:{alice}",
        b"dpiguard:ct:unit-members:CARDIO",
        b"dpiguard:ct:stays:{P1}",
        b"dpiguard:ct:unit-patients:CARDIO",
        b"dpiguard:ct:assign:{P1}",
        b"dpiguard:ct:user-assign:{bob}",
    }
    assert r.hget("dpiguard:ct:user-units:{alice}", "CARDIO") == f"{T0}|{T0 + 1.5!r}".encode()
    assert orjson.loads(r.hget("dpiguard:ct:stays:{P1}", "S1")) == {"unit": "CARDIO", "start": T0, "end": None}
    assert orjson.loads(r.hget("dpiguard:ct:assign:{P1}", "bob")) == {"kind": "consultant", "start": None, "end": None}


def test_explain_patient(store):
    store.add_unit_member("alice", "CARDIO")
    store.add_unit_member("dave", "CARDIO", end=T0 - 1)
    store.add_stay("P1", "CARDIO", start=T0, stay_id="S1")
    store.add_stay("P1", "ICU", start=T0 - 10 * DAY, end=T0 - 9 * DAY, stay_id="S0")
    store.assign("bob", "P1", kind="referring_physician")
    info = store.explain_patient("P1", now=T0 + 1)
    assert info["patient"] == "P1"
    assert [(s["id"], s["unit"], s["active"]) for s in info["stays"]] == [("S0", "ICU", False), ("S1", "CARDIO", True)]
    assert info["assignments"] == [
        {"login": "bob", "kind": "referring_physician", "start": None, "end": None, "active": True}
    ]
    assert info["unit_members"]["ICU"] == []
    assert [(m["login"], m["active"]) for m in info["unit_members"]["CARDIO"]] == [("alice", True), ("dave", False)]
    orjson.dumps(info)  # JSON-serialisable for the CLI


def test_explain_user(store):
    store.add_unit_member("alice", "CARDIO")
    store.add_unit_member("alice", "NEURO", end=T0 - 1)
    store.add_stay("P1", "CARDIO", start=T0)
    store.add_stay("P2", "CARDIO", start=T0 - 2 * DAY, end=T0 - DAY)  # long discharged
    store.add_stay("P3", "NEURO", start=T0)
    store.assign("alice", "P9", kind="consultant", end=T0 + DAY)
    info = store.explain_user("alice", now=T0 + 1)
    assert info["login"] == "alice"
    assert [(u["unit"], u["active"]) for u in info["units"]] == [("CARDIO", True), ("NEURO", False)]
    assert info["assignments"] == [
        {"patient": "P9", "kind": "consultant", "start": None, "end": T0 + DAY, "active": True}
    ]
    assert info["patients_in_units"] == {"CARDIO": ["P1"]}
    orjson.dumps(info)


def _collect(pubsub, timeout=2.0):
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.1)
        if msg is None:
            if got:
                break
            continue
        if msg["type"] == "message":
            got.append(msg["data"].decode())
    return got


def test_writes_publish_invalidations(store, r):
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("dpiguard:events")
    try:
        assert pubsub.get_message(timeout=1) is None  # consume nothing but ensures subscribed
        store.add_unit_member("alice", "CARDIO")
        assert _collect(pubsub) == ["user:alice"]
        sid = store.add_stay("P1", "CARDIO", start=T0)
        store.end_stay("P1", sid, T0 + 1)
        store.remove_stay("P1", sid)
        assert _collect(pubsub) == ["patient:P1"] * 3
        store.assign("bob", "P2")
        store.unassign("bob", "P2")
        assert _collect(pubsub) == ["patient:P2", "user:bob"] * 2
        store.remove_unit_member("alice", "CARDIO")
        assert _collect(pubsub) == ["user:alice"]
    finally:
        pubsub.close()


def test_failed_validation_publishes_nothing(store, r):
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("dpiguard:events")
    try:
        pubsub.get_message(timeout=0.5)
        with pytest.raises(ValueError):
            store.add_stay("P1", "CARDIO", start=10, end=1)
        assert _collect(pubsub, timeout=0.5) == []
    finally:
        pubsub.close()
