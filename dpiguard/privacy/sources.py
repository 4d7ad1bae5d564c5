"""Where patient demographics come from: HL7 v2 PID segments (ADT feed) and FHIR Patient resources.

Pure functions returning :class:`~dpiguard.privacy.pseudonyms.Demographics` (clear text, in memory
only; the caller hashes them at once). Fields read:

- HL7 (IHE PAM, v2.5): PID-3 is the patient id the ADT parser already chose; PID-5 every name
  repetition (family name XPN-1.1, given name XPN-2; legal and usage names both count); PID-7 birth
  date; PID-11 every address repetition (street XAD-1.1, other line XAD-2, postal code XAD-5);
  PV1-16 VIP indicator (any value but ``N`` flags the patient ``vip``); PD1-12 protection indicator
  ``Y`` (the patient asked that their presence be kept confidential) flags ``confidential``;
- FHIR R4 Patient: ``name[].family``, ``name[].given[0]``, ``birthDate``, ``address[].line`` and
  ``postalCode``; ``meta.security`` codes ``R`` / ``V`` (v3-Confidentiality) flag ``confidential``,
  ``CEL`` / ``VIP`` flag ``vip``, ``EMP`` (employee information) flags ``staff``.
"""

from __future__ import annotations

from typing import Any, Iterator

import hl7

from dpiguard.privacy.pseudonyms import Demographics

CONFIDENTIAL_CODES = {"R", "V"}
VIP_CODES = {"CEL", "VIP", "CELEB"}
STAFF_CODES = {"EMP"}


def _field(segment, index: int) -> Any:
    if segment is None or index >= len(segment):
        return None
    return segment[index]


def _reps(field) -> list:
    if field is None:
        return []
    if isinstance(field, str):
        return [[field]] if field else []
    out = []
    for rep in field:
        out.append([rep] if isinstance(rep, str) else list(rep))
    return out


def _comp(rep: list, n: int) -> str:
    if n > len(rep):
        return ""
    value = rep[n - 1]
    if not isinstance(value, str):
        value = value[0] if len(value) else ""
        value = value if isinstance(value, str) else str(value)
    return value.strip()


def _segment(msg, name: str):
    try:
        return msg.segment(name)
    except KeyError:
        return None


def from_hl7(text: str) -> tuple[str | None, Demographics]:
    """(PID-3.1 of the first identifier, demographics) of one HL7 v2 message. Malformed → ValueError."""
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    try:
        msg = hl7.parse(text)
    except Exception as exc:  # the hl7 library raises several kinds
        raise ValueError(f"not an HL7 v2 message: {exc}") from None
    pid = _segment(msg, "PID")
    d = Demographics()
    if pid is None:
        return None, d
    patient = next((_comp(r, 1) for r in _reps(_field(pid, 3)) if _comp(r, 1)), None)
    for rep in _reps(_field(pid, 5)):
        family = _comp(rep, 1)
        if family:
            d.family_names.append(family)
            if not d.given_name:
                d.given_name = _comp(rep, 2)
    birth = _reps(_field(pid, 7))
    d.birth_date = _comp(birth[0], 1) if birth else ""
    for rep in _reps(_field(pid, 11)):
        lines = [x for x in (_comp(rep, 1), _comp(rep, 2)) if x]
        postal = _comp(rep, 5)
        if lines and postal:
            d.address_lines.append(lines)
            d.postal_codes.append(postal)
    pv1 = _segment(msg, "PV1")
    vip = _reps(_field(pv1, 16))
    if vip and _comp(vip[0], 1) and _comp(vip[0], 1).upper() != "N":
        d.flags.add("vip")
    pd1 = _segment(msg, "PD1")
    protection = _reps(_field(pd1, 12))
    if protection and _comp(protection[0], 1).upper() == "Y":
        d.flags.add("confidential")
    return patient, d


def from_fhir_patient(resource: dict) -> Demographics:
    """Demographics of one FHIR R4 Patient resource (anything malformed is skipped, never raised)."""
    d = Demographics()
    for name in resource.get("name") or []:
        if not isinstance(name, dict):
            continue
        family = name.get("family")
        if isinstance(family, str) and family.strip():
            d.family_names.append(family)
            given = name.get("given")
            if not d.given_name and isinstance(given, list) and given and isinstance(given[0], str):
                d.given_name = given[0]
    if isinstance(resource.get("birthDate"), str):
        d.birth_date = resource["birthDate"]
    for address in resource.get("address") or []:
        if not isinstance(address, dict):
            continue
        lines = [x for x in address.get("line") or [] if isinstance(x, str) and x.strip()]
        postal = address.get("postalCode")
        if lines and isinstance(postal, str) and postal.strip():
            d.address_lines.append(lines)
            d.postal_codes.append(postal)
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    for tag in meta.get("security") or []:
        code = tag.get("code") if isinstance(tag, dict) else None
        if code in CONFIDENTIAL_CODES:
            d.flags.add("confidential")
        elif code in VIP_CODES:
            d.flags.add("vip")
        elif code in STAFF_CODES:
            d.flags.add("staff")
    return d


def fhir_patients(body: Any) -> Iterator[tuple[str, dict]]:
    """(id, resource) of every Patient resource in a FHIR answer: the resource itself, or the entries
    (and contained resources) of a Bundle."""
    stack = [body]
    while stack:
        item = stack.pop()
        if not isinstance(item, dict):
            continue
        kind = item.get("resourceType")
        if kind == "Patient" and isinstance(item.get("id"), str):
            yield item["id"], item
        elif kind == "Bundle":
            for entry in item.get("entry") or []:
                if isinstance(entry, dict):
                    stack.append(entry.get("resource"))
        for contained in item.get("contained") or []:
            stack.append(contained)
