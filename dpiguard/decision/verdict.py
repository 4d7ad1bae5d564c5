"""What flows through the decision: the request as dpiguard sees it, and the verdict on it.

:class:`Incoming` is built by the proxy edge from a mitmproxy flow (or by a test); :class:`Verdict` goes
back to the edge, which forwards (with the identity headers it carries) or answers the refusal.
"""

from __future__ import annotations

import secrets
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Mapping

from dpiguard.auth.sessions import Session
from dpiguard.policy.snapshot import PolicySet

REFUSAL_MESSAGES = {
    "not_in_care_team": "you are not in this patient's care team",
    "patient_objection": "the patient has objected to your access to their record",
    "privacy_refused": "access to this record is not allowed from your account (privacy rule)",
    "privacy_break_glass_required": "this record needs an emergency-access justification, even for its care team",
}


class NeedIO(Exception):
    """The decision needs a Redis round trip; retry with io=True off the event loop.

    ``facts``: (user, patient) when what is missing is the care-team facts of that pair
    (:meth:`dpiguard.decision.pipeline.Pipeline.care_team`), which the event loop may read itself and store
    (:mod:`dpiguard.edge.prefetch`, :meth:`~dpiguard.decision.pipeline.Pipeline.store_facts`) before deciding
    in-process again; None for anything else (a session, units)."""

    def __init__(self, facts: tuple[str, str] | None = None):
        super().__init__()
        self.facts = facts


@dataclass
class Incoming:
    """What the pipeline needs to know about a request."""

    method: str
    target: str  # path and query exactly as received
    headers: Mapping[str, str]  # lower-case names → value (multi-valued headers joined by ", ")
    client_ip: str
    tls: bool
    header_bytes: int = 0
    request_id: str = field(default_factory=lambda: secrets.token_hex(8))


@dataclass
class Verdict:
    allowed: bool
    reason: str
    status: int = 200
    message: str = ""
    forward_target: str = ""  # normalized path + query to send upstream
    set_headers: dict[str, str] = field(default_factory=dict)
    cookie_header: str | None = None  # Cookie header to forward (dpiguard's cookie removed); None = unchanged
    drop_authorization: bool = False
    user: str | None = None
    roles: tuple[str, ...] = ()
    patient: str | None = None
    category: str | None = None
    action: str | None = None
    fhir: bool = False
    public: bool = False
    source: str | None = None  # why the care-team check passed/failed
    retry_after: int = 0
    session: Session | None = None
    break_glass: object | None = None  # the emergency-access Grant the request relies on (access.py)
    objection_overridden: str | None = None
    fhir_context: object | None = None  # FHIR requests: what the response and body checks need
    fhir_issue: str | None = None  # FHIR refusals: OperationOutcome issue.code
    pending: bool = False  # FHIR writes: decided (and traced) once the body is in
    conceal: bool = False  # FHIR: answer this refusal like a missing resource (404), the trace has the reason
    forward_body: bytes | None = None  # FHIR Bundles: the body to forward (versions checked), None = as sent
    drop_headers: tuple[str, ...] = ()  # request headers never forwarded for this request (FHIR validators)
    forward_method: str | None = None  # FHIR POST _search: forwarded as this method (GET), None = as sent
    units: tuple[str, ...] | None = None
    audit: Future | None = None  # resolves once the decision's trace record is on disk
    policies: PolicySet | None = None  # the policy set this decision was taken with (FHIR answers use it too)


def audit_unavailable() -> Verdict:
    """The refusal given when a decision's trace cannot be made durable (audit.on_failure: refuse)."""
    return Verdict(False, "audit_unavailable", 503, "the access trace could not be written; request refused")
