"""The FHIR R4 Patient compartment, and what a FHIR request asks for.

``PATIENT_COMPARTMENT`` is the table of the official R4 (4.0.1) CompartmentDefinition ``patient``:
for each resource type, the search parameters that link a resource to the patient. Types mapped to
``()`` exist in R4 but are never in the Patient compartment.

:func:`analyze` reads a request under the FHIR base path (method, path segments, decoded query) and
returns a :class:`FhirRequest`: the interaction, the resource type, the patients the request names
(every one must pass the care-team check), whether a search is scoped to those patients, and the
``_include``/``_revinclude`` asked for. Anything it cannot read with certainty is a
:class:`FhirRefusal` (fail closed): unknown control parameters, ``_has``, ``_filter``, chains outside
the compartment, conditional writes, operations that are not allowed...
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from dpiguard.fhir.searchparams import MODIFIERS, SearchParam, search_param

# R4 4.0.1 CompartmentDefinition/patient: resource type -> params linking it to the patient.
PATIENT_COMPARTMENT: dict[str, tuple[str, ...]] = {
    "Account": ("subject",),
    "AdverseEvent": ("subject",),
    "AllergyIntolerance": ("patient", "recorder", "asserter"),
    "Appointment": ("actor",),
    "AppointmentResponse": ("actor",),
    "AuditEvent": ("patient",),
    "Basic": ("patient", "author"),
    "BodyStructure": ("patient",),
    "CarePlan": ("patient", "performer"),
    "CareTeam": ("patient", "participant"),
    "ChargeItem": ("subject",),
    "Claim": ("patient", "payee"),
    "ClaimResponse": ("patient",),
    "ClinicalImpression": ("subject",),
    "Communication": ("subject", "sender", "recipient"),
    "CommunicationRequest": ("subject", "sender", "recipient", "requester"),
    "Composition": ("subject", "author", "attester"),
    "Condition": ("patient", "asserter"),
    "Consent": ("patient",),
    "Coverage": ("policy-holder", "subscriber", "beneficiary", "payor"),
    "CoverageEligibilityRequest": ("patient",),
    "CoverageEligibilityResponse": ("patient",),
    "DetectedIssue": ("patient",),
    "DeviceRequest": ("subject", "performer"),
    "DeviceUseStatement": ("subject",),
    "DiagnosticReport": ("subject",),
    "DocumentManifest": ("subject", "author", "recipient"),
    "DocumentReference": ("subject", "author"),
    "Encounter": ("patient",),
    "EnrollmentRequest": ("subject",),
    "EpisodeOfCare": ("patient",),
    "ExplanationOfBenefit": ("patient", "payee"),
    "FamilyMemberHistory": ("patient",),
    "Flag": ("patient",),
    "Goal": ("patient",),
    "Group": ("member",),
    "ImagingStudy": ("patient",),
    "Immunization": ("patient",),
    "ImmunizationEvaluation": ("patient",),
    "ImmunizationRecommendation": ("patient",),
    "Invoice": ("subject", "patient", "recipient"),
    "List": ("subject", "source"),
    "MeasureReport": ("patient",),
    "Media": ("subject",),
    "MedicationAdministration": ("patient", "performer", "subject"),
    "MedicationDispense": ("subject", "patient", "receiver"),
    "MedicationRequest": ("subject",),
    "MedicationStatement": ("subject",),
    "MolecularSequence": ("patient",),
    "NutritionOrder": ("patient",),
    "Observation": ("subject", "performer"),
    "Patient": ("link",),
    "Person": ("patient",),
    "Procedure": ("patient", "performer"),
    "Provenance": ("patient",),
    "QuestionnaireResponse": ("subject", "author"),
    "RelatedPerson": ("patient",),
    "RequestGroup": ("subject", "participant"),
    "ResearchSubject": ("individual",),
    "RiskAssessment": ("subject",),
    "Schedule": ("actor",),
    "ServiceRequest": ("subject", "performer"),
    "Specimen": ("subject",),
    "SupplyDelivery": ("patient",),
    "SupplyRequest": ("subject",),
    "VisionPrescription": ("patient",),
}
_NEVER_IN_COMPARTMENT = (
    "ActivityDefinition", "Binary", "BiologicallyDerivedProduct", "Bundle", "CapabilityStatement",
    "CatalogEntry", "ChargeItemDefinition", "CodeSystem", "CompartmentDefinition", "ConceptMap", "Contract",
    "Device", "DeviceDefinition", "DeviceMetric", "EffectEvidenceSynthesis", "Endpoint", "EnrollmentResponse",
    "EventDefinition", "Evidence", "EvidenceVariable", "ExampleScenario", "GraphDefinition",
    "GuidanceResponse", "HealthcareService", "ImplementationGuide", "InsurancePlan", "Library", "Linkage",
    "Location", "Measure", "Medication", "MedicationKnowledge", "MedicinalProduct",
    "MedicinalProductAuthorization", "MedicinalProductContraindication", "MedicinalProductIndication",
    "MedicinalProductIngredient", "MedicinalProductInteraction", "MedicinalProductManufactured",
    "MedicinalProductPackaged", "MedicinalProductPharmaceutical", "MedicinalProductUndesirableEffect",
    "MessageDefinition", "MessageHeader", "NamingSystem", "ObservationDefinition", "OperationDefinition",
    "OperationOutcome", "Organization", "OrganizationAffiliation", "PaymentNotice", "PaymentReconciliation",
    "PlanDefinition", "Practitioner", "PractitionerRole", "Questionnaire", "ResearchDefinition",
    "ResearchElementDefinition", "ResearchStudy", "RiskEvidenceSynthesis", "SearchParameter", "Slot",
    "SpecimenDefinition", "StructureDefinition", "StructureMap", "Subscription", "Substance",
    "SubstanceNucleicAcid", "SubstancePolymer", "SubstanceProtein", "SubstanceReferenceInformation",
    "SubstanceSourceMaterial", "SubstanceSpecification", "Task", "TerminologyCapabilities", "TestReport",
    "TestScript", "ValueSet", "VerificationResult",
)
R4_TYPES = frozenset(PATIENT_COMPARTMENT) | frozenset(_NEVER_IN_COMPARTMENT)

# Search parameters that name the patient on most types even when the compartment lists ``subject``.
PATIENT_PARAMS = frozenset({"patient", "subject"})
PATIENT_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
FHIR_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")

# Result parameters, read by dpiguard itself (``_count`` and ``_total`` are never forwarded as sent).
CONTROL_PARAMS = frozenset({"_count", "_sort", "_total", "_pretty", "_format", "_summary", "_include",
                            "_revinclude"})
# Paging state dpiguard did not issue (servers' offsets and page tokens): paging is dpiguard's.
PAGING_PARAMS = frozenset({"_offset", "_getpages", "_getpagesoffset", "_pageId", "_page", "page", "_cursor",
                           "_page_token", "_pageToken", "_bundletype", "_skip"})
MAX_PAGE = 500
# Refused unless policies/fhir.yaml allows them (allow_parameters): they probe or reshape results.
PROBING_CONTROLS = frozenset({"_has", "_filter", "_query", "_contained", "_containedType", "_elements",
                              "_list", "_type", "_getpages"})
JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json"})


class FhirRefusal(Exception):
    """The request is refused before anything is forwarded."""

    def __init__(self, reason: str, message: str, status: int = 403, issue: str = "forbidden"):
        self.reason, self.message, self.status, self.issue = reason, message, status, issue
        super().__init__(message)


def forbidden_param(name: str, why: str) -> FhirRefusal:
    return FhirRefusal("fhir_forbidden_parameter", f"search parameter {name!r} is not allowed: {why}",
                       403, "forbidden")


def invalid(message: str) -> FhirRefusal:
    return FhirRefusal("fhir_invalid_request", message, 400, "invalid")


def not_supported(message: str) -> FhirRefusal:
    return FhirRefusal("fhir_not_supported", message, 403, "not-supported")


@dataclass
class FhirRequest:
    """What a FHIR request is about, as far as the request alone tells."""

    interaction: str  # read vread history search create update patch delete bundle operation capabilities
    resource_type: str | None
    resource_id: str | None = None
    patients: list[str] = field(default_factory=list)  # every one must pass
    scoped: bool = False  # a search whose matches are limited to `patients`
    includes: list[str] = field(default_factory=list)
    revincludes: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)  # search parameter names (base names)
    action: str = "read"
    needs_body: bool = False
    needs_stored: bool = False  # update/patch/delete: the stored resource's patients must pass too
    count: int | None = None  # the page size the client asked for (_count)
    post_search: bool = False  # POST Type/_search: the parameters are also in the body (a form)
    filtered_search: bool = False  # unscoped search answered with a filtered Bundle

    def add_patient(self, patient: str) -> None:
        if patient not in self.patients:
            self.patients.append(patient)


def patient_of_reference(value: str, *, bare_is_patient: bool) -> str | None | bool:
    """The patient id a reference value names; None if it names no patient; False if unreadable.

    Accepted: ``P1`` (when ``bare_is_patient``), ``Patient/P1``, ``Patient/P1/_history/2``,
    ``http(s)://host/base/Patient/P1``.
    """
    value = value.strip()
    if not value or "?" in value or value.startswith("urn:"):
        return False  # conditional or Bundle-local references name no patient dpiguard can check
    parts = value.split("/")
    if len(parts) == 1:
        if not bare_is_patient:
            return None
        return value if PATIENT_ID_RE.match(value) else False
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    kind, ident = parts[-2], parts[-1]
    if kind != "Patient":
        if TYPE_RE.match(kind) and FHIR_ID_RE.match(ident):
            return None
        return False
    return ident if PATIENT_ID_RE.match(ident) else False


def _split_name(name: str) -> tuple[str, str | None, str | None]:
    """``subject:Patient.name`` -> ('subject', 'Patient', 'name')."""
    head, dot, chain = name.partition(".")
    base, colon, modifier = head.partition(":")
    return base, (modifier if colon else None), (chain if dot else None)


def analyze(method: str, segments: list[str], query: Mapping[str, list[str]], *, types: Iterable[str],
            allowed_params: frozenset[str] = frozenset(), operations: frozenset[str] = frozenset()) -> FhirRequest:
    """Analyze a request under the FHIR base path. ``segments``: the path after the base, split."""
    known = frozenset(types)
    if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        raise not_supported(f"{method[:16]} is not supported on the FHIR API")

    def check_type(kind: str) -> str:
        if not TYPE_RE.match(kind) or kind not in R4_TYPES:
            raise not_supported(f"{kind[:64]!r} is not a FHIR R4 resource type")
        if kind not in known:
            raise FhirRefusal("fhir_type_not_mapped", f"resource type {kind} is not open through dpiguard "
                                                      "(policies/fhir.yaml)")
        return kind

    def check_id(ident: str) -> str:
        if not FHIR_ID_RE.match(ident):
            raise invalid("malformed resource id")
        return ident

    for segment in segments:
        if segment.startswith("$") and segment not in operations:
            raise FhirRefusal("fhir_operation_not_allowed", f"operation {segment[:64]} is not allowed", 403,
                              "forbidden")
    n = len(segments)
    if n == 0:
        if method == "POST":
            if query:
                raise invalid("a transaction or batch takes no query parameters")
            return FhirRequest("bundle", None, action="write", needs_body=True)
        raise not_supported("system-wide searches are not allowed; search one resource type")
    if segments == ["metadata"]:
        if method != "GET":
            raise not_supported("metadata is read-only")
        _no_query(query, "metadata")
        return FhirRequest("capabilities", "CapabilityStatement")
    if segments[0].startswith("_"):
        raise not_supported(f"{segments[0][:32]} at the system level is not allowed")
    kind = check_type(segments[0])

    if n == 1:
        if method == "GET":
            req = FhirRequest("search", kind)
            _search_params(req, query, allowed_params, known)
            return req
        if method == "POST":
            _no_query(query, "create")
            return FhirRequest("create", kind, action="write", needs_body=True)
        if method in ("PUT", "DELETE", "PATCH"):
            raise not_supported("conditional update, patch and delete are not allowed through dpiguard")
        raise not_supported(f"{method} is not supported on a resource type")
    if n == 2 and segments[1] == "_search":
        if method != "POST":
            raise not_supported("search with GET on the type (Type?...), or POST Type/_search with a form")
        req = FhirRequest("search", kind, needs_body=True, post_search=True)
        _search_params(req, query, allowed_params, known)  # the URL's parameters now, the form's with the body
        return req
    if n == 2 and segments[1] == "_history":
        # Type-level history lists deleted resources by id, whoever their patient: not open.
        raise not_supported("the history of a whole resource type is not open through dpiguard")
    ident = check_id(segments[1])
    if n == 2:
        if method == "GET":
            _no_query(query, "read", allow=("_format", "_pretty", "_summary"))
            req = FhirRequest("read", kind, ident)
        elif method in ("PUT", "PATCH"):
            _no_query(query, "update")
            req = FhirRequest("update" if method == "PUT" else "patch", kind, ident, action="write",
                              needs_body=True, needs_stored=True)
        elif method == "DELETE":
            _no_query(query, "delete")
            req = FhirRequest("delete", kind, ident, action="write", needs_stored=True)
        else:
            raise not_supported(f"{method} is not supported on a resource")
        if kind == "Patient":
            patient = patient_of_reference(ident, bare_is_patient=True)
            if not patient:
                raise invalid("malformed patient id")
            req.add_patient(patient)
        _check_format(query)
        return req
    if segments[2] == "_history":
        if method != "GET":
            raise not_supported("history is read-only")
        _no_query(query, "history")
        if n == 3:
            req = FhirRequest("history", kind, ident)
        elif n == 4:
            req = FhirRequest("vread", kind, ident)
            check_id(segments[3])
        else:
            raise not_supported("unknown history form")
        if kind == "Patient":
            req.add_patient(ident)
        return req
    if kind == "Patient" and n == 3 and segments[2] == "$everything":
        if method != "GET":
            raise not_supported("$everything is read with GET")
        _no_query(query, "$everything", allow=("_format", "_pretty", "_count"))
        if "_count" in query:
            _control(FhirRequest("operation", "Patient"), "_count", query["_count"], known, allowed_params)
        patient = patient_of_reference(ident, bare_is_patient=True)
        if not patient:
            raise invalid("malformed patient id")
        req = FhirRequest("operation", "Patient", ident, scoped=True)
        req.add_patient(patient)
        if "_count" in query:
            req.count = int(query["_count"][0])
        return req
    if kind == "Patient" and n == 3 and not segments[2].startswith("$"):
        # Compartment search: GET /Patient/P/Observation?...
        if method != "GET":
            raise not_supported("compartment searches are read-only")
        patient = patient_of_reference(ident, bare_is_patient=True)
        if not patient:
            raise invalid("malformed patient id")
        req = FhirRequest("search", check_type(segments[2]))
        _search_params(req, query, allowed_params, known)
        req.add_patient(patient)
        req.scoped = True
        return req
    raise not_supported("this FHIR interaction is not open through dpiguard")


def _no_query(query: Mapping[str, list[str]], what: str, allow: tuple[str, ...] = ("_format", "_pretty")) -> None:
    for name in query:
        if name not in allow:
            raise invalid(f"parameter {name[:64]!r} is not accepted on {what}")
    _check_format(query)


def _check_format(query: Mapping[str, list[str]]) -> None:
    for value in query.get("_format", []):
        if value.strip().lower() not in JSON_FORMATS:
            raise not_supported("only JSON is served through dpiguard (_format)")
    for value in query.get("_summary", []):
        if value != "false":
            raise forbidden_param("_summary", "summaries can drop the elements dpiguard checks")


def _search_params(req: FhirRequest, query: Mapping[str, list[str]], allowed: frozenset[str],
                   known_types: frozenset[str] = frozenset()) -> None:
    """Default-deny reading of a search: every parameter, modifier and chain must be known for the type
    (:mod:`dpiguard.fhir.searchparams`) and understood, else :class:`FhirRefusal`."""
    kind = req.resource_type
    links = set(PATIENT_COMPARTMENT.get(kind, ())) | (PATIENT_PARAMS if kind in PATIENT_COMPARTMENT else set())
    _check_format(query)
    scoped_by: list[str] = []
    for name, values in query.items():
        if name.startswith("_has:") or name == "_has":
            if "_has" not in allowed:
                raise forbidden_param("_has", "it can probe patients outside your care team")
            req.params.append("_has")
            continue
        base, modifier, chain = _split_name(name)
        if base not in req.params:
            req.params.append(base)
        if base in CONTROL_PARAMS:
            if modifier is not None or chain is not None:
                raise forbidden_param(name, "result parameters take no modifier")
            _control(req, base, values, known_types, allowed)
            continue
        if base in PAGING_PARAMS:
            raise forbidden_param(name, "paging is done by dpiguard: follow the next/previous links it gives")
        if base in PROBING_CONTROLS:
            if base in allowed and modifier is None and chain is None:
                continue
            raise forbidden_param(name, "it can probe patients outside your care team")
        param = search_param(kind, base)
        if param is None:
            raise forbidden_param(name, f"not a search parameter of {kind} that dpiguard knows")
        if chain is not None:
            _chain(req, param, name, modifier, chain, values, allowed)
            continue
        if param.kind == "reference":
            if _reference_param(req, param, name, modifier, values) and base in links:
                scoped_by.append(name)
            continue
        if modifier is not None:
            if base == "_id":
                raise forbidden_param(name, "modifiers on _id are not allowed")
            if modifier not in MODIFIERS[param.kind]:
                raise forbidden_param(name, f"modifier :{modifier[:32]} is not understood on a {param.kind} "
                                            "parameter")
            if modifier == "missing":
                _missing_values(name, values)
                continue
        if base == "_id" and kind == "Patient":
            for value in values:
                for item in value.split(","):
                    patient = patient_of_reference(item, bare_is_patient=True)
                    if not patient:
                        raise invalid("malformed patient id in _id")
                    req.add_patient(patient)
            scoped_by.append(name)
            continue
        # A value that names a patient (token or string holding Patient/P2...) must pass too.
        for value in values:
            for item in value.split(","):
                if "/" in item:
                    patient = patient_of_reference(item, bare_is_patient=False)
                    if patient:
                        req.add_patient(patient)
    req.scoped = bool(scoped_by)


def _missing_values(name: str, values: list[str]) -> None:
    if any(v not in ("true", "false") for v in values):
        raise invalid(f"{name[:64]} takes true or false")


def _reference_param(req: FhirRequest, param: SearchParam, name: str, modifier: str | None,
                     values: list[str]) -> bool:
    """Check a reference parameter; True if every value names a patient (the search is then scoped)."""
    if modifier == "missing":
        _missing_values(name, values)
        return False
    if modifier == "identifier":
        if param.can_target("Patient"):
            raise forbidden_param(name, "name the patient by its id (patient=Patient/...), not by an identifier")
        return False
    if modifier is not None:
        if not TYPE_RE.match(modifier) or modifier not in R4_TYPES:
            raise forbidden_param(name, f"modifier :{modifier[:32]} is not understood on a reference")
        if not param.can_target(modifier):
            raise invalid(f"{name[:64]}: {param.name} never points at {modifier}")
        if modifier == "Group":
            raise forbidden_param(name, "Group references cannot be checked patient by patient")
    all_patients = True
    for value in values:
        items = value.split(",")
        for item in items:
            item = item.strip()
            if modifier is not None:
                if "/" in item or not FHIR_ID_RE.match(item):
                    raise invalid(f"malformed id in {name[:64]!r}")
                target, patient = modifier, (item if modifier == "Patient" else None)
            else:
                target, patient = _reference_target(item, param, name)
            if target == "Group":
                raise forbidden_param(name, "Group references cannot be checked patient by patient")
            if patient is not None:
                if not PATIENT_ID_RE.match(patient):
                    raise invalid(f"malformed patient id in {name[:64]!r}")
                req.add_patient(patient)
            else:
                all_patients = False
    return all_patients


def _reference_target(item: str, param: SearchParam, name: str) -> tuple[str | None, str | None]:
    """(target type, patient id or None) of one reference value of a search."""
    if not item or "?" in item or "#" in item:
        raise invalid(f"malformed reference in {name[:64]!r}")
    parts = item.split("/")
    if len(parts) == 1:
        if not FHIR_ID_RE.match(item):
            raise invalid(f"malformed reference in {name[:64]!r}")
        # A bare id: a patient whenever the parameter may point at one (it must pass).
        return ("Patient", item) if param.can_target("Patient") else (None, None)
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    target, ident = parts[-2], parts[-1]
    if not TYPE_RE.match(target) or target not in R4_TYPES or not FHIR_ID_RE.match(ident):
        raise invalid(f"malformed reference in {name[:64]!r}")
    if len(parts) > 2 and not (parts[0] in ("http:", "https:") and parts[1] == ""):
        raise invalid(f"malformed reference in {name[:64]!r}")
    if not param.can_target(target):
        raise invalid(f"{name[:64]}: {param.name} never points at {target}")
    return target, (ident if target == "Patient" else None)


def _chain(req: FhirRequest, param: SearchParam, name: str, modifier: str | None, chain: str,
           values: list[str], allowed: frozenset[str]) -> None:
    """``encounter.status=...``: refused unless allowed in fhir.yaml; never through a patient reference."""
    if param.kind != "reference":
        raise forbidden_param(name, "only reference parameters can be chained")
    if param.can_target("Patient") and modifier in (None, "Patient"):
        raise forbidden_param(name, "a chain through the patient selects patients by their data: name the "
                                    "patient by its id (patient=Patient/...)")
    if f"{param.name}." not in allowed and name not in allowed:
        raise forbidden_param(name, "chained parameters can probe other patients")
    if modifier is not None:
        if modifier not in R4_TYPES or not param.can_target(modifier):
            raise invalid(f"{name[:64]}: {param.name} never points at {modifier[:32]}")
        target = modifier
    elif len(param.targets) == 1 and "*" not in param.targets:
        (target,) = param.targets
    else:
        raise forbidden_param(name, "say the type of the chained resource (param:Type.name)")
    if "." in chain or ":" in chain:
        raise forbidden_param(name, "chains of more than one step, or with modifiers, are not allowed")
    chained = search_param(target, chain)
    if chained is None:
        raise forbidden_param(name, f"{chain[:32]!r} is not a search parameter of {target} that dpiguard knows")
    if chained.kind == "reference":  # encounter.subject=P2: P2 must pass like any patient named
        _reference_param(req, chained, name, None, values)


def _control(req: FhirRequest, base: str, values: list[str], known_types: frozenset[str],
             allowed: frozenset[str]) -> None:
    kind = req.resource_type
    if base in ("_format", "_summary"):
        return  # _check_format
    if base == "_pretty":
        if any(v not in ("true", "false") for v in values):
            raise invalid("_pretty takes true or false")
        return
    if base == "_total":
        if any(v not in ("none", "estimate", "accurate") for v in values):
            raise invalid("_total takes none, estimate or accurate")
        return  # dpiguard counts itself; not forwarded
    if base == "_count":
        if len(values) != 1 or not values[0].isdigit() or not 1 <= int(values[0]) <= MAX_PAGE:
            raise invalid(f"_count must be a whole number between 1 and {MAX_PAGE}")
        req.count = int(values[0])
        return
    if base == "_sort":
        for value in values:
            for item in value.split(","):
                field_name = item[1:] if item.startswith("-") else item
                sort_param = search_param(kind, field_name)
                if sort_param is None or sort_param.kind in ("composite", "special"):
                    raise forbidden_param("_sort", f"{field_name[:64]!r} is not a parameter of {kind} to sort on")
                if field_name not in req.params:
                    req.params.append(field_name)  # sorting on a masked element probes it too
        return
    for value in values:  # _include, _revinclude
        _include_value(req, base, value, allowed, known_types)


def _include_value(req: FhirRequest, base: str, value: str, allowed: frozenset[str],
                   known_types: frozenset[str] = frozenset()) -> None:
    parts = value.split(":")
    if len(parts) not in (2, 3) or not TYPE_RE.match(parts[0]) or not parts[1] or parts[1] == "*":
        raise forbidden_param(base, f"{value[:64]!r}: use Type:parameter (no wildcard)")
    source = parts[0]
    if source not in R4_TYPES:
        raise forbidden_param(base, f"unknown resource type {source[:64]!r}")
    param = search_param(source, parts[1])
    if param is None or param.kind != "reference":
        raise forbidden_param(base, f"{value[:64]!r}: {parts[1][:32]!r} is not a reference parameter of {source}")
    if len(parts) == 3 and (parts[2] not in R4_TYPES or not param.can_target(parts[2])):
        raise forbidden_param(base, f"{value[:64]!r}: {param.name} never points at {parts[2][:32]}")
    if base == "_include":
        if source != req.resource_type:
            raise forbidden_param(base, f"{value[:64]!r}: includes start from the type searched")
        included = {parts[2]} if len(parts) == 3 else set(param.targets)
        if "*" in included or (known_types and not included & known_types):
            raise forbidden_param(base, f"{value[:64]!r}: say the type included (Type:param:Target), one "
                                        "open through dpiguard")
        req.includes.append(value)
        return
    if known_types and source not in known_types:
        raise forbidden_param(base, f"{source} is not open through dpiguard")
    if not param.can_target(req.resource_type):
        raise forbidden_param(base, f"{value[:64]!r}: {param.name} never points at {req.resource_type}")
    if req.resource_type != "Patient" and "_revinclude" not in allowed:
        raise forbidden_param(base, "reverse includes are only allowed on Patient searches")
    if parts[1] not in set(PATIENT_COMPARTMENT.get(source, ())) | PATIENT_PARAMS:
        if "_revinclude" not in allowed:
            raise forbidden_param(base, f"{value[:64]!r} does not point at the patient")
    req.revincludes.append(value)


def fhir_resource(path: str) -> tuple[str | None, str | None]:
    """(resource type, id) of a FHIR REST path such as /fhir/Patient/P0001/_history/2 or /fhir/Observation."""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        if part[:1].isupper() and part.isalnum():
            ident = parts[i + 1] if i + 1 < len(parts) and not parts[i + 1].startswith(("_", "$")) else None
            return part, ident
    return None, None
