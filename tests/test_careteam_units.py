"""membership_and_units answers what membership and user_units answer, in one round trip."""

from __future__ import annotations

from dpiguard.careteam.store import CareTeamStore


def test_membership_and_units_agree_with_separate_reads(r):
    store = CareTeamStore(r, prefix="mu", grace_seconds=10)
    store.add_unit_member("dr.a", "cardio", start=100, end=200)
    store.add_unit_member("dr.a", "URG")
    store.add_unit_member("dr.a", "ONCO", start=500)
    store.add_stay("P1", "CARDIO", start=50, end=150, stay_id="S1")
    store.assign("dr.a", "P2", start=300, end=400)
    for now in (0, 99, 100, 150, 160, 161, 200, 201, 350, 500, 1000):
        for patient in ("P1", "P2", "P3"):
            membership, units = store.membership_and_units("dr.a", patient, now=now)
            assert membership == store.membership("dr.a", patient, now=now)
            assert units == store.user_units("dr.a", now=now)
    assert store.membership_and_units("dr.a", "P1", now=120)[1] == ["CARDIO", "URG"]
    assert store.membership_and_units("nobody", "P1", now=120) == (store.membership("nobody", "P1", now=120), [])
