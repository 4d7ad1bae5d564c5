"""FHIR request analysis, fhir.yaml validation and response filtering (pure logic, no I/O)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dpiguard.fhir.compartment import PATIENT_COMPARTMENT, FhirRefusal, analyze, patient_of_reference
from dpiguard.fhir.response import (
    BundleRewriter,
    CheckedAnswer,
    Judge,
    collect_page,
    page_bundle,
    patient_links,
    process,
)
from dpiguard.policy.fhir import FhirPolicy
from dpiguard.policy.files import PolicyError
from dpiguard.policy.paths import parse_query
from dpiguard.policy.table import Policy

POLICIES = Path(__file__).resolve().parent.parent / "policies"


@pytest.fixture(scope="module")
def policy():
    return Policy.load(POLICIES)


@pytest.fixture(scope="module")
def fhir(policy):
    return FhirPolicy.load(POLICIES / "fhir.yaml", policy.roles, policy.categories)


def an(fhir, method, target):
    path, _, query = target.partition("?")
    return analyze(method, [s for s in path.split("/") if s], parse_query(query), types=fhir.types,
                   allowed_params=fhir.allow_parameters, operations=fhir.operations)


def test_compartment_table_is_r4():
    assert PATIENT_COMPARTMENT["Observation"] == ("subject", "performer")
    assert PATIENT_COMPARTMENT["MedicationRequest"] == ("subject",)
    assert PATIENT_COMPARTMENT["AllergyIntolerance"] == ("patient", "recorder", "asserter")
    assert PATIENT_COMPARTMENT["Patient"] == ("link",)
    assert len(PATIENT_COMPARTMENT) == 66


@pytest.mark.parametrize("target, patients, scoped", [
    ("Patient/P1", ["P1"], False),
    ("Observation?patient=P1", ["P1"], True),
    ("Observation?subject=Patient/P1", ["P1"], True),
    ("Observation?subject:Patient=P1", ["P1"], True),
    ("Observation?subject=http://x/fhir/Patient/P1", ["P1"], True),
    ("Observation?patient=P1,P2", ["P1", "P2"], True),
    ("Observation?patient=P1&patient=P2", ["P1", "P2"], True),
    ("Observation?performer=Practitioner/D1", [], False),
    ("Observation?subject:missing=false", [], False),
    ("Observation?performer=Patient/P1,Practitioner/D1", ["P1"], False),
    ("Observation?encounter=Encounter/E1&_sort=-date,code&_count=10", [], False),
    ("Observation?code=8867-4", [], False),
    ("Observation?code=1&focus=Patient/P9", ["P9"], False),
    ("Patient?_id=P1,P2", ["P1", "P2"], True),
    ("Patient/P1/Observation?code=x", ["P1"], True),
    ("Patient/P1/$everything", ["P1"], True),
    ("AllergyIntolerance?asserter=P3", ["P3"], True),
])
def test_patients_of_a_request(fhir, target, patients, scoped):
    req = an(fhir, "GET", target)
    assert req.patients == patients and req.scoped is scoped


@pytest.mark.parametrize("method, target, reason", [
    ("GET", "Patient?_has:Observation:patient:code=1", "fhir_forbidden_parameter"),
    ("GET", "Observation?_filter=x", "fhir_forbidden_parameter"),
    ("GET", "Observation?_query=x", "fhir_forbidden_parameter"),
    ("GET", "Observation?encounter.subject=P2", "fhir_forbidden_parameter"),
    ("GET", "Observation?subject:Group.name=x", "fhir_forbidden_parameter"),
    ("GET", "Observation?_revinclude=Provenance:target", "fhir_forbidden_parameter"),
    ("GET", "Patient?_revinclude=Provenance:target", "fhir_forbidden_parameter"),
    ("GET", "Observation?_include:iterate=Observation:subject", "fhir_forbidden_parameter"),
    ("GET", "Observation?_summary=count", "fhir_forbidden_parameter"),
    ("GET", "Observation?_unknown=1", "fhir_forbidden_parameter"),
    ("GET", "Observation?patient=P1!", "fhir_invalid_request"),
    ("GET", "", "fhir_not_supported"),
    ("GET", "_history", "fhir_not_supported"),
    ("GET", "Practitioner", "fhir_type_not_mapped"),
    ("GET", "Nonsense", "fhir_not_supported"),
    ("PUT", "Observation?patient=P1", "fhir_not_supported"),
    ("DELETE", "Observation?code=1", "fhir_not_supported"),
    ("HEAD", "Observation/1", "fhir_not_supported"),
    ("GET", "Observation/1/$meta", "fhir_operation_not_allowed"),
    ("GET", "Observation/$lastn", "fhir_operation_not_allowed"),
    ("GET", "Observation/_search", "fhir_not_supported"),
    ("POST", "Observation/_search?subject:Patient.name=x", "fhir_forbidden_parameter"),
    # default-deny: unknown parameters, modifiers, chains (issue 12)
    ("GET", "Observation?subject.name=Dupont", "fhir_forbidden_parameter"),
    ("GET", "Observation?subject:Patient.name=Dupont", "fhir_forbidden_parameter"),
    ("GET", "Observation?patient.identifier=urn:x|1", "fhir_forbidden_parameter"),
    ("GET", "Observation?subject:identifier=urn:x|1", "fhir_forbidden_parameter"),
    ("GET", "Observation?patient:identifier=urn:x|1", "fhir_forbidden_parameter"),
    ("GET", "Observation?subject:missing=Patient/P2", "fhir_invalid_request"),
    ("GET", "Observation?patient:missing=", "fhir_invalid_request"),
    ("GET", "Observation?subject:Encounter=E1", "fhir_invalid_request"),
    ("GET", "Observation?subject:Group=G1", "fhir_forbidden_parameter"),
    ("GET", "Observation?subject=Group/G1", "fhir_forbidden_parameter"),
    ("GET", "Observation?subject=Patient?identifier=x", "fhir_invalid_request"),
    ("GET", "Observation?subject:below=Patient/P1", "fhir_forbidden_parameter"),
    ("GET", "Observation?code:contains=1", "fhir_forbidden_parameter"),
    ("GET", "Observation?family=x", "fhir_forbidden_parameter"),
    ("GET", "Observation?code=1&_offset=10", "fhir_forbidden_parameter"),
    ("GET", "Observation?code=1&_getpages=abc", "fhir_forbidden_parameter"),
    ("GET", "Observation?code=1&page=2", "fhir_forbidden_parameter"),
    ("GET", "Observation?code=1&_count=0", "fhir_invalid_request"),
    ("GET", "Observation?code=1&_sort=address", "fhir_forbidden_parameter"),
    ("GET", "Observation?code=1&_count:x=3", "fhir_forbidden_parameter"),
    ("GET", "Observation?code=1&_include=Patient:link", "fhir_forbidden_parameter"),
    ("GET", "Observation?code=1&_include=Observation:code", "fhir_forbidden_parameter"),
    ("GET", "Observation?code=1&_include=Observation:focus", "fhir_forbidden_parameter"),
    ("GET", "Patient?_revinclude=Observation:encounter", "fhir_forbidden_parameter"),
    ("GET", "Patient?_id:not=P1", "fhir_forbidden_parameter"),
    ("GET", "Observation?_has:Observation:patient:code=1", "fhir_forbidden_parameter"),
    ("GET", "Observation/_history", "fhir_not_supported"),
    ("GET", "Observation/1/_history?_count=1", "fhir_invalid_request"),
    ("GET", "metadata?mode=full", "fhir_invalid_request"),
])
def test_refused_requests(fhir, method, target, reason):
    with pytest.raises(FhirRefusal) as info:
        an(fhir, method, target)
    assert info.value.reason == reason


def test_writes_need_the_body_and_the_stored_resource(fhir):
    assert an(fhir, "POST", "Observation").needs_body
    update = an(fhir, "PUT", "Observation/1")
    assert update.needs_body and update.needs_stored and update.action == "write"
    delete = an(fhir, "DELETE", "Observation/1")
    assert delete.needs_stored and not delete.needs_body
    assert an(fhir, "POST", "").interaction == "bundle"


def test_patient_of_reference():
    assert patient_of_reference("Patient/P1/_history/3", bare_is_patient=False) == "P1"
    assert patient_of_reference("Group/G1", bare_is_patient=True) is None
    assert patient_of_reference("P1", bare_is_patient=False) is None
    assert patient_of_reference("Patient/P 1", bare_is_patient=False) is False


def test_category_from_codes(fhir):
    vital = {"resourceType": "Observation", "category": [{"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}]}
    assert fhir.category_of(vital) == "vital_signs"
    assert fhir.category_of({"resourceType": "Observation"}) == "biology"
    report = {"resourceType": "DocumentReference", "type": {"coding": [{"system": "http://loinc.org",
                                                                        "code": "18748-4"}]}}
    assert fhir.category_of(report) == "imaging"
    assert fhir.category_of({"resourceType": "Practitioner"}) is None


# -- fhir.yaml validation --------------------------------------------------------------------------

@pytest.mark.parametrize("old, new, message", [
    ("  Encounter:\n", "  Encounterr:\n", "unknown FHIR R4 resource type"),
    ("    category: imaging\n    search: filter", "    category: imagery\n    search: filter", "unknown category"),
    ("    category: imaging\n    search: filter", "    category: imaging\n    search: sometimes",
     "'search' must be refuse or filter"),
    ("  pharmacist:\n    administrative", "  janitor:\n    administrative", "unknown role"),
    ("[Patient.address, Patient.telecom]", "[Patient.id]", "cannot be masked"),
    ("allow_parameters: []", "allow_parameters: [_everything]", "is not a parameter that can be allowed"),
    ("operations: [$everything]", "operations: [$export]", "not supported"),
])
def test_fhir_yaml_errors_name_file_and_line(tmp_path, policy, old, new, message):
    path = tmp_path / "fhir.yaml"
    shutil.copy(POLICIES / "fhir.yaml", path)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(PolicyError) as info:
        FhirPolicy.load(path, policy.roles, policy.categories)
    assert message in str(info.value)
    assert info.value.file == str(path) and info.value.line
    line = path.read_text().splitlines()[info.value.line - 1]
    assert new.split("\n")[0].strip()[:12] in line or new.split("\n")[-1].strip()[:12] in line


# -- responses -------------------------------------------------------------------------------------

def judge_for(fhir, policy, roles, team):
    return Judge(fhir=fhir, policy=policy, roles=roles,
                 access=lambda p, c, a, required: (p in team or not required, "not_in_care_team"))


def obs(ident, pid, **extra):
    return {"resourceType": "Observation", "id": ident, "status": "final", "code": {"text": "x"},
            "subject": {"reference": f"Patient/{pid}"}, **extra}


def bundle(entries, links=("self",), total=None):
    b = {"resourceType": "Bundle", "type": "searchset",
         "link": [{"relation": r, "url": f"http://up:1/fhir/Observation?{r}"} for r in links],
         "entry": [{"fullUrl": f"http://up:1/fhir/{r['resourceType']}/{r['id']}", "resource": r,
                    "search": {"mode": mode}} for r, mode in entries]}
    b["total"] = total if total is not None else sum(1 for _, m in entries if m == "match")
    return b


REWRITE = BundleRewriter("http://up:1", "https://proxy")


def page_of(body, judge, offset=0, size=20, exhausted=True):
    out = CheckedAnswer(None, 200)
    matches, includes = collect_page(body, judge, REWRITE, out)
    return page_bundle(matches, includes, offset, size, exhausted, [{"relation": "self", "url": "x"}]), out


def test_search_page_total_is_the_visible_count_only_when_read_to_the_end(fhir, policy):
    body = bundle([(obs("1", "P1"), "match"), (obs("2", "P2"), "match"), (obs("3", "P1"), "match")], total=3)
    judge = judge_for(fhir, policy, ("nurse",), {"P1"})
    page, out = page_of(body, judge)
    assert [e["resource"]["id"] for e in page["entry"]] == ["1", "3"]
    assert page["total"] == 2 and out.hidden == 1
    assert page["entry"][0]["fullUrl"] == "https://proxy/fhir/Observation/1"
    assert page["link"] == [{"relation": "self", "url": "x"}]  # never the DPI's links
    page, _ = page_of(body, judge, size=1, exhausted=False)  # more to read: no total at all
    assert "total" not in page and [e["resource"]["id"] for e in page["entry"]] == ["1"]
    page, _ = page_of(body, judge, offset=1, size=1)  # the last visible page
    assert page["total"] == 2 and [e["resource"]["id"] for e in page["entry"]] == ["3"]


def test_nested_searchset_has_no_paging_and_no_total(fhir, policy):
    body = bundle([(obs("1", "P1"), "match")], links=("self", "next"), total=50)
    out = process(body, 200, judge_for(fhir, policy, ("nurse",), {"P1"}), REWRITE, filtered_search=True)
    assert "total" not in out.body and [link["relation"] for link in out.body["link"]] == ["self"]


def test_includes_of_hidden_matches_are_pruned(fhir, policy):
    patient2 = {"resourceType": "Patient", "id": "P2"}
    patient1 = {"resourceType": "Patient", "id": "P1"}
    body = bundle([(obs("1", "P1"), "match"), (obs("2", "P2"), "match"), (patient1, "include"),
                   (patient2, "include")])
    out = process(body, 200, judge_for(fhir, policy, ("nurse",), {"P1"}), REWRITE, filtered_search=True)
    assert [e["resource"]["id"] for e in out.body["entry"]] == ["1", "P1"]
    page, _ = page_of(body, judge_for(fhir, policy, ("nurse",), {"P1"}))
    assert [e["resource"]["id"] for e in page["entry"]] == ["1", "P1"]


def test_a_resource_naming_two_patients_needs_both(fhir, policy):
    both = obs("1", "P1", performer=[{"reference": "Patient/P2"}])
    judge = judge_for(fhir, policy, ("nurse",), {"P1"})
    assert judge.resource(both).reason == "not_in_care_team"
    assert judge_for(fhir, policy, ("nurse",), {"P1", "P2"}).resource(both).ok


def test_unreadable_patient_links_fail_closed(fhir, policy):
    judge = judge_for(fhir, policy, ("doctor",), {"P1"})
    logical = obs("1", "P1", performer=[{"type": "Patient", "identifier": {"value": "123"}}])
    assert judge.resource(logical).reason == "fhir_no_patient"
    nobody = {"resourceType": "Observation", "id": "1", "status": "final", "code": {"text": "x"}}
    assert judge.resource(nobody).reason == "fhir_no_patient"
    assert judge.resource({"resourceType": "Practitioner", "id": "D"}).reason == "fhir_type_not_mapped"
    assert patient_links(obs("1", "P1", contained=[{"resourceType": "Patient", "id": "c"}])) == ({"P1"}, False)


def test_read_refused_and_masks_applied(fhir, policy):
    judge = judge_for(fhir, policy, ("pharmacist",), {"P1"})
    out = process(obs("1", "P2"), 200, judge, REWRITE, filtered_search=False)
    assert out.refused_reason == "not_in_care_team"
    patient = {"resourceType": "Patient", "id": "P1", "name": [{"family": "X"}], "birthDate": "2000-01-01",
               "_birthDate": {"id": "b"}, "address": [{"city": "Y"}], "telecom": [{"value": "0"}]}
    out = process(patient, 200, judge, REWRITE, filtered_search=False)
    assert set(out.body) == {"resourceType", "id", "name", "birthDate", "_birthDate"}
    assert out.masked == {"Patient.address", "Patient.telecom"}
    # With a second role that sees the address, the user sees it too.
    both = judge_for(fhir, policy, ("pharmacist", "secretary"), {"P1"})
    patient["address"] = [{"city": "Y"}]
    assert "address" in process(patient, 200, both, REWRITE, filtered_search=False).body


# -- issue 12: the parameter table, allowed chains, cursors, write helpers ------------------------------------

def test_search_parameter_table_is_consistent():
    from dpiguard.fhir.compartment import R4_TYPES
    from dpiguard.fhir.searchparams import SEARCH_PARAMETERS, search_param
    for kind, params in SEARCH_PARAMETERS.items():
        assert kind in R4_TYPES
        for param in params.values():
            assert param.targets <= R4_TYPES | {"*"}, (kind, param)
        for link in PATIENT_COMPARTMENT.get(kind, ()):  # every compartment link is a known reference
            assert search_param(kind, link).kind == "reference", (kind, link)
    assert search_param("Observation", "subject").can_target("Patient")
    assert search_param("Observation", "encounter").targets == {"Encounter"}


def test_allowed_chains_are_still_read(fhir):
    def chain(query):
        path, _, raw = query.partition("?")
        return analyze("GET", [path], parse_query(raw), types=fhir.types, allowed_params=frozenset({"encounter."}))
    assert chain("Observation?encounter.status=in-progress").patients == []
    assert chain("Observation?encounter.patient=P2").patients == ["P2"]  # a patient named through it must pass
    for bad in ("Observation?encounter.bogus=1", "Observation?encounter.subject.name=x",
                "Observation?subject.name=x", "Observation?encounter:Patient.name=x"):
        with pytest.raises(FhirRefusal):
            chain(bad)


def test_cursor_is_bound_to_user_search_and_time():
    from dpiguard.fhir.cursor import Cursor, CursorError, CursorSigner
    signer = CursorSigner(b"k" * 32, ttl=60)
    token = signer.issue("alice", Cursor("/fhir/Observation", "code=1", 20, 10), now=1000)
    assert signer.read(token, "alice", "/fhir/Observation", now=1030) == Cursor("/fhir/Observation", "code=1", 20, 10)
    body, _, mac = token.partition(".")
    for user, path, now, tok in (("bob", "/fhir/Observation", 1030, token), ("alice", "/fhir/Patient", 1030, token),
                                 ("alice", "/fhir/Observation", 1061, token),
                                 ("alice", "/fhir/Observation", 1030, body[:-2] + "AA." + mac),
                                 ("alice", "/fhir/Observation", 1030, "x")):
        with pytest.raises(CursorError):
            signer.read(tok, user, path, now)
    with pytest.raises(CursorError):
        CursorSigner(b"j" * 32).read(token, "alice", "/fhir/Observation", now=1030)  # another key


def test_write_helpers():
    from dpiguard.fhir.writes import (
        NEW_RESOURCE,
        PatchError,
        apply_json_patch,
        has_conditional_reference,
        local_reference_map,
        resolve_local_references,
    )
    stored = {"resourceType": "Observation", "id": "1", "subject": {"reference": "Patient/P1"}}
    moved = apply_json_patch(stored, [{"op": "replace", "path": "/subject/reference", "value": "Patient/P2"}])
    assert patient_links(moved)[0] == {"P2"} and stored["subject"]["reference"] == "Patient/P1"
    for bad in ([], {"op": "add"}, [{"op": "remove", "path": "/nothing"}], [{"op": "test", "path": "/id", "value": "2"}]):
        with pytest.raises(PatchError):
            apply_json_patch(stored, bad)
    assert has_conditional_reference({"a": [{"reference": "Patient?identifier=x|1"}]})
    entries = [{"fullUrl": "urn:uuid:a", "request": {"method": "PUT", "url": "Patient/P2"}},
               {"fullUrl": "urn:uuid:b", "request": {"method": "POST", "url": "Patient"}}]
    local = local_reference_map(entries)
    assert local == {"urn:uuid:a": "Patient/P2", "urn:uuid:b": NEW_RESOURCE}
    resolved = resolve_local_references({"subject": {"reference": "urn:uuid:a"}, "x": {"reference": "urn:uuid:z"}},
                                        local)
    assert resolved["subject"]["reference"] == "Patient/P2"
    assert patient_links(resolved) == ({"P2"}, True)  # the unknown urn: stays unreadable
    assert local_reference_map(entries + entries[:1]) is None  # repeated fullUrl
