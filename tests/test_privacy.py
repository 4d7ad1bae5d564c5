"""Privacy monitoring, pure parts: normalisation and keyed hashes, HL7/FHIR demographics, privacy.yaml,
the detectors' rules, the explanation rate (the monitor against a real Redis: test_privacy_monitor.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dpiguard.audit.explain import ExplanationRates
from dpiguard.policy.files import PolicyError
from dpiguard.policy.privacy import PrivacyPolicy
from dpiguard.policy.snapshot import PolicySet
from dpiguard.privacy.detectors import Access, Candidate, Facts, care_event, evaluate, static_matches
from dpiguard.privacy.monitor import write_units
from dpiguard.privacy.pseudonyms import Demographics, Hasher, family_forms, parse_street
from dpiguard.privacy.rules import DETECTORS, LABELS, WHY, why
from dpiguard.privacy.sources import fhir_patients, from_fhir_patient, from_hl7
from dpiguard.privacy.store import Profile

ROOT = Path(__file__).resolve().parents[1]
H = Hasher(b"0123456789abcdef0123456789abcdef")


# -- normalisation and hashes -------------------------------------------------------------------------

def test_family_names_fold_accents_case_and_split_compound_names():
    assert family_forms("LEFÈVRE") == family_forms("Lefevre") == {"lefevre"}
    assert family_forms("Dupont-Moreau") == {"dupontmoreau", "dupont", "moreau"}
    assert family_forms("de la Fontaine") == {"delafontaine", "fontaine"}
    assert family_forms("Œuvray") == {"oeuvray"}
    assert "martin" not in family_forms("Saint-Martin")  # Saint-Martin is not Martin
    assert family_forms("Le Gall") == {"legall", "gall"}


def test_same_family_name_is_an_equality_of_keyed_hashes():
    a = H.family_tokens(["Dupont-Moreau"])
    assert a & H.family_tokens(["MOREAU"]) and a & H.family_tokens(["dupont"])
    assert not a & H.family_tokens(["Moreaux"])
    other_key = Hasher(b"x" * 32)
    assert not a & other_key.family_tokens(["Dupont-Moreau"])  # keyed: no dictionary across keys
    assert all(len(t) == 24 and "moreau" not in t for t in a)


def test_addresses_normalise_abbreviations_and_repetition_index():
    a = parse_street("12 bis r. des Lilas", "99001")
    b = parse_street("12B RUE LILAS", "99 001")
    assert a == b and a.number == "12bis" and a.street == "rue lilas"
    assert parse_street("12 rue des Lilas", "99001").number == "12"
    one = H.pseudonyms(Demographics(address_lines=[["Bâtiment B", "12 bis r. des Lilas"]], postal_codes=["99001"]))
    two = H.pseudonyms(Demographics(address_lines=[["12B rue Lilas"]], postal_codes=["99001"]))
    neighbour = H.pseudonyms(Demographics(address_lines=[["40 rue des Lilas"]], postal_codes=["99001"]))
    elsewhere = H.pseudonyms(Demographics(address_lines=[["12 bis rue des Lilas"]], postal_codes=["99002"]))
    assert one.addresses == two.addresses and one.streets == neighbour.streets
    assert not one.addresses & neighbour.addresses and not one.streets & elsewhere.streets


# -- sources -------------------------------------------------------------------------------------------

PID_MSG = ("MSH|^~\\&|PAS|HOP|DPIGUARD|HOP|20261201||ADT^A01|1|P|2.5\r"
           "PID|||P77^^^HOP&1.2.3&ISO^PI~185^^^INS^NH||DUPONT^Jean^^^^^L~MOREAU^Jean^^^^^D||19800412|M|||"
           "12 bis r. des Lilas^Bat B^Villefictive^^99001^FRA^H\r"
           "PD1||||||||||||Y\r"
           "PV1||I|CARDIO|||||||||||||VIP\r")


def test_hl7_pid_gives_names_birth_date_address_and_flags():
    patient, d = from_hl7(PID_MSG)
    assert patient == "P77"
    assert d.family_names == ["DUPONT", "MOREAU"] and d.given_name == "Jean" and d.birth_date == "19800412"
    assert d.address_lines == [["12 bis r. des Lilas", "Bat B"]] and d.postal_codes == ["99001"]
    assert d.flags == {"vip", "confidential"}
    p = H.pseudonyms(d)
    assert p.family == H.family_tokens(["Dupont", "Moreau"]) and p.addresses and p.identity


def test_fhir_patient_and_bundles():
    bundle = {"resourceType": "Bundle", "entry": [
        {"resource": {"resourceType": "Observation", "id": "o1"}},
        {"resource": {"resourceType": "Patient", "id": "P5", "name": [{"family": "Lefèvre", "given": ["Anne"]}],
                      "birthDate": "1990-01-02", "address": [{"line": ["3 av. Pasteur"], "postalCode": "99003"}],
                      "meta": {"security": [{"code": "R"}]}}}]}
    found = list(fhir_patients(bundle))
    assert [pid for pid, _ in found] == ["P5"]
    d = from_fhir_patient(found[0][1])
    assert d.family_names == ["Lefèvre"] and d.flags == {"confidential"} and d.birth_date == "1990-01-02"
    assert from_fhir_patient({"resourceType": "Patient", "name": "not a list of names"}).empty()


# -- privacy.yaml -----------------------------------------------------------------------------------------

def test_shipped_privacy_yaml_loads_in_the_policy_set_and_is_versioned(tmp_path):
    policies = PolicySet.load(ROOT / "policies")
    assert set(policies.privacy.detectors) == set(DETECTORS)
    assert policies.privacy.decision_actions == {}  # alert only, as shipped
    staff_rule = policies.privacy.on("staff_patient")
    assert staff_rule.get("desk_roles") == ("reception",) and staff_rule.get("desk_event_hours") == 2
    copy = tmp_path / "p"
    shutil.copytree(ROOT / "policies", copy)
    text = (copy / "privacy.yaml").read_text().replace("  vip:\n    enabled: true\n    action: alert",
                                                      "  vip:\n    enabled: true\n    action: require_break_glass")
    (copy / "privacy.yaml").write_text(text)
    edited = PolicySet.load(copy)
    assert edited.privacy.decision_actions == {"vip": "require_break_glass"}
    assert edited.version != policies.version
    (copy / "privacy.yaml").unlink()
    assert PolicySet.load(copy).privacy.decision_actions == {}  # no file: defaults, alert only


@pytest.mark.parametrize("text, line, message", [
    ("realert_days: 0\n", 1, "between 1 and 3650"),
    ("detectors:\n  famly_name:\n    enabled: true\n", 2, "unknown detector 'famly_name'"),
    ("detectors:\n  volume:\n    action: refuse\n", 3, "its action can only be 'alert'"),
    ("detectors:\n  vip:\n    every_access: yes please\n", 3, "must be true or false"),
    ("detectors:\n  vip:\n    action: block\n", 3, "'action' must be one of"),
    ("timezone: Mars/Olympus\n", 1, "unknown time zone"),
    ("detectors:\n  family_name:\n    common_name_share: 2\n", 3, "between 0 and 1"),
    ("detectors:\n  late_access:\n    after_days: 2.5\n", 3, "whole number"),
    ("colour: blue\n", 1, "unknown section 'colour'"),
    ("detectors:\n  staff_patient:\n    desk_roles: reception\n", 3, "must be a list of names"),
    ("detectors:\n  staff_patient:\n    desk_roles: [reception, 3]\n", 3, "must be a list of names"),
    ("detectors:\n  staff_patient:\n    desk_event_hours: 0\n", 3, "between 0.25 and 24"),
])
def test_privacy_yaml_mistakes_name_file_and_line(text, line, message):
    with pytest.raises(PolicyError) as err:
        PrivacyPolicy.from_text(text, "policies/privacy.yaml")
    assert err.value.file == "policies/privacy.yaml" and err.value.line == line
    assert message in err.value.message


# -- detectors (pure) ---------------------------------------------------------------------------------------

RULES = PrivacyPolicy()


def access(source=None, bg=False, user="inf.a", patient="P1", units=("CARDIO",), t=1_000_000.0, write=False):
    return Access(user, ("nurse",), units, patient, t, "administrative", write, source, bg, "r1", "px1", 5)


def facts(staff=Demographics(), patient=Demographics(), links=frozenset(), staff_links=frozenset(), vip=None,
          counts=None, known=10_000, stays=(), coworker=frozenset()):
    return Facts(Profile(H.pseudonyms(staff), staff_links), Profile(H.pseudonyms(patient), links, vip),
                 counts or {}, known, list(stays), None, coworker)


def names(cands):
    return sorted((c.detector, c.deferred) for c in cands)


def test_rare_shared_name_alerts_now_a_common_one_waits_for_the_care_event_check():
    me, relative = Demographics(["Zorglub"]), Demographics(["ZORGLUB"])
    rare_counts = {t: 1 for t in H.family_tokens(["Zorglub"])}
    rare = evaluate(access(), facts(me, relative, counts=rare_counts), RULES, 24)
    assert ("family_name", None) in names(rare)  # a rare name, read with nothing but the role: a relative
    treating = evaluate(access("unit:CARDIO stay:S1"), facts(me, relative, counts=rare_counts), RULES, 24)
    assert "family_name" not in [c.detector for c in treating]  # a namesake in her own unit's care
    lab = evaluate(access("transversal:LABO open_stay_anywhere"), facts(me, relative, counts=rare_counts), RULES, 24)
    assert ("family_name", "context") in names(lab)
    common_counts = {t: 90 for t in H.family_tokens(["Zorglub"])}  # 0.9% of the patients
    common = evaluate(access(), facts(me, relative, counts=common_counts), RULES, 24)
    assert ("family_name", "context") in names(common)
    cared = evaluate(access("unit:CARDIO stay:S1"), facts(me, relative, counts=common_counts), RULES, 24)
    assert "family_name" not in [c.detector for c in cared]  # common name, in the user's care: nothing


def test_self_access_vip_and_staff_patients():
    assert names(evaluate(access(), facts(staff_links=frozenset({"P1"})), RULES, 24)) == [("self_access", None)]
    vip = evaluate(access(bg=True), facts(vip="vip"), RULES, 24)
    assert ("vip", None) in names(vip) and ("break_glass_unused", "after") in names(vip)
    assert ("vip", "strict") in names(evaluate(access(), facts(vip="vip"), RULES, 24))
    assert "vip" not in str(names(evaluate(access("unit:CARDIO stay:S1"), facts(vip="vip"), RULES, 24)))
    colleague = evaluate(access(), facts(links=frozenset({"dr.b"}), coworker=frozenset({"CARDIO"})), RULES, 24)
    assert ("coworker", None) in names(colleague)
    other = evaluate(access(), facts(links=frozenset({"dr.b"})), RULES, 24)
    assert ("staff_patient", "direct") in names(other)



def test_staff_record_is_explained_only_by_direct_care_and_the_desk_only_by_an_admission_or_discharge():
    """A staff member's record (issue 17): a stay going on in another unit explains nothing; the desk's
    access is explained by an admission or a discharge within desk_event_hours, not by a stay going on."""
    t = 1_000_000.0
    nurse = evaluate(access(), facts(links=frozenset({"dr.b"})), RULES, 24)
    c = next(x for x in nurse if x.detector == "staff_patient")
    assert c.deferred == "direct" and "desk_hours" not in c.evidence
    going_on = [{"unit": "PNEUMO", "start": t - 30 * 3600, "end": t + 40 * 3600}]
    assert care_event(c, going_on, None, {}, 24) is None  # was "movement" before: the miss of issue 17
    arrived = [{"unit": "PNEUMO", "start": t - 3600, "end": None}]
    assert care_event(c, arrived, None, {}, 24) is None  # an admission is the desk's work, not a nurse's
    assert care_event(c, [{"unit": "CARDIO", "start": t - 30 * 3600, "end": None}], None, {}, 24) == "stay:CARDIO"
    assert care_event(c, [], {"start": t - 3600, "end": None}, {}, 24) == "assignment"
    assert care_event(c, [], None, {"unit:CARDIO": t + 600}, 24) == "order"
    desk_access = Access("acc.d", ("reception",), (), "P1", t, "administrative", False, None, False, "r2", "px1", 6)
    d = next(x for x in evaluate(desk_access, facts(links=frozenset({"dr.b"})), RULES, 24)
             if x.detector == "staff_patient")
    assert d.evidence["desk_hours"] == 2
    assert care_event(d, going_on, None, {}, 24) is None  # admitted 30 h before, still there: browsing
    assert care_event(d, arrived, None, {}, 24) == "registration"
    leaving = [{"unit": "PNEUMO", "start": t - 72 * 3600, "end": t + 1.5 * 3600}]
    assert care_event(d, leaving, None, {}, 24) == "registration"  # the discharge paperwork
    late = [{"unit": "PNEUMO", "start": t - 2.5 * 3600, "end": None}]
    assert care_event(d, late, None, {}, 24) is None
    assert care_event(d, [], None, {"u:acc.d": t + 120}, 24) == "order"  # she wrote the file: registered
    assert "2 heures" in why("staff_patient", d.evidence) and "24 heures" in why("staff_patient", d.evidence)
    no_desk = PrivacyPolicy.from_text("detectors:\n  staff_patient:\n    desk_roles: []\n", "privacy.yaml")
    d2 = next(x for x in evaluate(desk_access, facts(links=frozenset({"dr.b"})), no_desk, 24)
              if x.detector == "staff_patient")
    assert "desk_hours" not in d2.evidence and care_event(d2, arrived, None, {}, 24) is None
    four = PrivacyPolicy.from_text("detectors:\n  staff_patient:\n    desk_event_hours: 4\n", "privacy.yaml")
    d3 = next(x for x in evaluate(desk_access, facts(links=frozenset({"dr.b"})), four, 24)
              if x.detector == "staff_patient")
    assert care_event(d3, late, None, {}, 24) == "registration"



def test_a_write_counts_for_the_unit_whose_care_allowed_it():
    def w(source, bg=False):
        return Access("inf.m", ("nurse",), ("CARDIO", "PNEUMO"), "P1", 1.0, "vital_signs", True, source, bg, "r",
                      "px1", 1)
    assert write_units(w("unit:PNEUMO stay:S9")) == ("PNEUMO",)
    assert write_units(w("transversal:URG open_stay_anywhere")) == ("URG",)
    assert write_units(w(None)) == ("CARDIO", "PNEUMO")  # the role only: any of her units
    assert write_units(w("assignment:consultant")) == ("CARDIO", "PNEUMO")
    assert write_units(w("break_glass:G1", bg=True)) == ("CARDIO", "PNEUMO")


def test_care_event_explains_broad_accesses_within_the_window():
    c = Candidate("broad_rule", access(), {}, "context", 1_000_000 + 24 * 3600, "P1")
    assert care_event(c, [], None, {}, 24) is None
    assert care_event(c, [{"unit": "PNEUMO", "start": 1_000_000 + 3600, "end": None}], None, {}, 24) == "movement"
    far = [{"unit": "PNEUMO", "start": 1_000_000 + 3 * 86400, "end": None}]
    assert care_event(c, far, None, {}, 24) is None
    assert care_event(c, [], None, {"u:inf.a": 1_000_000 + 60}, 24) == "order"
    assert care_event(c, [], None, {"unit:CARDIO": 1_000_000 - 3600}, 24) == "order"
    bg = Candidate("break_glass_unused", access(bg=True), {}, "after", 1_000_000 + 72 * 3600, "P1")
    assert care_event(bg, [], None, {"unit:CARDIO": 1_000_000 + 60}, 24) is None  # a colleague's write: not hers
    assert care_event(bg, [], None, {"u:inf.a": 1_000_000 + 60}, 24) == "order"
    later = [{"unit": "CARDIO", "start": 1_000_000 + 7200, "end": None}]
    assert care_event(bg, later, None, {}, 24) == "stay:CARDIO"
    vip = Candidate("vip", access(), {}, "strict", 1_000_000 + 24 * 3600, "P1")  # stricter: the desk's work
    elsewhere = [{"unit": "PNEUMO", "start": 1_000_000 + 3600, "end": None}]  # and colleagues' writes do not count
    assert care_event(vip, elsewhere, None, {"unit:CARDIO": 1_000_000}, 24) is None
    assert care_event(vip, [], None, {"u:inf.a": 1_000_000 + 60}, 24) == "order"


def test_static_matches_are_what_the_decision_acts_on():
    me = Profile(H.pseudonyms(Demographics(["Dupont"], address_lines=[["1 rue A"]], postal_codes=["99001"])))
    them = Profile(H.pseudonyms(Demographics(["DUPONT"], address_lines=[["1 rue A"]], postal_codes=["99001"])),
                   frozenset({"dr.b"}), "confidential")
    assert static_matches("inf.a", "P1", me, them) == {"family_name": "same_name", "same_address": "same_address",
                                                        "staff_patient": "staff", "vip": "confidential"}
    assert static_matches("inf.a", "P1", Profile(me.pseudonyms, frozenset({"P1"})), them) == {"self_access": "self"}


def test_every_detector_has_a_french_label_and_explanation():
    assert set(LABELS) == set(WHY) == set(DETECTORS)
    text = why("vip", {"level": "confidentiel", "explanation": "break_glass"})
    assert "confidentiel" in text and "bris de glace" in text


# -- explanation rate ---------------------------------------------------------------------------------------

def test_explanation_rate_per_unit_and_role():
    rates = ExplanationRates()
    base = {"event": "access", "outcome": "allow", "patient": "P1"}
    rates.add({**base, "units": ["CARDIO"], "roles": ["nurse"], "care_team": "unit:CARDIO stay:S1"})
    rates.add({**base, "units": ["CARDIO"], "roles": ["nurse"], "care_team": None})
    rates.add({**base, "units": ["LABO"], "roles": ["doctor"], "care_team": "transversal:LABO open_stay_anywhere"})
    rates.add({**base, "units": [], "roles": ["reception"], "care_team": None})
    rates.add({**base, "units": ["CARDIO"], "roles": ["nurse"], "break_glass": True, "care_team": "break_glass:G1"})
    rates.add({"event": "access", "outcome": "deny", "patient": "P1", "units": ["CARDIO"], "roles": ["nurse"]})
    out = rates.result()
    unit = {r["name"]: r for r in out["by_unit"]}
    assert unit["CARDIO"]["accesses"] == 3 and unit["CARDIO"]["explained_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert unit["LABO"]["explained_rate"] == 1.0 and unit["LABO"]["care_rate"] == 0.0
    assert unit["-"]["explained_rate"] == 0.0
    assert out["overall"]["accesses"] == 5 and out["overall"]["explained_rate"] == 0.4
