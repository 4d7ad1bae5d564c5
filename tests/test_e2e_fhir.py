"""FHIR-aware enforcement end to end: real mitmproxy running dpiguard, real Redis, the demo FHIR server."""

from __future__ import annotations

import asyncio

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhirpy import AsyncFHIRClient

from dpiguard.audit.chain import read_records
from dpiguard.demo.data import build_dataset
from dpiguard.services import careteam_store

from .stack import build_stack

pytestmark = pytest.mark.timeout(180)

HEART_RATE = "http://loinc.org|8867-4"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("fhir"))
    s.start_proxy("a")
    yield s
    s.close()


@pytest.fixture(scope="module")
def proxy(stack):
    return stack.proxies[0]


@pytest.fixture(scope="module")
def cardio():
    """Patients with an open stay in CARDIO: the nurse inf.durand's care team."""
    return {p.patient_id for p in build_dataset(2026).patients_in_units(["CARDIO"])}


@pytest.fixture(scope="module")
def fhir_store(stack):
    return stack.upstream_app.app.extensions["dpiguard_demo_fhir"]


def subjects(bundle: dict, kind: str | None = None) -> set[str]:
    out = set()
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        if kind and resource["resourceType"] != kind:
            continue
        ref = (resource.get("subject") or resource.get("patient") or {}).get("reference")
        out.add(ref.split("/")[-1] if ref else resource["id"])
    return out


def validate(resource: dict) -> None:
    """Valid FHIR (R4B models: the R4 resources used here are unchanged in R4B)."""
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def keys_anywhere(value, names: set[str]) -> set[str]:
    found = set()
    if isinstance(value, dict):
        found |= names & set(value)
        for item in value.values():
            found |= keys_anywhere(item, names)
    elif isinstance(value, list):
        for item in value:
            found |= keys_anywhere(item, names)
    return found


def records(stack, **match):
    return [r for r in read_records(stack.audit_path) if all(r.get(k) == v for k, v in match.items())]


# -- searches -----------------------------------------------------------------------------------------

def test_unscoped_search_shows_only_care_team_and_total_hides_the_rest(stack, proxy, cardio):
    c = stack.client(proxy, "inf.durand")
    r = c.get("/fhir/Observation", params={"code": HEART_RATE, "_count": "300"})
    assert r.status_code == 200, r.text
    bundle = r.json()
    validate(bundle)
    assert subjects(bundle) == cardio  # exactly her unit's patients, no one else
    assert bundle["total"] == len(bundle["entry"]) == len(cardio) < 220  # upstream matched 220
    (rec,) = [x for x in records(stack, event="fhir_response", user="inf.durand")
              if "8867-4" in x["path"] and "_count=300" in x["path"]]
    assert rec["hidden"] == 220 - len(cardio) and rec["returned"] == len(cardio)
    assert rec["hidden_reasons"] == {"not_in_care_team": 220 - len(cardio)}


def test_paging_is_dpiguards_own_over_visible_matches(stack, proxy, cardio):
    c = stack.client(proxy, "inf.durand")
    url = f"/fhir/Observation?code={HEART_RATE}&_count=25"
    seen: list[str] = []
    pages = []
    while url:
        r = c.get(url)
        assert r.status_code == 200, r.text
        bundle = r.json()
        validate(bundle)
        pages.append(bundle)
        seen += [e["resource"]["subject"]["reference"].split("/")[1] for e in bundle["entry"]]
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        for link in bundle["link"]:
            assert link["url"].startswith(proxy.url + "/fhir/Observation")  # links point at dpiguard
            assert "_offset" not in link["url"] and "code=" not in link["url"].partition("?")[2] or \
                link["relation"] == "self"
        url = nxt[0][len(proxy.url):] if nxt else None
    # Pages of 25 visible matches (not 25 upstream matches, mostly hidden): ceil(40/25) pages.
    assert [len(p["entry"]) for p in pages] == [25] * (len(cardio) // 25) + [len(cardio) % 25]
    assert "total" not in pages[0] and pages[-1]["total"] == len(cardio)  # only the visible count, at the end
    assert set(seen) == cardio and len(seen) == len(cardio)
    # A page link dpiguard did not issue, or altered, is refused; the DPI's own paging too.
    token = pages[0]["link"][1]["url"].partition("_cursor=")[2]
    forged = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    for bad in (f"/fhir/Observation?_cursor={forged}", f"/fhir/Observation?_cursor={token}&code=x",
                f"/fhir/Observation?code={HEART_RATE}&_count=25&_offset=25",
                f"/fhir/Observation?_getpages=abc"):
        r = c.get(bad)
        assert r.status_code in (400, 403), bad
    assert stack.client(proxy, "dr.martin").get(f"/fhir/Observation?_cursor={token}").status_code == 400


def test_refuse_mode_type_needs_a_patient(stack, proxy):
    c = stack.client(proxy, "dr.martin")
    before = len(stack.upstream_app.seen)
    r = c.get("/fhir/DocumentReference", params={"status": "current"})
    assert r.status_code == 403
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "fhir_search_not_scoped"
    assert len(stack.upstream_app.seen) == before
    assert c.get("/fhir/DocumentReference", params={"patient": "P0001"}).status_code == 200


@pytest.mark.parametrize("query", [
    "patient=P0002", "subject=Patient/P0002", "subject:Patient=P0002", "patient=P0001,P0002",
    "patient=P0001&subject=P0002", "focus=Patient/P0002&patient=P0001",
])
def test_every_named_patient_must_pass(stack, proxy, query):
    c = stack.client(proxy, "inf.durand")
    before = len(stack.upstream_app.seen)
    r = c.get(f"/fhir/Observation?{query}")
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "forbidden"
    assert body["issue"][0]["details"]["coding"][0]["code"] == "not_in_care_team"
    assert len(stack.upstream_app.seen) == before


def test_scoped_search_keeps_its_total(stack, proxy, fhir_store):
    c = stack.client(proxy, "inf.durand")
    r = c.get("/fhir/Observation", params={"subject:Patient": "P0001"})
    assert r.status_code == 200
    bundle = r.json()
    expected = [o for o in fhir_store.all("Observation") if o["subject"]["reference"] == "Patient/P0001"]
    assert bundle["total"] == len(expected) == len(bundle["entry"])


@pytest.mark.parametrize("query, reason", [
    ("Patient?_has:Observation:patient:code=8867-4", "fhir_forbidden_parameter"),
    ("Observation?_filter=code eq 8867-4", "fhir_forbidden_parameter"),
    ("Observation?encounter.subject=P0002", "fhir_forbidden_parameter"),
    ("Observation?code=8867-4&_elements=code", "fhir_forbidden_parameter"),
    ("Observation?code=8867-4&_summary=count", "fhir_forbidden_parameter"),
    ("Observation?patient=P0001&_revinclude=Provenance:target", "fhir_forbidden_parameter"),
    ("Observation?patient=P0001&_include=*", "fhir_forbidden_parameter"),
    ("Practitioner?name=x", "fhir_type_not_mapped"),
    ("Observation/P0001-bio-1/$validate", "fhir_operation_not_allowed"),
    ("Observation?patient=P0001&_format=xml", "fhir_not_supported"),
])
def test_probing_parameters_refused_before_upstream(stack, proxy, query, reason):
    c = stack.client(proxy, "dr.martin")
    before = len(stack.upstream_app.seen)
    r = c.get(f"/fhir/{query}")
    assert r.status_code in (400, 403), r.text
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == reason
    assert len(stack.upstream_app.seen) == before
    assert records(stack, reason=reason)


def test_revinclude_only_brings_care_team_resources(stack, proxy, cardio):
    c = stack.client(proxy, "inf.durand")
    r = c.get("/fhir/Patient", params={"gender": "female", "_revinclude": "Observation:subject",
                                       "_count": "300"})
    assert r.status_code == 200, r.text
    bundle = r.json()
    validate(bundle)
    matched = {e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"}
    assert len(matched - cardio) > 50  # identity is administrative: no care team needed
    observed = subjects(bundle, "Observation")
    assert observed == matched & cardio  # clinical data only for her care team


def test_include_never_reveals_the_patient_of_a_hidden_match(stack, proxy, cardio):
    c = stack.client(proxy, "inf.durand")
    r = c.get("/fhir/Observation", params={"code": HEART_RATE, "_include": "Observation:subject",
                                           "_count": "300"})
    assert r.status_code == 200
    bundle = r.json()
    included = {e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "include"}
    assert included == cardio  # not the 220 patients the upstream included
    assert bundle["total"] == len(cardio)


# -- reads by id --------------------------------------------------------------------------------------

def test_read_by_id_checked_on_the_response(stack, proxy):
    c = stack.client(proxy, "inf.durand")
    ok = c.get("/fhir/Observation/P0001-bio-1")
    assert ok.status_code == 200 and ok.json()["subject"]["reference"] == "Patient/P0001"
    validate(ok.json())
    missing = c.get("/fhir/Observation/P0001-nothing-here")
    for path in ("/fhir/Observation/P0002-bio-1", "/fhir/Observation/P0002-vs-1/_history/1",
                 "/fhir/Observation/P0002-vs-1/_history"):
        r = c.get(path)
        # Answered exactly like a resource that does not exist (no existence oracle): status, headers, body.
        assert r.status_code == missing.status_code == 404, path
        assert r.headers["content-type"].startswith("application/fhir+json")
        body = r.json()
        validate(body)
        assert body["issue"][0]["details"]["coding"][0]["code"] == "fhir_not_found"
        assert r.text.replace(r.headers["x-dpiguard-request-id"], "") == \
            missing.text.replace(missing.headers["x-dpiguard-request-id"], "")
        assert sorted(r.headers) == sorted(missing.headers)
        assert "P0002" not in r.text.replace("P0002-", "")  # the refused resource itself never leaves
        assert "valueQuantity" not in r.text
    rec = [x for x in records(stack, event="fhir_response", outcome="deny") if x["path"].endswith("P0002-bio-1")]
    assert rec and rec[-1]["reason"] == "not_in_care_team" and rec[-1]["concealed"]  # the trace says why


@pytest.fixture(scope="module")
def pharmacist(stack, proxy):
    """pha.petit (no unit) explicitly assigned to P0001."""
    careteam_store(stack.config).assign("pha.petit", "P0001")
    return stack.client(proxy, "pha.petit")


def test_category_from_code_vital_signs_vs_laboratory(stack, pharmacist):
    c = pharmacist  # pharmacist: biology yes, vital signs no
    assert c.get("/fhir/Observation/P0001-bio-1").status_code == 200
    r = c.get("/fhir/Observation/P0001-vs-1")
    assert r.status_code == 404  # like a missing resource; the trace has the reason
    rec = [x for x in records(stack, event="fhir_response") if x["path"].endswith("/P0001-vs-1")]
    assert rec[-1]["reason"] == "category_not_permitted" and rec[-1]["user"] == "pha.petit"


# -- masks --------------------------------------------------------------------------------------------

def test_masked_elements_never_reach_the_pharmacist(stack, proxy, pharmacist):
    c = pharmacist
    responses = [
        c.get("/fhir/Patient/P0001"),
        c.get("/fhir/Patient", params={"family": "Martin", "_count": "50"}),
        c.get("/fhir/Observation", params={"patient": "P0001", "_include": "Observation:subject"}),
        c.get("/fhir/Patient/P0001/_history/1"),
    ]
    for r in responses:
        assert r.status_code == 200, r.text
        body = r.json()
        validate(body)
        assert keys_anywhere(body, {"address", "telecom"}) == set(), r.url
    patient = responses[0].json()
    assert patient["name"] and patient["birthDate"]
    r = c.get("/fhir/Patient", params={"address-city": "Villefictive"})
    assert r.status_code == 403
    # A doctor still sees them.
    assert "address" in stack.client(proxy, "dr.martin").get("/fhir/Patient/P0001").json()


# -- writes -------------------------------------------------------------------------------------------

def _vital(pid: str, value: float = 80) -> dict:
    return {"resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": f"Patient/{pid}"},
            "valueQuantity": {"value": value, "unit": "/min"}}


def test_create_checks_the_patient_in_the_body(stack, proxy):
    c = stack.client(proxy, "inf.durand")
    headers = {"content-type": "application/fhir+json"}
    r = c.post("/fhir/Observation", json=_vital("P0001"), headers=headers)
    assert r.status_code == 201, r.text
    assert r.headers["location"].startswith(proxy.url + "/fhir/Observation/")
    before = len(stack.upstream_app.seen)
    r = c.post("/fhir/Observation", json=_vital("P0002"), headers=headers)
    assert r.status_code == 403
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "not_in_care_team"
    assert len(stack.upstream_app.seen) == before
    # Nurses do not write lab results.
    lab = dict(_vital("P0001"), category=[{"coding": [{"code": "laboratory"}]}])
    assert c.post("/fhir/Observation", json=lab, headers=headers).status_code == 403


def test_update_and_delete_check_the_stored_resource(stack, proxy, fhir_store):
    c = stack.client(proxy, "inf.durand")
    # The body names her patient, but the stored resource is about P0002: refused.
    moved = dict(_vital("P0001"), id="P0002-vs-2")
    stack.upstream_app.clear()
    r = c.put("/fhir/Observation/P0002-vs-2", json=moved)
    assert r.status_code == 404, r.text  # like a missing resource (update-as-create is not open either)
    assert [s["method"] for s in stack.upstream_app.seen] == ["GET"]  # only dpiguard's look-up
    assert fhir_store.read("Observation", "P0002-vs-2")["subject"]["reference"] == "Patient/P0002"
    assert c.delete("/fhir/Observation/P0002-vs-2").status_code == 404
    assert c.put("/fhir/Observation/P0001-none", json=dict(_vital("P0001"), id="P0001-none")).status_code == 404
    assert records(stack, event="access", reason="not_in_care_team", method="DELETE")
    assert fhir_store.read("Observation", "P0002-vs-2") is not None
    ok = c.put("/fhir/Observation/P0001-vs-2", json=dict(_vital("P0001", 91), id="P0001-vs-2"))
    assert ok.status_code == 200, ok.text
    assert fhir_store.read("Observation", "P0001-vs-2")["valueQuantity"]["value"] == 91


def test_transaction_with_one_forbidden_entry_is_refused_whole(stack, proxy, fhir_store):
    c = stack.client(proxy, "inf.durand")
    count = len(fhir_store.all("Observation"))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": _vital("P0001", 70), "request": {"method": "POST", "url": "Observation"}},
        {"resource": _vital("P0002", 71), "request": {"method": "POST", "url": "Observation"}},
    ]}
    validate(bundle)
    stack.upstream_app.clear()
    r = c.post("/fhir", json=bundle, headers={"content-type": "application/fhir+json"})
    assert r.status_code == 403
    body = r.json()
    assert body["issue"][0]["details"]["coding"][0]["code"] == "not_in_care_team"
    assert "entry 2" in body["issue"][0]["details"]["text"]
    assert stack.upstream_app.seen == []  # nothing reached the DPI
    assert len(fhir_store.all("Observation")) == count
    bundle["entry"].pop()
    r = c.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "transaction-response"
    assert len(fhir_store.all("Observation")) == count + 1


def test_everything_is_patient_scoped_and_filtered(stack, proxy, pharmacist):
    r = pharmacist.get("/fhir/Patient/P0003/$everything")  # not assigned to P0003
    assert r.status_code == 403
    r = pharmacist.get("/fhir/Patient/P0001/$everything")
    assert r.status_code == 200
    kinds = {e["resource"]["resourceType"] for e in r.json()["entry"]}
    assert "MedicationRequest" in kinds and "DocumentReference" not in kinds  # his categories only
    assert not [e for e in r.json()["entry"] if e["resource"].get("category", [{}])[0].get("coding", [{}])[0]
                .get("code") == "vital-signs"]
    d = stack.client(proxy, "inf.durand")
    r = d.get("/fhir/Patient/P0001/$everything")
    assert r.status_code == 200
    bundle = r.json()
    assert subjects(bundle) == {"P0001"}
    assert d.get("/fhir/Patient/P0002/$everything").status_code == 403


# -- a real FHIR client -------------------------------------------------------------------------------

def test_fhirpy_client_through_the_proxy(stack, proxy, cardio):
    token = stack.client(proxy, "inf.durand").cookies["dpiguard_session"]  # the bearer token of the JSON login

    async def run():
        client = AsyncFHIRClient(f"{proxy.url}/fhir", authorization=f"Bearer {token}")
        observations = await client.resources("Observation").search(code=HEART_RATE).limit(30).fetch_all()
        patient = await client.resources("Patient").search(_id="P0001").first()
        return observations, patient

    observations, patient = asyncio.run(run())
    assert {o["subject"]["reference"].split("/")[1] for o in observations} == cardio
    assert patient["id"] == "P0001"
