"""FHIR answers name their patients in `patients`: the DPO's reports must count them."""

from dpiguard.audit.query import Filter, record_patients, select, summarize, who_accessed


def _records():
    return [
        # A FHIR read by id: the request record cannot know the patient, the answer record does.
        {"event": "access", "request_id": "r1", "outcome": "allow", "user": "inf.durand", "patient": None,
         "time": "2026-11-23T10:00:00.000Z", "category": "biology", "action": "read", "roles": ["nurse"]},
        {"event": "fhir_response", "request_id": "r1", "outcome": "allow", "user": "inf.durand",
         "patients": ["P0001"], "time": "2026-11-23T10:00:00.010Z", "category": "biology", "action": "read",
         "roles": ["nurse"], "units": ["CARDIO"]},
        # A page request naming the patient: one record.
        {"event": "access", "request_id": "r2", "outcome": "allow", "user": "dr.martin", "patient": "P0001",
         "time": "2026-11-23T11:00:00.000Z", "category": "clinical_notes", "action": "read", "roles": ["doctor"]},
        # A Patient read via FHIR: both records name the patient; one row only.
        {"event": "access", "request_id": "r3", "outcome": "allow", "user": "acc.robert", "patient": "P0001",
         "time": "2026-11-23T12:00:00.000Z", "category": "administrative", "action": "read"},
        {"event": "fhir_response", "request_id": "r3", "outcome": "allow", "user": "acc.robert",
         "patients": ["P0001"], "time": "2026-11-23T12:00:00.005Z", "category": "administrative"},
        {"event": "access", "request_id": "r4", "outcome": "allow", "user": "dr.martin", "patient": "P0002",
         "time": "2026-11-23T12:30:00.000Z"},
    ]


def test_record_patients_reads_both_fields():
    assert record_patients({"patient": "P1", "patients": ["P2", 3]}) == {"P1", "P2"}
    assert record_patients({"patient": None}) == set()


def test_who_accessed_includes_fhir_reads_by_id_once_per_request():
    rows = who_accessed(_records(), "P0001", with_names=True)
    assert [r["user"] for r in rows] == ["inf.durand", "dr.martin", "acc.robert"]
    assert len(list(select(_records(), Filter(patient="P0002")))) == 1


def test_top_users_count_patients_seen_in_fhir_answers():
    summary = summarize(_records(), Filter())
    top = {row["user"]: row["patients"] for row in summary["top_users_by_distinct_patients"]}
    assert top["inf.durand"] == 1 and top["dr.martin"] == 2
