"""The FHIR R4 (4.0.1) search parameters dpiguard understands, per resource type.

A search is default-deny: a parameter that is not in this table for the resource type searched (or
in :data:`COMMON`), a modifier its type does not take, or a chain, is refused before the DPI sees it
(:mod:`dpiguard.fhir.compartment`). The table is data: the name, the type (``token``, ``string``,
``reference``...) and, for references, the target types, as published in the R4 search parameter
registry (https://hl7.org/fhir/R4/searchparameter-registry.html). No maintained Python package ships
those definitions (``fhir.resources`` ships the models only), so the table is written out here for
the resource types that hold patient data in hospitals; a type that is not in it accepts the common
parameters only. Adding a type means adding its line, from the registry, with its targets.

Notation: ``name:type`` and ``name:ref(Target|Target)``; ``ref(*)`` is a reference to any type.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SearchParam:
    name: str
    kind: str  # number date string token reference composite quantity uri special
    targets: frozenset[str] = frozenset()  # reference: the types it may point at; "*" = any

    def can_target(self, kind: str) -> bool:
        return "*" in self.targets or kind in self.targets


# Modifiers of R4 (https://hl7.org/fhir/R4/search.html#modifiers) by parameter type. Reference type
# modifiers (`subject:Patient`) are handled apart; `:identifier` and `:missing` are listed here.
MODIFIERS: dict[str, frozenset[str]] = {
    "string": frozenset({"exact", "contains", "missing"}),
    "token": frozenset({"text", "not", "above", "below", "in", "not-in", "of-type", "missing"}),
    "reference": frozenset({"identifier", "missing"}),
    "date": frozenset({"missing"}),
    "number": frozenset({"missing"}),
    "quantity": frozenset({"missing"}),
    "uri": frozenset({"above", "below", "missing"}),
    "composite": frozenset(),
    "special": frozenset(),
}

# Parameters of every resource (Resource and DomainResource). `_id` and `_lastUpdated` select, the
# others too; none of them names a patient (except `_id` on Patient, read as such by the analysis).
_COMMON = "_id:token _lastUpdated:date _tag:token _profile:uri _security:token _source:uri _text:special " \
          "_content:special"

_R4 = {
    "Patient": """
        active:token address:string address-city:string address-country:string address-postalcode:string
        address-state:string address-use:token birthdate:date death-date:date deceased:token email:token
        family:string gender:token general-practitioner:ref(Organization|Practitioner|PractitionerRole)
        given:string identifier:token language:token link:ref(Patient|RelatedPerson) name:string
        organization:ref(Organization) phone:token phonetic:string telecom:token""",
    "Encounter": """
        account:ref(Account) appointment:ref(Appointment) based-on:ref(ServiceRequest) class:token date:date
        diagnosis:ref(Condition|Procedure) episode-of-care:ref(EpisodeOfCare) identifier:token length:quantity
        location:ref(Location) location-period:date part-of:ref(Encounter)
        participant:ref(Practitioner|PractitionerRole|RelatedPerson) participant-type:token
        patient:ref(Patient) practitioner:ref(Practitioner) reason-code:token
        reason-reference:ref(Condition|ImmunizationRecommendation|Observation|Procedure)
        service-provider:ref(Organization) special-arrangement:token status:token subject:ref(Group|Patient)
        type:token""",
    "Observation": """
        based-on:ref(CarePlan|DeviceRequest|ImmunizationRecommendation|MedicationRequest|NutritionOrder|ServiceRequest)
        category:token code:token code-value-concept:composite code-value-date:composite
        code-value-quantity:composite code-value-string:composite combo-code:token
        combo-code-value-concept:composite combo-code-value-quantity:composite combo-data-absent-reason:token
        combo-value-concept:token combo-value-quantity:quantity component-code:token
        component-code-value-concept:composite component-code-value-quantity:composite
        component-data-absent-reason:token component-value-concept:token component-value-quantity:quantity
        data-absent-reason:token date:date
        derived-from:ref(DocumentReference|ImagingStudy|Media|MolecularSequence|Observation|QuestionnaireResponse)
        device:ref(Device|DeviceMetric) encounter:ref(Encounter) focus:ref(*)
        has-member:ref(MolecularSequence|Observation|QuestionnaireResponse) identifier:token method:token
        part-of:ref(ImagingStudy|Immunization|MedicationAdministration|MedicationDispense|MedicationStatement|Procedure)
        patient:ref(Patient) performer:ref(CareTeam|Organization|Patient|Practitioner|PractitionerRole|RelatedPerson)
        specimen:ref(Specimen) status:token subject:ref(Device|Group|Location|Patient) value-concept:token
        value-date:date value-quantity:quantity value-string:string""",
    "MedicationRequest": """
        authoredon:date category:token code:token date:date encounter:ref(Encounter) identifier:token
        intended-dispenser:ref(Organization)
        intended-performer:ref(CareTeam|Device|Organization|Patient|Practitioner|PractitionerRole|RelatedPerson)
        intended-performertype:token intent:token medication:ref(Medication) patient:ref(Patient) priority:token
        requester:ref(Device|Organization|Patient|Practitioner|PractitionerRole|RelatedPerson) status:token
        subject:ref(Group|Patient)""",
    "DocumentReference": """
        authenticator:ref(Organization|Practitioner|PractitionerRole)
        author:ref(Device|Organization|Patient|Practitioner|PractitionerRole|RelatedPerson) category:token
        contenttype:token custodian:ref(Organization) date:date description:string
        encounter:ref(Encounter|EpisodeOfCare) event:token facility:token format:token identifier:token
        language:token location:uri patient:ref(Patient) period:date related:ref(*)
        relatesto:ref(DocumentReference) relation:token relationship:composite security-label:token
        setting:token status:token subject:ref(Device|Group|Patient|Practitioner) type:token""",
    "ImagingStudy": """
        basedon:ref(Appointment|AppointmentResponse|CarePlan|ServiceRequest|Task) bodysite:token dicom-class:token
        encounter:ref(Encounter) endpoint:ref(Endpoint) identifier:token instance:token
        interpreter:ref(Practitioner|PractitionerRole) modality:token patient:ref(Patient)
        performer:ref(CareTeam|Device|Organization|Patient|Practitioner|PractitionerRole|RelatedPerson)
        reason:token referrer:ref(Practitioner|PractitionerRole) series:token started:date status:token
        subject:ref(Device|Group|Patient)""",
    "AllergyIntolerance": """
        asserter:ref(Patient|Practitioner|PractitionerRole|RelatedPerson) category:token clinical-status:token
        code:token criticality:token date:date identifier:token last-date:date manifestation:token onset:date
        patient:ref(Patient) recorder:ref(Patient|Practitioner|PractitionerRole|RelatedPerson) route:token
        severity:token type:token verification-status:token""",
    "Condition": """
        abatement-age:quantity abatement-date:date abatement-string:string
        asserter:ref(Patient|Practitioner|PractitionerRole|RelatedPerson) body-site:token category:token
        clinical-status:token code:token encounter:ref(Encounter) evidence:token evidence-detail:ref(*)
        identifier:token onset-age:quantity onset-date:date onset-info:string patient:ref(Patient)
        recorded-date:date severity:token stage:token subject:ref(Group|Patient) verification-status:token""",
    "Procedure": """
        based-on:ref(CarePlan|ServiceRequest) category:token code:token date:date encounter:ref(Encounter)
        identifier:token instantiates-canonical:reference instantiates-uri:uri location:ref(Location)
        part-of:ref(MedicationAdministration|Observation|Procedure) patient:ref(Patient)
        performer:ref(Device|Organization|Patient|Practitioner|PractitionerRole|RelatedPerson) reason-code:token
        reason-reference:ref(Condition|DiagnosticReport|DocumentReference|Observation|Procedure) status:token
        subject:ref(Group|Patient)""",
    "DiagnosticReport": """
        based-on:ref(CarePlan|ImmunizationRecommendation|MedicationRequest|NutritionOrder|ServiceRequest)
        category:token code:token conclusion:token date:date encounter:ref(Encounter|EpisodeOfCare)
        identifier:token issued:date media:ref(Media) patient:ref(Patient)
        performer:ref(CareTeam|Organization|Practitioner|PractitionerRole) result:ref(Observation)
        results-interpreter:ref(CareTeam|Organization|Practitioner|PractitionerRole) specimen:ref(Specimen)
        status:token subject:ref(Device|Group|Location|Patient)""",
    "Immunization": """
        date:date identifier:token location:ref(Location) lot-number:string manufacturer:ref(Organization)
        patient:ref(Patient) performer:ref(Organization|Practitioner|PractitionerRole) reaction:ref(Observation)
        reaction-date:date reason-code:token reason-reference:ref(Condition|DiagnosticReport|Observation)
        series:string status:token status-reason:token target-disease:token vaccine-code:token""",
    "MedicationStatement": """
        category:token code:token context:ref(Encounter|EpisodeOfCare) effective:date identifier:token
        medication:ref(Medication) part-of:ref(MedicationAdministration|MedicationDispense|MedicationStatement|Observation|Procedure)
        patient:ref(Patient) source:ref(Organization|Patient|Practitioner|PractitionerRole|RelatedPerson)
        status:token subject:ref(Group|Patient)""",
    "MedicationAdministration": """
        code:token context:ref(Encounter|EpisodeOfCare) device:ref(Device) effective-time:date identifier:token
        medication:ref(Medication) patient:ref(Patient)
        performer:ref(Device|Patient|Practitioner|PractitionerRole|RelatedPerson) reason-given:token
        reason-not-given:token request:ref(MedicationRequest) status:token subject:ref(Group|Patient)""",
    "ServiceRequest": """
        authored:date based-on:ref(CarePlan|MedicationRequest|ServiceRequest) body-site:token category:token
        code:token encounter:ref(Encounter) identifier:token intent:token occurrence:date patient:ref(Patient)
        performer:ref(CareTeam|Device|HealthcareService|Organization|Patient|Practitioner|PractitionerRole|RelatedPerson)
        performer-type:token priority:token replaces:ref(ServiceRequest)
        requester:ref(Device|Organization|Patient|Practitioner|PractitionerRole|RelatedPerson) requisition:token
        specimen:ref(Specimen) status:token subject:ref(Device|Group|Location|Patient)""",
    "EpisodeOfCare": """
        care-manager:ref(Practitioner) condition:ref(Condition) date:date identifier:token
        incoming-referral:ref(ServiceRequest) organization:ref(Organization) patient:ref(Patient) status:token
        type:token""",
}


def _parse(spec: str) -> dict[str, SearchParam]:
    out: dict[str, SearchParam] = {}
    for item in spec.split():
        name, _, kind = item.partition(":")
        targets: frozenset[str] = frozenset()
        if kind.startswith("ref("):
            targets = frozenset(kind[4:-1].split("|"))
            kind = "reference"
        if kind not in MODIFIERS:
            raise ValueError(f"search parameter table: bad type {kind!r} for {name!r}")
        out[name] = SearchParam(name, kind, targets)
    return out


COMMON: dict[str, SearchParam] = _parse(_COMMON)
SEARCH_PARAMETERS: dict[str, dict[str, SearchParam]] = {kind: _parse(spec) for kind, spec in _R4.items()}


def search_param(resource_type: str, name: str) -> SearchParam | None:
    """The definition of ``name`` on ``resource_type`` (common parameters included), None if unknown."""
    found = SEARCH_PARAMETERS.get(resource_type, {}).get(name)
    return found if found is not None else COMMON.get(name)


def has_table(resource_type: str) -> bool:
    return resource_type in SEARCH_PARAMETERS
