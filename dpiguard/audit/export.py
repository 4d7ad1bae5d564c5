"""``dpiguard audit export``: JSON lines, FHIR R4 AuditEvent (IHE BALP patterns), syslog (RFC 5424 over
TLS, RFC 5425, or plain TCP; RFC 6587 octet-counting framing).

FHIR mapping of an access record (IHE ITI Basic Audit Log Patterns, RESTful operations; e.g.
``IHE.BasicAudit.PatientRead`` / ``PatientQuery`` / ``PatientUpdate``):

- ``type`` = audit-event-type ``rest``; ``subtype`` = restful-interaction ``read`` / ``search-type`` /
  ``create`` / ``update`` / ``delete`` (from the HTTP method and the FHIR path); ``action`` R/E/C/U/D;
- ``outcome`` ``0`` (allowed) or ``4`` (refused; ``outcomeDesc`` holds the reason code);
- agents: the client (Source Role ID, DCM 110153, with its network address), the DPI (Destination
  Role ID, DCM 110152), the user (``requestor: true``, login as identifier, roles as ``role.text``);
- ``source.observer`` = the dpiguard instance (security-source-type 4, application server);
- entities: the patient (audit-entity-type 1 / object-role 1, ``Patient/<id>``) and, for FHIR routes,
  the resource read (type 2 / role 4, ``<Type>/<id>``), or the query (role 24) for searches;
- ``purposeOfEvent`` ``TREAT``, or ``ETREAT`` plus ``BTG`` (break the glass) for emergency access, with
  the reason given as text.
Other events: logins/logouts → DCM 110114 User Authentication (110122 Login / 110123 Logout);
lockouts, mass-access and privacy alerts → 110113 Security Alert; management → 110136/110137; everything else →
110100 Application Activity. The record's ``request_id``, instance and chain seq are kept as
``entity`` detail and ``id`` so the FHIR form points back to the signed chain.

Syslog: RFC 5424 messages, octet-counted framing over TCP (RFC 6587), facility authpriv, severity
warning for refusals and alerts (``outcome: alert``: mass access, privacy) and info otherwise, MSGID = event, structured data ``[dpiguard@32473 …]`` and the
JSON record as message. ``--state FILE`` remembers the last seq sent per chain, so a periodic export
sends each record once.
"""

from __future__ import annotations

import base64
import socket
import ssl
from typing import Any, Iterable

import orjson

AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ID_SYSTEM = "urn:dpiguard:audit"
PROFILES = {
    "read": "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead",
    "search-type": "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientQuery",
    "create": "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientCreate",
    "update": "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientUpdate",
    "delete": "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientDelete",
}
ACTIONS = {"read": "R", "search-type": "E", "create": "C", "update": "U", "delete": "D"}


def _interaction(r: dict[str, Any]) -> str:
    method = (r.get("method") or "GET").upper()
    if method in ("GET", "HEAD"):
        return "read" if r.get("fhir_id") or not r.get("fhir_type") else "search-type"
    return {"POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}.get(method, "read")


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    c = {"system": system, "code": code}
    if display:
        c["display"] = display
    return c


def to_audit_event(r: dict[str, Any]) -> dict[str, Any]:
    """One FHIR R4 AuditEvent (JSON) for one audit record."""
    event = r.get("event")
    allowed = r.get("outcome") == "allow"
    ae: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"{r.get('instance', 'x')}-{r.get('seq', 0)}".replace("_", "-")[:64],
        "recorded": r.get("time"),
        "outcome": "0" if allowed else "4",
        "source": {"observer": {"display": f"dpiguard {r.get('instance')}"},
                   "type": [_coding(SOURCE_TYPE, "4", "Application Server")]},
        "agent": [],
        "entity": [],
    }
    if not allowed:
        ae["outcomeDesc"] = r.get("reason") or "refused"
    if event == "access":
        interaction = _interaction(r)
        ae["meta"] = {"profile": [PROFILES[interaction]]} if r.get("patient") else {}
        ae["type"] = _coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation")
        ae["subtype"] = [_coding(RESTFUL, interaction, interaction)]
        ae["action"] = ACTIONS[interaction]
    elif event in ("login", "logout"):
        ae["type"] = _coding(DCM, "110114", "User Authentication")
        ae["subtype"] = [_coding(DCM, "110122", "Login") if event == "login" else _coding(DCM, "110123", "Logout")]
        ae["action"] = "E"
    elif event in ("lockout", "mass_access", "privacy_alert"):
        ae["type"] = _coding(DCM, "110113", "Security Alert")
        ae["action"] = "E"
    elif event == "admin":
        ae["type"] = _coding(DCM, "110136", "Security Roles Changed") if str(r.get("action", "")).startswith("user") \
            else _coding(DCM, "110137", "User Security Attributes Changed")
        ae["action"] = "U"
    else:
        ae["type"] = _coding(DCM, "110100", "Application Activity")
        ae["action"] = "E"
    if not ae.get("meta"):
        ae.pop("meta", None)
    # agents: user (requestor), client (source), DPI (destination)
    if r.get("user"):
        user = {"type": {"coding": [_coding(PARTICIPATION, "humanuser", "human user")]},
                "who": {"identifier": {"system": "urn:dpiguard:user", "value": r["user"]}},
                "requestor": True}
        if r.get("roles"):
            user["role"] = [{"text": role} for role in r["roles"]]
        if r.get("break_glass"):
            user["purposeOfUse"] = [{"coding": [_coding(ACT_REASON, "ETREAT", "Emergency Treatment")]}]
        ae["agent"].append(user)
    client = {"type": {"coding": [_coding(DCM, "110153", "Source Role ID")]}, "requestor": not r.get("user"),
              "who": {"display": r.get("client") or "unknown client"}}
    if r.get("client"):
        client["network"] = {"address": r["client"], "type": "2"}
    ae["agent"].append(client)
    ae["agent"].append({"type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]}, "requestor": False,
                        "who": {"display": "DPI (behind dpiguard)"}})
    # entities
    detail = [{"type": k, "valueString": str(r[k])} for k in ("request_id", "reason", "category", "care_team",
                                                                  "policy_version", "hash") if r.get(k)]
    if r.get("patient"):
        ae["entity"].append({"what": {"reference": f"Patient/{r['patient']}"},
                             "type": _coding(ENTITY_TYPE, "1", "Person"),
                             "role": _coding(OBJECT_ROLE, "1", "Patient")})
    if r.get("fhir_type") and r.get("fhir_id"):
        ae["entity"].append({"what": {"reference": f"{r['fhir_type']}/{r['fhir_id']}"},
                             "type": _coding(ENTITY_TYPE, "2", "System Object"),
                             "role": _coding(OBJECT_ROLE, "4", "Domain Resource"), "detail": detail})
    elif event == "access" and r.get("fhir_type"):
        query = (r.get("target") or r.get("path") or "").encode()
        ae["entity"].append({"type": _coding(ENTITY_TYPE, "2", "System Object"),
                             "role": _coding(OBJECT_ROLE, "24", "Query"),
                             "query": base64.b64encode(query).decode(), "detail": detail})
    else:
        ae["entity"].append({"what": {"identifier": {"system": ID_SYSTEM, "value": f"{r.get('instance')}/{r.get('seq')}"}},
                             "type": _coding(ENTITY_TYPE, "2", "System Object"),
                             "description": r.get("path") or r.get("action") or event, "detail": detail})
    if event == "access":
        purpose = [_coding(ACT_REASON, "TREAT", "treatment")]
        if r.get("break_glass"):
            purpose = [_coding(ACT_REASON, "ETREAT", "Emergency Treatment"), _coding(ACT_CODE, "BTG", "break the glass")]
        ae["purposeOfEvent"] = [{"coding": purpose, **({"text": r["break_glass_reason"]} if r.get("break_glass_reason") else {})}]
    return ae


# -- syslog -----------------------------------------------------------------------------------------

FACILITY_AUTHPRIV = 10
SD_ID = "dpiguard@32473"


def _sd_escape(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_token(value: Any, limit: int) -> str:
    text = "".join(c for c in str(value or "-") if 33 <= ord(c) <= 126)[:limit]
    return text or "-"


def to_syslog(r: dict[str, Any], hostname: str | None = None) -> bytes:
    """One RFC 5424 message (without framing)."""
    severity = 4 if r.get("outcome") in ("deny", "error", "alert") else 6
    pri = FACILITY_AUTHPRIV * 8 + severity
    params = " ".join(f'{k}="{_sd_escape(r[k])}"' for k in ("outcome", "reason", "user", "patient", "category",
                                                            "action", "request_id", "client", "seq", "instance")
                      if r.get(k) not in (None, "", []))
    sd = f"[{SD_ID} {params}]" if params else "-"
    head = (f"<{pri}>1 {r.get('time') or '-'} {_header_token(hostname or socket.gethostname(), 255)} dpiguard "
            f"{_header_token(r.get('instance'), 128)} {_header_token(r.get('event'), 32)} {sd} ")
    return head.encode() + b"\xef\xbb\xbf" + orjson.dumps(r)


TLS_PORT = 6514  # RFC 5425: syslog over TLS


class SyslogError(Exception):
    """The records could not be sent; ``str()`` is one line for the operator."""


def tls_context(ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """RFC 5425 client context: TLS 1.2 or later, the receiver's certificate verified (against
    ``ca_file``, else the system's CAs) and its name checked; a client certificate if given."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise SyslogError(f"cannot load the TLS files: {exc}") from None
    return context


def _wait_for_refusal(sock: ssl.SSLSocket, where: str, wait: float) -> None:
    """With TLS 1.3 the client's handshake ends before the receiver has checked the client certificate:
    a refusal (alert, or the connection closed) comes just after. Wait for it a moment (``wait``) before
    sending anything, so that refused records are never counted as sent."""
    if sock.version() != "TLSv1.3":
        return  # up to TLS 1.2 a refusal fails the handshake itself
    previous = sock.gettimeout()
    sock.settimeout(wait)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return  # nothing but session tickets (read by OpenSSL itself): accepted
    finally:
        sock.settimeout(previous)
    if data == b"":
        raise SyslogError(f"{where}: the receiver ended the session at once (client certificate refused?)")


def _tls_close(sock: ssl.SSLSocket, timeout: float) -> None:
    """End the TLS session with close_notify, reading what the receiver sent meanwhile (TLS 1.3 session
    tickets): closing a socket with unread data sends a TCP reset, which can make the receiver drop the
    last messages it had not read yet. A receiver that closes first or never answers close_notify is
    fine (all was sent); a TLS alert is not (with TLS 1.3 a refused client certificate is only known
    now): it raises, and the records count as not sent."""
    try:
        sock.settimeout(min(timeout, 2.0))
        sock.unwrap()
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, TimeoutError):
        pass


def send_syslog(records: Iterable[dict[str, Any]], host: str, port: int, timeout: float = 10.0, *,
                tls: ssl.SSLContext | None = None) -> int:
    """Send RFC 5424 messages over TCP, framed by RFC 6587 octet counting (``LEN SP MSG``); with
    ``tls``, over TLS (RFC 5425, same framing). SyslogError with a one-line reason on any failure."""
    where = f"{host}:{port}"
    n = 0
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
            try:
                if sock is not raw:
                    _wait_for_refusal(sock, where, min(timeout, 1.0))
                for r in records:
                    msg = to_syslog(r)
                    sock.sendall(str(len(msg)).encode() + b" " + msg)
                    n += 1
                if sock is not raw:
                    _tls_close(sock, timeout)
            finally:
                if sock is not raw:
                    sock.close()
    except SyslogError:
        raise
    except ssl.SSLCertVerificationError as exc:
        raise SyslogError(f"{where}: the receiver's certificate is not trusted ({exc.verify_message}); "
                          "give its CA with --ca-file") from None
    except ssl.SSLError as exc:
        raise SyslogError(f"{where}: TLS failed ({exc.reason or exc})") from None
    except TimeoutError:
        raise SyslogError(f"{where}: no answer within {timeout:g} s") from None
    except ConnectionRefusedError:
        raise SyslogError(f"{where}: connection refused (is the syslog receiver listening there?)") from None
    except OSError as exc:
        raise SyslogError(f"{where}: {exc.strerror or exc}") from None
    return n
