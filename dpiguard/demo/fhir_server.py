"""A small in-memory FHIR R4 server over the synthetic dataset (the demo DPI's FHIR face).

Registered by :func:`dpiguard.demo.app.create_app` under ``/fhir``. It knows nothing about care teams
(dpiguard's job); it is just a plausible FHIR server to enforce rules on:

* read ``GET /fhir/T/id``, vread ``GET /fhir/T/id/_history/v``, history ``GET /fhir/T/id/_history``;
* search ``GET /fhir/T?...`` with ``_id``, ``patient``, ``subject`` (``:Patient`` modifier, ``Patient/P``
  values, comma lists = OR, repeated parameters = AND), ``code``, ``category``, ``type``, ``status``,
  ``encounter``, Patient ``name``/``family``/``birthdate``/``identifier``, ``_include``, ``_revinclude``,
  ``_count`` and ``_offset`` paging with ``next``/``previous`` links carrying the whole search;
  compartment search ``GET /fhir/Patient/P/T``;
* create ``POST /fhir/T``, update ``PUT /fhir/T/id``, JSON Patch ``PATCH /fhir/T/id``, delete
  ``DELETE /fhir/T/id`` (``If-Match`` honoured on the last three);
* ``transaction`` and ``batch`` Bundles ``POST /fhir``;
* ``GET /fhir/Patient/P/$everything`` and ``GET /fhir/metadata``.

Unknown search parameters are refused with 400 (strict: the server reads what the proxy read).
"""

from __future__ import annotations

import base64
import copy
import itertools
import random
import threading
from datetime import UTC, datetime
from urllib.parse import urlencode

import jsonpatch
import orjson
from flask import Flask, Response, request

from dpiguard.demo.data import Dataset

FHIR_JSON = "application/fhir+json"
OBS_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
LOINC = "http://loinc.org"
DICOM_MODALITIES = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
DEFAULT_COUNT = 20
MAX_COUNT = 500

TYPES = ("Patient", "Encounter", "Observation", "MedicationRequest", "DocumentReference", "ImagingStudy",
         "AllergyIntolerance", "Condition")
# Reference search parameters: name -> element holding the reference.
REFERENCE_PARAMS = {
    "Encounter": {"patient": "subject", "subject": "subject"},
    "Observation": {"patient": "subject", "subject": "subject", "encounter": "encounter"},
    "MedicationRequest": {"patient": "subject", "subject": "subject", "encounter": "encounter"},
    "DocumentReference": {"patient": "subject", "subject": "subject"},
    "ImagingStudy": {"patient": "subject", "subject": "subject", "encounter": "encounter"},
    "AllergyIntolerance": {"patient": "patient"},
    "Condition": {"patient": "subject", "subject": "subject", "encounter": "encounter"},
    "Patient": {},
}
# Token search parameters: name -> element (CodeableConcept, list of them, or plain code).
TOKEN_PARAMS = {
    "Encounter": {"status": "status"},
    "Observation": {"code": "code", "category": "category", "status": "status"},
    "MedicationRequest": {"status": "status"},
    "DocumentReference": {"type": "type", "status": "status"},
    "ImagingStudy": {"modality": "modality", "status": "status"},
    "AllergyIntolerance": {"code": "code"},
    "Condition": {"code": "code"},
    "Patient": {"identifier": "identifier", "gender": "gender"},
}
CONDITIONS = {
    "CARDIO": ("84114007", "Insuffisance cardiaque"),
    "PNEUMO": ("233604007", "Pneumopathie"),
    "URG": ("125605004", "Fracture"),
    "PEDIA": ("195967001", "Asthme"),
    "ONCO": ("363346000", "Tumeur maligne"),
}
ALLERGIES = (("764146007", "Pénicilline"), ("227493005", "Noix de cajou"), ("111088007", "Latex"))
VITALS = (("8867-4", "Fréquence cardiaque", "/min", 55, 110, 0),
          ("8310-5", "Température corporelle", "Cel", 36.0, 39.5, 1),
          ("8480-6", "Pression artérielle systolique", "mm[Hg]", 95, 170, 0))


class FhirError(Exception):
    def __init__(self, status: int, code: str, diagnostics: str):
        self.status, self.code, self.diagnostics = status, code, diagnostics
        super().__init__(diagnostics)


def fhir_time(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), tz=UTC).isoformat(timespec="seconds")


def outcome(status: int, code: str, diagnostics: str) -> Response:
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}
    return Response(orjson.dumps(body), status=status, mimetype=FHIR_JSON)


def _ref(kind: str, ident: str) -> dict:
    return {"reference": f"{kind}/{ident}"}


# --- resources built from the dataset ---------------------------------------------


def build_resources(dataset: Dataset) -> list[dict]:
    """Every FHIR resource of the demo, deterministic for a dataset."""
    out: list[dict] = []
    stays = {s.patient_id: s for s in dataset.stays}
    for patient in dataset.patients:
        pid = patient.patient_id
        record = dataset.records[pid]
        out.append(_patient(record.administrative))
        stay = stays.get(pid)
        enc_id = None
        if stay is not None:
            enc_id = f"{pid}-enc-1"
            encounter = {
                "resourceType": "Encounter", "id": enc_id,
                "status": "in-progress" if stay.end is None else "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP",
                          "display": "inpatient encounter"},
                "subject": _ref("Patient", pid),
                "period": {"start": fhir_time(stay.start)},
                "serviceProvider": {"display": stay.unit},
            }
            if stay.end is not None:
                encounter["period"]["end"] = fhir_time(stay.end)
            out.append(encounter)
        for result in record.biology:
            out.append(_lab(pid, enc_id, result))
        rng = random.Random(f"vitals-{pid}")
        moment = stay.start if stay else dataset.now - 86400
        for index, (code, label, unit, low, high, decimals) in enumerate(VITALS, start=1):
            value = round(rng.uniform(low, high), decimals)
            out.append(_vital(pid, enc_id, f"{pid}-vs-{index}", code, label, unit, value, moment + index * 600))
        for rx in record.prescriptions:
            out.append(_medication_request(pid, enc_id, rx))
        for note in record.clinical_notes:
            out.append(_document_reference(pid, note))
        for study in record.imaging:
            out.append(_imaging_study(pid, enc_id, study))
        if rng.random() < 0.3:
            code, label = rng.choice(ALLERGIES)
            out.append({
                "resourceType": "AllergyIntolerance", "id": f"{pid}-allergy-1",
                "clinicalStatus": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                    "code": "active"}]},
                "code": {"coding": [{"system": SNOMED, "code": code, "display": label}], "text": label},
                "patient": _ref("Patient", pid),
            })
        if stay is not None:
            code, label = CONDITIONS.get(stay.unit, ("404684003", "Constatation clinique"))
            condition = {
                "resourceType": "Condition", "id": f"{pid}-cond-1",
                "clinicalStatus": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "code": {"coding": [{"system": SNOMED, "code": code, "display": label}], "text": label},
                "subject": _ref("Patient", pid),
                "encounter": _ref("Encounter", enc_id),
            }
            out.append(condition)
    return out


def _patient(admin: dict) -> dict:
    address = admin["address"]
    return {
        "resourceType": "Patient",
        "id": admin["patient_id"],
        "identifier": [
            {"system": "urn:dpiguard:demo:patient-id", "value": admin["patient_id"]},
            {"system": "urn:dpiguard:demo:insurance-number", "value": admin["insurance_number"]},
        ],
        "active": True,
        "name": [{"use": "official", "family": admin["family_name"], "given": [admin["given_name"]]}],
        "telecom": [{"system": "phone", "value": admin["phone"], "use": "home"}],
        "gender": "female" if admin["sex"] == "F" else "male",
        "birthDate": admin["birth_date"],
        "address": [{"use": "home", "line": [address["line"]], "city": address["city"],
                     "postalCode": address["postal_code"], "country": address["country"]}],
    }


def _observation_category(code: str, display: str) -> list[dict]:
    return [{"coding": [{"system": OBS_CATEGORY_SYSTEM, "code": code, "display": display}]}]


def _with_encounter(resource: dict, enc_id: str | None) -> dict:
    if enc_id:
        resource["encounter"] = _ref("Encounter", enc_id)
    return resource


def _lab(pid: str, enc_id: str | None, result: dict) -> dict:
    obs = {
        "resourceType": "Observation", "id": result["id"], "status": "final",
        "category": _observation_category("laboratory", "Laboratory"),
        "code": {"coding": [{"system": LOINC, "code": result["code"], "display": result["label"]}],
                 "text": result["label"]},
        "subject": _ref("Patient", pid),
        "effectiveDateTime": fhir_time(result["date"]),
        "valueQuantity": {"value": result["value"], "unit": result["unit"],
                          "system": "http://unitsofmeasure.org", "code": result["unit"]},
        "referenceRange": [{"low": {"value": result["low"], "unit": result["unit"]},
                            "high": {"value": result["high"], "unit": result["unit"]}}],
    }
    flag = "L" if result["value"] < result["low"] else "H" if result["value"] > result["high"] else ""
    if flag:
        obs["interpretation"] = [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": flag}]}]
    return _with_encounter(obs, enc_id)


def _vital(pid, enc_id, ident, code, label, unit, value, when) -> dict:
    obs = {
        "resourceType": "Observation", "id": ident, "status": "final",
        "category": _observation_category("vital-signs", "Vital Signs"),
        "code": {"coding": [{"system": LOINC, "code": code, "display": label}], "text": label},
        "subject": _ref("Patient", pid),
        "effectiveDateTime": fhir_time(when),
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    }
    return _with_encounter(obs, enc_id)


def _medication_request(pid: str, enc_id: str | None, rx: dict) -> dict:
    dosage = f"{rx['dose']}, voie {rx['route']}, {rx['frequency']}"
    return _with_encounter({
        "resourceType": "MedicationRequest", "id": rx["id"], "status": "active", "intent": "order",
        "medicationCodeableConcept": {"text": rx["drug"]},
        "subject": _ref("Patient", pid),
        "authoredOn": fhir_time(rx["date"]),
        "requester": {"display": rx["prescriber_name"]},
        "dosageInstruction": [{"text": dosage}],
    }, enc_id)


def _document_reference(pid: str, note: dict) -> dict:
    return {
        "resourceType": "DocumentReference", "id": note["id"], "status": "current",
        "type": {"coding": [{"system": LOINC, "code": "11506-3", "display": "Progress note"}]},
        "subject": _ref("Patient", pid),
        "date": fhir_time(note["date"]),
        "author": [{"display": note["author_name"]}],
        "content": [{"attachment": {"contentType": "text/plain; charset=utf-8",
                                    "data": base64.b64encode(note["text"].encode()).decode("ascii")}}],
    }


def _imaging_study(pid: str, enc_id: str | None, study: dict) -> dict:
    return _with_encounter({
        "resourceType": "ImagingStudy", "id": study["id"], "status": "available",
        "modality": [{"system": DICOM_MODALITIES, "code": study["modality"]}],
        "subject": _ref("Patient", pid),
        "started": fhir_time(study["date"]),
        "description": study["description"],
        "note": [{"text": study["report"]}],
    }, enc_id)


# --- the store ----------------------------------------------------------------------


class FhirStore:
    """Versioned in-memory resources: (type, id) -> list of versions (deleted = None)."""

    def __init__(self, resources: list[dict], now: float):
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, str], list[dict | None]] = {}
        self._counter = itertools.count(1)
        stamp = fhir_time(now)
        for resource in resources:
            resource["meta"] = {"versionId": "1", "lastUpdated": stamp}
            self._versions[(resource["resourceType"], resource["id"])] = [resource]

    def read(self, kind: str, ident: str) -> dict | None:
        with self._lock:
            versions = self._versions.get((kind, ident))
            return copy.deepcopy(versions[-1]) if versions and versions[-1] is not None else None

    def vread(self, kind: str, ident: str, version: str) -> dict | None:
        with self._lock:
            versions = self._versions.get((kind, ident)) or []
            if version.isdigit() and 1 <= int(version) <= len(versions):
                found = versions[int(version) - 1]
                return copy.deepcopy(found) if found is not None else None
            return None

    def history(self, kind: str, ident: str) -> list[dict]:
        with self._lock:
            return [copy.deepcopy(v) for v in reversed(self._versions.get((kind, ident)) or []) if v is not None]

    def all(self, kind: str) -> list[dict]:
        with self._lock:
            return [copy.deepcopy(v[-1]) for (k, _), v in sorted(self._versions.items())
                    if k == kind and v[-1] is not None]

    def new_id(self, kind: str) -> str:
        return f"{kind.lower()}-new-{next(self._counter)}"

    def put(self, resource: dict) -> tuple[dict, bool]:
        """Store a new version; (stored copy, created?)."""
        with self._lock:
            key = (resource["resourceType"], resource["id"])
            versions = self._versions.setdefault(key, [])
            created = not versions or versions[-1] is None
            resource = copy.deepcopy(resource)
            resource["meta"] = {"versionId": str(len(versions) + 1), "lastUpdated": fhir_time(_now())}
            versions.append(resource)
            return copy.deepcopy(resource), created

    def copy_from(self, other: "FhirStore") -> None:
        """Hold exactly what ``other`` holds (tests build a second world from the first)."""
        with other._lock:
            versions = copy.deepcopy(other._versions)
        with self._lock:
            self._versions = versions

    def forget(self, kind: str, ident: str) -> None:
        """Remove every version, as if the resource never existed (tests build a world without a patient)."""
        with self._lock:
            self._versions.pop((kind, ident), None)

    def keys(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._versions)

    def delete(self, kind: str, ident: str) -> bool:
        with self._lock:
            versions = self._versions.get((kind, ident))
            if not versions or versions[-1] is None:
                return False
            versions.append(None)
            return True


def _now() -> float:
    return datetime.now(tz=UTC).timestamp()


# --- search ---------------------------------------------------------------------------


def _codings(value) -> list[dict]:
    if isinstance(value, list):
        return [c for item in value for c in _codings(item)]
    if isinstance(value, dict):
        if "coding" in value:
            return list(value["coding"])
        if "system" in value or "code" in value or "value" in value:
            return [value]
    return []


def _token_matches(element, wanted: str) -> bool:
    if isinstance(element, str):
        return element == wanted
    system, sep, code = wanted.partition("|")
    if not sep:
        system, code = "", wanted
    for coding in _codings(element):
        value = coding.get("code", coding.get("value"))
        if value == code and (not system or coding.get("system") == system):
            return True
    return False


def _reference_id(value: str, target: str) -> str:
    """``P1``, ``Patient/P1`` or ``http://x/fhir/Patient/P1`` -> ``Patient/P1`` (target type given)."""
    if "/" not in value:
        return f"{target}/{value}"
    parts = value.rstrip("/").split("/")
    return f"{parts[-2]}/{parts[-1]}"


def _matches(resource: dict, name: str, values: list[str]) -> bool:
    """One search parameter (comma list = OR) against a resource."""
    kind = resource["resourceType"]
    base, _, modifier = name.partition(":")
    if base == "_id":
        return resource["id"] in values
    if base in REFERENCE_PARAMS[kind]:
        element = resource.get(REFERENCE_PARAMS[kind][base]) or {}
        target = modifier or ("Patient" if base in ("patient", "subject") else "Encounter")
        wanted = {_reference_id(v, target) for v in values}
        return element.get("reference") in wanted
    if base in TOKEN_PARAMS[kind]:
        element = resource.get(TOKEN_PARAMS[kind][base])
        return element is not None and any(_token_matches(element, v) for v in values)
    if kind == "Patient" and base in ("name", "family"):
        names = resource.get("name") or []
        texts = [n.get("family", "") for n in names]
        if base == "name":
            texts += [g for n in names for g in n.get("given", [])]
        return any(t.lower().startswith(v.lower()) for t in texts for v in values)
    if kind == "Patient" and base == "birthdate":
        return resource.get("birthDate") in values
    raise FhirError(400, "not-supported", f"unsupported search parameter {name!r} for {kind}")


def _supported(kind: str, name: str) -> bool:
    """Whether :func:`_matches` reads ``name`` on ``kind`` (checked before any resource is looked at, as
    real servers do: an unsupported parameter is refused whatever the server holds)."""
    base = name.partition(":")[0]
    return (base == "_id" or base in REFERENCE_PARAMS[kind] or base in TOKEN_PARAMS[kind]
            or (kind == "Patient" and base in ("name", "family", "birthdate")))


class FhirApi:
    def __init__(self, store: FhirStore):
        self.store = store

    # -- helpers --
    def base(self) -> str:
        return request.host_url.rstrip("/") + "/fhir"

    def entry(self, resource: dict, mode: str | None = None) -> dict:
        entry = {"fullUrl": f"{self.base()}/{resource['resourceType']}/{resource['id']}", "resource": resource}
        if mode:
            entry["search"] = {"mode": mode}
        return entry

    def check_type(self, kind: str) -> None:
        if kind not in TYPES:
            raise FhirError(404, "not-supported", f"resource type {kind!r} is not served here")

    # -- search --
    def search(self, kind: str, params: list[tuple[str, str]], path: str) -> dict:
        self.check_type(kind)
        count, offset = DEFAULT_COUNT, 0
        includes: list[str] = []
        revincludes: list[str] = []
        filters: list[tuple[str, list[str]]] = []
        for name, value in params:
            if name == "_count":
                count = self._int(name, value, 1, MAX_COUNT)
            elif name == "_offset":
                offset = self._int(name, value, 0, 10**6)
            elif name == "_include":
                includes.append(value)
            elif name == "_revinclude":
                revincludes.append(value)
            elif name in ("_format", "_pretty", "_total"):
                continue
            else:
                filters.append((name, value.split(",")))
        for name, _ in filters:
            if not _supported(kind, name):
                raise FhirError(400, "not-supported", f"unsupported search parameter {name!r} for {kind}")
        matches = [r for r in self.store.all(kind) if all(_matches(r, n, v) for n, v in filters)]
        page = matches[offset:offset + count]
        entries = [self.entry(r, "match") for r in page]
        seen = {(r["resourceType"], r["id"]) for r in page}
        for extra in self._included(page, includes) + self._revincluded(page, revincludes):
            key = (extra["resourceType"], extra["id"])
            if key not in seen:
                seen.add(key)
                entries.append(self.entry(extra, "include"))
        kept = [(n, v) for n, v in params if n != "_offset"]

        def link(relation: str, at: int) -> dict:
            query = urlencode(kept + ([("_offset", str(at))] if at else []))
            return {"relation": relation, "url": f"{self.base()}{path}" + (f"?{query}" if query else "")}

        links = [link("self", offset)]
        if offset + count < len(matches):
            links.append(link("next", offset + count))
        if offset > 0:
            links.append(link("previous", max(0, offset - count)))
        return {"resourceType": "Bundle", "type": "searchset", "total": len(matches), "link": links,
                "entry": entries}

    @staticmethod
    def _int(name: str, value: str, low: int, high: int) -> int:
        if not value.isdigit() or not low <= int(value) <= high:
            raise FhirError(400, "invalid", f"{name} must be a whole number between {low} and {high}")
        return int(value)

    def _included(self, page: list[dict], includes: list[str]) -> list[dict]:
        out = []
        for spec in includes:
            source, _, param = spec.partition(":")
            param = param.split(":")[0]
            if source not in TYPES or param not in REFERENCE_PARAMS[source]:
                raise FhirError(400, "not-supported", f"unsupported _include {spec!r}")
            element = REFERENCE_PARAMS[source][param]
            for resource in page:
                if resource["resourceType"] != source:
                    continue
                reference = (resource.get(element) or {}).get("reference", "")
                kind, _, ident = reference.partition("/")
                found = self.store.read(kind, ident) if kind in TYPES else None
                if found:
                    out.append(found)
        return out

    def _revincluded(self, page: list[dict], revincludes: list[str]) -> list[dict]:
        out = []
        for spec in revincludes:
            source, _, param = spec.partition(":")
            if source not in TYPES or param not in REFERENCE_PARAMS[source]:
                raise FhirError(400, "not-supported", f"unsupported _revinclude {spec!r}")
            element = REFERENCE_PARAMS[source][param]
            targets = {f"{r['resourceType']}/{r['id']}" for r in page}
            out.extend(r for r in self.store.all(source) if (r.get(element) or {}).get("reference") in targets)
        return out

    def everything(self, pid: str) -> dict:
        patient = self.store.read("Patient", pid)
        if patient is None:
            raise FhirError(404, "not-found", f"unknown patient {pid}")
        entries = [self.entry(patient, "match")]
        target = f"Patient/{pid}"
        for kind in TYPES[1:]:
            element_names = set(REFERENCE_PARAMS[kind].values()) & {"subject", "patient"}
            for resource in self.store.all(kind):
                if any((resource.get(e) or {}).get("reference") == target for e in element_names):
                    entries.append(self.entry(resource, "match"))
        return {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
                "link": [{"relation": "self", "url": f"{self.base()}/Patient/{pid}/$everything"}],
                "entry": entries}

    # -- writes --
    def validate_body(self, resource, kind: str | None = None, ident: str | None = None) -> dict:
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise FhirError(400, "structure", "expected a FHIR resource (JSON object with resourceType)")
        if kind is not None and resource["resourceType"] != kind:
            raise FhirError(400, "invalid", f"resourceType {resource['resourceType']!r} does not match {kind}")
        self.check_type(resource["resourceType"])
        if ident is not None and resource.get("id") not in (None, ident):
            raise FhirError(400, "invalid", "the id in the body does not match the URL")
        return resource

    def create(self, resource: dict) -> dict:
        resource = dict(resource, id=self.store.new_id(resource["resourceType"]))
        stored, _ = self.store.put(resource)
        return stored

    def update(self, kind: str, ident: str, resource: dict) -> tuple[dict, bool]:
        return self.store.put(dict(resource, id=ident))

    # -- bundles --
    def process_bundle(self, bundle) -> dict:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise FhirError(400, "structure", "expected a Bundle")
        kind = bundle.get("type")
        if kind not in ("transaction", "batch"):
            raise FhirError(400, "invalid", "only transaction and batch Bundles can be posted to the base")
        entries = bundle.get("entry") or []
        if kind == "transaction":
            for entry in entries:  # validate everything first: all or nothing
                self._prepare(entry)
        results = []
        local_ids: dict[str, str] = {}
        for entry in entries:
            try:
                results.append(self._apply(entry, local_ids))
            except FhirError as exc:
                if kind == "transaction":
                    raise
                results.append({"response": {"status": str(exc.status), "outcome": {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": exc.code, "diagnostics": exc.diagnostics}]}}})
        return {"resourceType": "Bundle", "type": f"{kind}-response", "entry": results}

    def _prepare(self, entry) -> tuple[str, str, str | None, str]:
        req = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(req, dict) or req.get("method") not in ("GET", "POST", "PUT", "DELETE"):
            raise FhirError(400, "structure", "every entry needs request.method (GET, POST, PUT, DELETE) and url")
        url = str(req.get("url", ""))
        path, _, query = url.partition("?")
        parts = [p for p in path.split("/") if p]
        if not parts or parts[0] not in TYPES:
            raise FhirError(400, "not-supported", f"unsupported entry url {url!r}")
        method = req["method"]
        ident = parts[1] if len(parts) > 1 else None
        if method in ("POST", "PUT"):
            self.validate_body(entry.get("resource"), parts[0], ident)
        if method in ("PUT", "DELETE") and ident is None:
            raise FhirError(400, "invalid", f"{method} needs Type/id")
        return method, parts[0], ident, query

    def _apply(self, entry: dict, local_ids: dict[str, str]) -> dict:
        method, kind, ident, query = self._prepare(entry)
        if method == "GET":
            if ident is not None:
                found = self.store.read(kind, ident)
                if found is None:
                    raise FhirError(404, "not-found", f"{kind}/{ident} not found")
                return {"resource": found, "response": {"status": "200"}}
            params = [tuple(p.split("=", 1)) if "=" in p else (p, "") for p in query.split("&") if p]
            return {"resource": self.search(kind, params, f"/{kind}"), "response": {"status": "200"}}
        wanted = (entry.get("request") or {}).get("ifMatch")
        if method in ("PUT", "DELETE") and wanted is not None:
            version = (self.store.read(kind, ident) or {}).get("meta", {}).get("versionId")
            if version is None or wanted not in (f'W/"{version}"', f'"{version}"'):
                raise FhirError(412, "conflict", f"{kind}/{ident} changed (ifMatch)")
        if method == "DELETE":
            self.store.delete(kind, ident)
            return {"response": {"status": "204"}}
        resource = _resolve_local(copy.deepcopy(entry["resource"]), local_ids)
        if method == "POST":
            stored = self.create(resource)
            if entry.get("fullUrl", "").startswith("urn:uuid:"):
                local_ids[entry["fullUrl"]] = f"{kind}/{stored['id']}"
            status = "201"
        else:
            stored, created = self.update(kind, ident, resource)
            status = "201" if created else "200"
        return {"fullUrl": f"{self.base()}/{kind}/{stored['id']}", "resource": stored,
                "response": {"status": status, "location": f"{kind}/{stored['id']}/_history/"
                                                           f"{stored['meta']['versionId']}"}}


def _resolve_local(value, local_ids: dict[str, str]):
    if isinstance(value, dict):
        return {k: (local_ids.get(v, v) if k == "reference" and isinstance(v, str) else _resolve_local(v, local_ids))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_local(v, local_ids) for v in value]
    return value


def _send(payload: dict, status: int = 200, headers: dict | None = None) -> Response:
    response = Response(orjson.dumps(payload), status=status, mimetype=FHIR_JSON)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _if_match(current: dict | None) -> None:
    """Writes conditional on the version (``If-Match: W/"3"``): 412 when it is not the current one."""
    wanted = request.headers.get("If-Match")
    if wanted is None:
        return
    version = (current or {}).get("meta", {}).get("versionId")
    if version is None or wanted.strip() not in (f'W/"{version}"', f'"{version}"'):
        raise FhirError(412, "conflict", "the resource changed (If-Match)")


def _query_pairs() -> list[tuple[str, str]]:
    return list(request.args.items(multi=True))


def _body():
    try:
        return orjson.loads(request.get_data() or b"null")
    except orjson.JSONDecodeError:
        raise FhirError(400, "structure", "the body is not valid JSON") from None


def register_fhir(app: Flask, dataset: Dataset) -> FhirStore:
    """Add the /fhir routes to the demo app; returns the store (tests look into it)."""
    store = FhirStore(build_resources(dataset), dataset.now)
    api = FhirApi(store)
    app.extensions["dpiguard_demo_fhir"] = store

    @app.errorhandler(FhirError)
    def fhir_error(exc: FhirError):
        return outcome(exc.status, exc.code, exc.diagnostics)

    @app.get("/fhir/metadata")
    def fhir_metadata():
        return _send({
            "resourceType": "CapabilityStatement", "status": "active", "date": fhir_time(dataset.now),
            "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"],
            "rest": [{"mode": "server", "resource": [
                {"type": t, "interaction": [{"code": c} for c in
                                            ("read", "vread", "history-instance", "search-type", "create",
                                             "update", "delete")]}
                for t in TYPES]}],
        })

    @app.post("/fhir")
    def fhir_bundle():
        return _send(api.process_bundle(_body()))

    @app.get("/fhir/<kind>")
    def fhir_search(kind: str):
        return _send(api.search(kind, _query_pairs(), f"/{kind}"))

    @app.post("/fhir/<kind>")
    def fhir_create(kind: str):
        api.check_type(kind)
        stored = api.create(api.validate_body(_body(), kind))
        return _send(stored, 201, {"Location": f"{api.base()}/{kind}/{stored['id']}/_history/1"})

    @app.get("/fhir/<kind>/<ident>")
    def fhir_read(kind: str, ident: str):
        api.check_type(kind)
        found = store.read(kind, ident)
        if found is None:
            raise FhirError(404, "not-found", f"{kind}/{ident} not found")
        return _send(found)

    @app.put("/fhir/<kind>/<ident>")
    def fhir_update(kind: str, ident: str):
        api.check_type(kind)
        _if_match(store.read(kind, ident))
        stored, created = api.update(kind, ident, api.validate_body(_body(), kind, ident))
        return _send(stored, 201 if created else 200)

    @app.patch("/fhir/<kind>/<ident>")
    def fhir_patch(kind: str, ident: str):
        """JSON Patch (RFC 6902) on the current version."""
        api.check_type(kind)
        found = store.read(kind, ident)
        if found is None:
            raise FhirError(404, "not-found", f"{kind}/{ident} not found")
        _if_match(found)
        if request.mimetype != "application/json-patch+json":
            raise FhirError(415, "not-supported", "only JSON Patch (application/json-patch+json) is supported")
        try:
            patched = jsonpatch.JsonPatch(_body()).apply(found)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as exc:
            raise FhirError(422, "processing", f"the patch does not apply: {exc}") from None
        stored, _ = api.update(kind, ident, api.validate_body(patched, kind, ident))
        return _send(stored)

    @app.delete("/fhir/<kind>/<ident>")
    def fhir_delete(kind: str, ident: str):
        api.check_type(kind)
        _if_match(store.read(kind, ident))
        if not store.delete(kind, ident):
            raise FhirError(404, "not-found", f"{kind}/{ident} not found")
        return Response(status=204)

    @app.get("/fhir/<kind>/<ident>/_history")
    def fhir_history(kind: str, ident: str):
        api.check_type(kind)
        versions = store.history(kind, ident)
        if not versions:
            raise FhirError(404, "not-found", f"{kind}/{ident} not found")
        return _send({"resourceType": "Bundle", "type": "history", "total": len(versions),
                      "entry": [dict(api.entry(v), request={"method": "PUT", "url": f"{kind}/{ident}"},
                                     response={"status": "200"}) for v in versions]})

    @app.get("/fhir/<kind>/<ident>/_history/<version>")
    def fhir_vread(kind: str, ident: str, version: str):
        api.check_type(kind)
        found = store.vread(kind, ident, version)
        if found is None:
            raise FhirError(404, "not-found", f"{kind}/{ident} version {version} not found")
        return _send(found)

    @app.get("/fhir/Patient/<pid>/$everything")
    def fhir_everything(pid: str):
        return _send(api.everything(pid))

    @app.get("/fhir/Patient/<pid>/<kind>")
    def fhir_compartment_search(pid: str, kind: str):
        if kind not in TYPES or kind == "Patient":
            raise FhirError(404, "not-supported", f"no {kind} in the Patient compartment here")
        param = "patient" if "patient" in REFERENCE_PARAMS[kind] else "subject"
        return _send(api.search(kind, _query_pairs() + [(param, f"Patient/{pid}")], f"/Patient/{pid}/{kind}"))

    return store
