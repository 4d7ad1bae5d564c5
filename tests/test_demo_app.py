"""Demo DPI over a real socket, and the synthetic dataset behind it."""

from __future__ import annotations

import base64

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dpiguard.decision.assertion import (
    HEADER_ASSERTION,
    HEADER_ROLES,
    HEADER_UNITS,
    HEADER_USER,
    AssertionSigner,
    AssertionVerifier,
)
from dpiguard.demo.app import create_app, start_in_thread
from dpiguard.demo.data import build_dataset

AUDIENCE = "http://demo-dpi"
NOW = 1_800_000_000


@pytest.fixture(scope="module")
def dataset():
    return build_dataset(now=NOW)


@pytest.fixture(scope="module")
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def base_url(dataset, key):
    app = create_app(dataset, AssertionVerifier(key.public_key(), AUDIENCE))
    server, port = start_in_thread(app)
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def signer(key):
    return AssertionSigner(key, AUDIENCE)


def headers_for(signer, user="dr.martin", roles=("doctor",), units=("CARDIO",)):
    token = signer.sign(user, list(roles), list(units), "f" * 64)
    return {
        HEADER_USER: user,
        HEADER_ROLES: ",".join(roles),
        HEADER_UNITS: ",".join(units),
        HEADER_ASSERTION: token,
    }


@pytest.fixture
def client(base_url, signer):
    with httpx.Client(base_url=base_url, headers=headers_for(signer)) as c:
        yield c


# --- trust model ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/patients", "/patients/P0001", "/api/patients/P0001",
                                  "/fhir/Patient/P0001", "/nowhere"])
def test_without_assertion_is_401(base_url, path):
    response = httpx.get(base_url + path, headers={HEADER_USER: "dr.martin"})
    assert response.status_code == 401
    assert "did not come through dpiguard" in response.text


def test_forged_assertion_is_401(base_url):
    forger = AssertionSigner(Ed25519PrivateKey.generate(), AUDIENCE)
    response = httpx.get(base_url + "/api/patients/P0001", headers=headers_for(forger))
    assert response.status_code == 401
    assert response.json()["error"] == "request did not come through dpiguard"


def test_user_header_mismatch_is_401(base_url, signer):
    headers = headers_for(signer)
    headers[HEADER_USER] = "dr.someone-else"
    response = httpx.get(base_url + "/", headers=headers)
    assert response.status_code == 401


def test_static_is_public(base_url):
    response = httpx.get(base_url + "/static/style.css")
    assert response.status_code == 200
    assert "text/css" in response.headers["content-type"]
    assert httpx.get(base_url + "/favicon.ico").status_code == 204


# --- HTML -------------------------------------------------------------------------


def test_home_shows_identity(client):
    response = client.get("/")
    assert response.status_code == 200
    assert "dr.martin" in response.text and "CARDIO" in response.text


def test_patient_list_is_limited_to_units(client, dataset):
    response = client.get("/patients")
    assert response.status_code == 200
    assert "P0001" in response.text
    assert "P0002" not in response.text  # PNEUMO
    expected = dataset.patients_in_units({"CARDIO"})
    assert all(p.patient_id in response.text for p in expected)


@pytest.mark.parametrize("suffix", ["", "/notes", "/biology", "/prescriptions", "/imaging"])
def test_patient_pages(client, suffix):
    response = client.get(f"/patients/P0001{suffix}")
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert "P0001" in response.text


def test_post_note_form_then_read(client):
    response = client.post("/patients/P0001/notes", data={"text": "Note <b>de test</b> HTML"})
    assert response.status_code == 303
    assert response.headers["location"].endswith("/patients/P0001/notes")
    page = client.get("/patients/P0001/notes")
    assert "Note &lt;b&gt;de test&lt;/b&gt; HTML" in page.text
    assert client.post("/patients/P0001/notes", data={"text": "  "}).status_code == 400


def test_unknown_patient_html_404(client):
    assert client.get("/patients/P9999").status_code == 404
    assert client.get("/patients/P9999/notes").status_code == 404


# --- JSON API ---------------------------------------------------------------------


def test_api_routes(client, dataset):
    admin = client.get("/api/patients/P0001").json()
    assert admin["patient_id"] == "P0001"
    assert admin["family_name"] == dataset.patient("P0001").family_name
    for category in ("notes", "biology", "prescriptions", "imaging"):
        response = client.get(f"/api/patients/P0001/{category}")
        assert response.status_code == 200
        assert response.json()["category"] == category


def test_api_post_note_then_read(client):
    response = client.post("/api/patients/P0002/notes", json={"text": "Note API"})
    assert response.status_code == 201
    assert response.json()["author"] == "dr.martin"
    notes = client.get("/api/patients/P0002/notes").json()["items"]
    assert notes[-1]["text"] == "Note API"
    assert client.post("/api/patients/P0002/notes", json={"nope": 1}).status_code == 400


def test_api_unknown_patient_404(client):
    response = client.get("/api/patients/P9999/biology")
    assert response.status_code == 404
    assert response.json()["error"] == "unknown patient"


# --- FHIR -------------------------------------------------------------------------


def test_fhir_patient(client, dataset):
    response = client.get("/fhir/Patient/P0001")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    resource = response.json()
    patient = dataset.patient("P0001")
    assert resource["resourceType"] == "Patient"
    assert resource["id"] == "P0001"
    assert resource["name"][0]["family"] == patient.family_name
    assert resource["birthDate"] == patient.birth_date
    assert resource["gender"] in ("male", "female")


@pytest.mark.parametrize(
    "kind", ["Observation", "MedicationRequest", "DocumentReference", "ImagingStudy"]
)
@pytest.mark.parametrize("pid", ["P0001", "P0002", "P0003"])
def test_fhir_search_bundles(client, kind, pid):
    response = client.get(f"/fhir/{kind}", params={"patient": pid})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    assert bundle["total"] == len(bundle["entry"])
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert resource["resourceType"] == kind
        assert resource["subject"] == {"reference": f"Patient/{pid}"}
        assert entry["fullUrl"].endswith(f"/fhir/{kind}/{resource['id']}")


def test_fhir_observations_laboratory_and_vital_signs(client, dataset):
    bundle = client.get("/fhir/Observation", params={"patient": "P0001", "_count": "100"}).json()
    codes = [e["resource"]["category"][0]["coding"][0]["code"] for e in bundle["entry"]]
    assert codes.count("laboratory") == len(dataset.records["P0001"].biology) > 0
    assert codes.count("vital-signs") == 3


def test_fhir_document_reference_carries_note_text(client, dataset):
    bundle = client.get("/fhir/DocumentReference", params={"patient": "P0003"}).json()
    texts = [
        base64.b64decode(e["resource"]["content"][0]["attachment"]["data"]).decode()
        for e in bundle["entry"]
    ]
    assert texts[0] == dataset.records["P0003"].clinical_notes[0]["text"]


def test_fhir_errors(client):
    unknown = client.get("/fhir/Patient/P9999")
    assert unknown.status_code == 404
    assert unknown.json()["resourceType"] == "OperationOutcome"
    assert client.get("/fhir/Observation", params={"patient": "P9999"}).json()["total"] == 0
    assert client.get("/fhir/Observation", params={"patient": "P0001", "x": "1"}).status_code == 400
    assert client.get("/fhir/Practitioner").status_code == 404


def test_fhir_search_forms(client):
    bare = client.get("/fhir/Observation", params={"patient": "P0001"}).json()
    for params in ({"patient": "Patient/P0001"}, {"subject": "Patient/P0001"}, {"subject:Patient": "P0001"}):
        assert client.get("/fhir/Observation", params=params).json()["total"] == bare["total"]
    both = client.get("/fhir/Observation", params={"patient": "P0001,P0002"}).json()
    two = client.get("/fhir/Observation", params={"patient": "P0002"}).json()
    assert both["total"] == bare["total"] + two["total"]
    vitals = client.get("/fhir/Observation", params={"patient": "P0001", "category": "vital-signs"}).json()
    assert vitals["total"] == 3


def test_fhir_paging_links_carry_the_search(client):
    bundle = client.get("/fhir/Observation", params={"code": "http://loinc.org|8867-4", "_count": "50"}).json()
    assert bundle["total"] == 220 and len(bundle["entry"]) == 50
    (nxt,) = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
    assert "code=http%3A%2F%2Floinc.org%7C8867-4" in nxt and "_offset=50" in nxt and "_count=50" in nxt


def test_fhir_resources_are_valid_r4(dataset):
    from fhir.resources.R4B import get_fhir_model_class

    from dpiguard.demo.fhir_server import build_resources

    resources = build_resources(dataset)
    kinds = {r["resourceType"] for r in resources}
    assert kinds == {"Patient", "Encounter", "Observation", "MedicationRequest", "DocumentReference",
                     "ImagingStudy", "AllergyIntolerance", "Condition"}
    for resource in resources:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def test_fhir_writes_and_transaction(client):
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "subject": {"reference": "Patient/P0001"}}
    created = client.post("/fhir/Observation", json=obs)
    assert created.status_code == 201
    ident = created.json()["id"]
    assert client.put(f"/fhir/Observation/{ident}", json=dict(obs, id=ident, status="amended")).status_code == 200
    assert client.get(f"/fhir/Observation/{ident}/_history/2").json()["status"] == "amended"
    assert len(client.get(f"/fhir/Observation/{ident}/_history").json()["entry"]) == 2
    assert client.delete(f"/fhir/Observation/{ident}").status_code == 204
    assert client.get(f"/fhir/Observation/{ident}").status_code == 404
    bad = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": obs, "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Nope"}, "request": {"method": "POST", "url": "Nope"}}]}
    before = client.get("/fhir/Observation", params={"patient": "P0001", "_count": "100"}).json()["total"]
    assert client.post("/fhir", json=bad).status_code in (400, 404)
    after = client.get("/fhir/Observation", params={"patient": "P0001", "_count": "100"}).json()["total"]
    assert after == before  # all or nothing
    everything = client.get("/fhir/Patient/P0001/$everything").json()
    assert {e["resource"]["resourceType"] for e in everything["entry"]} >= {"Patient", "Observation"}


# --- dataset ----------------------------------------------------------------------


def test_dataset_is_deterministic():
    assert build_dataset(now=NOW) == build_dataset(now=NOW)
    assert build_dataset(seed=1, now=NOW) != build_dataset(now=NOW)


def test_dataset_counts(dataset):
    assert len(dataset.patients) >= 200
    assert [p.patient_id for p in dataset.patients][:2] == ["P0001", "P0002"]
    assert len({p.patient_id for p in dataset.patients}) == len(dataset.patients)
    assert len(dataset.staff) >= 30
    assert len({s.login for s in dataset.staff}) == len(dataset.staff)
    assert len({s.role for s in dataset.staff}) >= 4
    assert {u.code for u in dataset.units} == {"CARDIO", "PNEUMO", "URG", "PEDIA", "ONCO"}
    assert set(dataset.records) == {p.patient_id for p in dataset.patients}
    assert len(dataset.assignments) == 2


def test_dataset_anchors(dataset):
    roles = {s.login: s for s in dataset.staff}
    assert roles["dr.martin"].role == "doctor" and "CARDIO" in roles["dr.martin"].units
    assert roles["inf.durand"].role == "nurse" and "CARDIO" in roles["inf.durand"].units
    assert roles["sec.bernard"].role == "secretary" and "CARDIO" in roles["sec.bernard"].units
    assert roles["pha.petit"].role == "pharmacist" and roles["pha.petit"].units == ()
    assert roles["acc.robert"].role == "reception" and roles["acc.robert"].units == ()
    assert dataset.open_stay("P0001").unit == "CARDIO"
    assert dataset.open_stay("P0002").unit == "PNEUMO"


def test_dataset_shapes(dataset):
    memberships = {(m.login, m.unit) for m in dataset.memberships}
    assert memberships == {(s.login, u) for s in dataset.staff for u in s.units}
    for stay in dataset.stays:
        if stay.is_open:
            assert NOW - 10 * 86400 <= stay.start <= NOW
        else:
            assert NOW - 20 * 86400 <= stay.end <= NOW - 2 * 86400 and stay.start < stay.end
    for assignment in dataset.assignments:
        doctor = dataset.staff_member(assignment.login)
        assert doctor.role == "doctor" and assignment.kind == "referring_physician"
        assert dataset.open_stay(assignment.patient_id).unit not in doctor.units
    for record in dataset.records.values():
        assert 2 <= len(record.clinical_notes) <= 4
        assert record.biology and 1 <= len(record.prescriptions) <= 3
        assert len(record.imaging) <= 2


def test_assertion_mode_needs_a_verifier(dataset):
    with pytest.raises(ValueError):
        create_app(dataset, None)


def test_development_mode_trusts_plain_headers_only_without_assertion(dataset, key, signer):
    app = create_app(dataset, AssertionVerifier(key.public_key(), AUDIENCE), require_assertion=False)
    client = app.test_client()
    plain = {HEADER_USER: "inf.durand", HEADER_ROLES: "nurse", HEADER_UNITS: "PNEUMO"}
    page = client.get("/patients", headers=plain)
    assert page.status_code == 200 and "P0002" in page.get_data(as_text=True)
    assert client.get("/", headers={}).status_code == 401
    forged = dict(plain, **{HEADER_ASSERTION: "not.a.token"})
    assert client.get("/", headers=forged).status_code == 401
