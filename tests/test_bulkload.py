"""The bulk loader writes exactly what the one-by-one CareTeamStore writes (real Redis process)."""

from __future__ import annotations

import pytest
import redis

from dpiguard.careteam.bulkload import AssignmentRow, CareTeamBulkLoader, MembershipRow, StayRow
from dpiguard.careteam.store import CareTeamStore
from dpiguard.storage.keys import Keys

MEMBERS = [MembershipRow("dr.a", "cardio", None, None), MembershipRow("inf.b", "PNEUMO", 100, 5000),
           MembershipRow("dr.a", "URG", 10, None), MembershipRow("dr.a", "CARDIO", 50, 60)]  # replaces
STAYS = [StayRow("P1", "CARDIO", 100, None, "S1"), StayRow("P1", "PNEUMO", 10, 50, "S2"),
         StayRow("P2", "URG", 100, 200, "S3"),
         StayRow("P1", "URG", 120, None, "S2"),   # replaces S2: P1 leaves the PNEUMO index
         StayRow("P3", "PEDIA", 1.5, None, "S4")]
ASSIGN = [AssignmentRow("dr.a", "P1", "referring_physician", None, None),
          AssignmentRow("inf.b", "P2", "assigned", 10, 20), AssignmentRow("dr.a", "P1", "consultant", 5, None)]


def dump(client: redis.Redis, prefix: str) -> dict:
    out = {}
    for key in client.scan_iter(match=f"{prefix}:*"):
        name = key.decode()[len(prefix):]
        kind = client.type(key)
        if kind == b"hash":
            out[name] = client.hgetall(key)
        elif kind == b"set":
            out[name] = client.smembers(key)
    return out


def test_bulk_load_equals_one_by_one(r):
    one = CareTeamStore(r, prefix="one")
    for m in MEMBERS:
        one.add_unit_member(m.login, m.unit, m.start, m.end)
    for s in STAYS:
        one.add_stay(s.patient, s.unit, s.start, s.end, stay_id=s.stay_id)
    for a in ASSIGN:
        one.assign(a.login, a.patient, a.kind, a.start, a.end)

    bulk = CareTeamBulkLoader(CareTeamStore(r, prefix="bulk"), batch_size=2)  # rows span batches
    assert bulk.add_unit_members(MEMBERS) == len(MEMBERS)
    assert bulk.add_stays(STAYS) == len(STAYS)
    assert bulk.assign_many(ASSIGN) == len(ASSIGN)

    assert dump(r, "one") == dump(r, "bulk")
    assert b"P1" not in r.smembers("bulk:ct:unit-patients:PNEUMO")
    store = CareTeamStore(r, prefix="bulk")
    assert store.membership("dr.a", "P1", now=130).member


def test_bulk_stays_in_one_batch_see_each_other(r):
    """A replacement inside one batch moves the patient between unit indexes like sequential writes."""
    bulk = CareTeamBulkLoader(CareTeamStore(r, prefix="b1"), batch_size=100)
    bulk.add_stays([StayRow("P9", "ONCO", 1, None, "S1"), StayRow("P9", "URG", 2, None, "S1")])
    assert r.smembers("b1:ct:unit-patients:ONCO") == set()
    assert r.smembers("b1:ct:unit-patients:URG") == {b"P9"}


def test_bad_row_is_refused_with_its_index_and_batch_not_written(r):
    bulk = CareTeamBulkLoader(CareTeamStore(r, prefix="bad"), batch_size=2)
    rows = [StayRow("P1", "CARDIO", 1, None, "S1"), StayRow("P2", "CARDIO", 1, None, "S2"),
            StayRow("P3", "CARDIO", 10, 5, "S3"), StayRow("P4", "CARDIO", 1, None, "S4")]
    with pytest.raises(ValueError, match="stay row 2: start"):
        bulk.add_stays(rows)
    assert r.exists("bad:ct:stays:{P1}") and r.exists("bad:ct:stays:{P2}")
    assert not r.exists("bad:ct:stays:{P3}") and not r.exists("bad:ct:stays:{P4}")
    with pytest.raises(ValueError, match="membership row 0: invalid login"):
        bulk.add_unit_members([MembershipRow("bad login", "CARDIO")])
    with pytest.raises(ValueError, match="assignment row 0: invalid assignment kind"):
        bulk.assign_many([AssignmentRow("dr.a", "P1", "no spaces allowed")])


def test_each_batch_publishes_all(r):
    sub = r.pubsub()
    sub.subscribe(Keys("pub").events)
    sub.get_message(timeout=1)  # subscription confirmation
    bulk = CareTeamBulkLoader(CareTeamStore(r, prefix="pub"), batch_size=2)
    bulk.assign_many([AssignmentRow("u1", "P1"), AssignmentRow("u2", "P2"), AssignmentRow("u3", "P3")])
    messages = []
    while (msg := sub.get_message(timeout=1)) is not None:
        messages.append(msg["data"])
    sub.close()
    assert messages == [b"all", b"all"]
