"""The request pipeline: from an incoming request to a verdict (forward with identity, or refuse).

It knows nothing of mitmproxy: ``dpiguard/addon.py`` adapts flows to :class:`Incoming` and verdicts
back to flows. Steps, in order (see docs/architecture.md):

1. limits (URL and header sizes) and forged identity headers;
2. HTTP mapping: normalize the path, match a route → (patient, category, action) or public;
3. authentication: session from cookie or bearer token;
4. authorization: the user's roles may do the action on the category (precomputed from Casbin);
5. care team: patient objection, care-team membership, emergency access (``access.py``; decision
   cache, Redis behind);
6. identity headers and signed assertion for the upstream;
7. one trace record per decision.

The common case does no I/O at all: sessions, units and care-team decisions come from in-process
caches kept exact by the invalidation bus. When a step needs Redis, :meth:`Pipeline.decide` raises
:class:`NeedIO` if called with ``io=False``; the addon then re-runs it with ``io=True`` in a worker
thread so the event loop never blocks on the network.
"""

from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Mapping

import redis

from dpiguard.decision import assertion as identity
from dpiguard import metrics
from dpiguard.audit.chain import AuditError, AuditLog
from dpiguard.decision.cache import DecisionCache
from dpiguard.careteam.store import CareTeamStore
from dpiguard.policy.routes import HostileRequest, RouteMatch, normalize_path, parse_query
from dpiguard.decision.assertion import AssertionSigner
from dpiguard.policy.table import Policy
from dpiguard.auth.sessions import Session, SessionStore

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


REFUSAL_MESSAGES = {
    "not_in_care_team": "you are not in this patient's care team",
    "patient_objection": "the patient has objected to your access to their record",
}


# -- the pure part of the decision (also used by `dpiguard policy test|explain|diff`) ---------------
def parse_target(target: str) -> tuple[str, dict[str, list[str]], str]:
    """Step 2a: (normalized path, parsed query, raw query) of a request target.

    Raises HostileRequest (reason ``hostile_path``)."""
    raw_path, _, raw_query = target.partition("?")
    if "#" in raw_query or "#" in raw_path:
        raise HostileRequest("hostile_path", "fragment in request target")
    return normalize_path(raw_path), parse_query(raw_query), raw_query


def map_request(policy: Policy, method: str, target: str) -> tuple[RouteMatch | None, str, str]:
    """Step 2: (route match or None, normalized path, raw query) of a request target.

    Raises HostileRequest (reason ``hostile_path`` or ``ambiguous_patient``)."""
    path, query, raw_query = parse_target(target)
    return policy.routes.match(method, path, query), path, raw_query


def authorize(policy: Policy, roles: tuple[str, ...] | list[str], match: RouteMatch) -> tuple[str, str] | None:
    """Step 4: None if one of ``roles`` may do the matched action on its category, else
    (refusal reason, message). The care team (step 5) is still to be checked when
    :func:`needs_care_team` says so."""
    if not policy.permits(roles, match.category, match.action):
        return "category_not_permitted", f"your role may not {match.action} {match.category} data"
    if needs_care_team(policy, match) and not match.patient:
        return "no_route", "no patient in this request"  # a route must name the patient of such a category
    return None


def needs_care_team(policy: Policy, match: RouteMatch) -> bool:
    return policy.category(match.category).care_team_required


class NeedIO(Exception):
    """The decision needs a Redis round trip; retry with io=True off the event loop."""


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
    units: tuple[str, ...] | None = None
    audit: Future | None = None  # resolves once the decision's trace record is on disk


@dataclass(frozen=True, slots=True)
class CachedDecision:
    member: bool
    source: str
    reason: str = "not_in_care_team"
    break_glass: object | None = None
    objection_overridden: str | None = None


class Pipeline:
    def __init__(
        self,
        *,
        policy: Policy,
        sessions: SessionStore,
        careteam: CareTeamStore,
        cache: DecisionCache,
        signer: AssertionSigner,
        audit: AuditLog,
        cookie_name: str,
        instance_id: str,
        decision_ttl: float = 60.0,
        max_header_bytes: int = 16384,
        max_url_bytes: int = 4096,
        extra_identity_headers: tuple[str, ...] = (),
        require_tls: bool = False,
        access=None,
    ):
        self.policy = policy  # swapped whole (one attribute assignment) on reload
        self.sessions = sessions
        self.careteam = careteam
        self.cache = cache
        self.signer = signer
        self.audit = audit
        self.cookie_name = cookie_name
        self.instance_id = instance_id
        self.decision_ttl = decision_ttl
        self.max_header_bytes = max_header_bytes
        self.max_url_bytes = max_url_bytes
        self.extra_identity_headers = tuple(h.lower() for h in extra_identity_headers)
        self.require_tls = require_tls
        # Objections + care team + emergency access in one round trip (dpiguard/access.py); None = care team only.
        self.access = access
        self.fhir = None  # dpiguard.fhir.enforce.FhirEnforcer when policies/fhir.yaml is loaded
        # Units of each user, valid now (for the identity headers); dropped on `user:U` events.
        self._units: dict[str, tuple[tuple[str, ...], float]] = {}
        self._units_lock = threading.Lock()
        self.units_ttl = 60.0
        self.mass_access = None  # MassAccessMonitor (dpiguard/massaccess.py): in-process checks only

    # -- invalidation hooks (called by the bus thread) ---------------------------------------------
    def drop_user(self, user: str) -> None:
        with self._units_lock:
            self._units.pop(user, None)

    def drop_all(self) -> None:
        with self._units_lock:
            self._units.clear()

    # -- the decision ------------------------------------------------------------------------------
    def decide(self, req: Incoming, *, io: bool, now: float | None = None) -> Verdict:
        """Decide and trace. Never raises except NeedIO (when io is False)."""
        now = time.time() if now is None else now
        policy = self.policy  # read once: a reload swaps the attribute, never mutates a Policy
        try:
            verdict = self._decide(req, io, now, policy)
        except NeedIO:
            raise
        except Exception as exc:  # fail closed: any unexpected error is a refusal
            if isinstance(exc, redis.RedisError):
                metrics.redis_error("decision")
            verdict = Verdict(False, "internal_error", 503, f"dpiguard could not decide: {type(exc).__name__}")
            verdict.set_headers = {}
            detail = f"{type(exc).__name__}: {exc}"[:500]
        else:
            detail = None
            if verdict.pending:
                return verdict  # traced by the FHIR body check, once the body is in
        try:
            verdict.audit = self._trace(req, verdict, policy, detail)
        except AuditError:
            return audit_unavailable()
        return verdict

    def _decide(self, req: Incoming, io: bool, now: float, policy: Policy) -> Verdict:
        if self.require_tls and not req.tls:
            return Verdict(False, "tls_required", 400, "this service is only served over HTTPS")
        if req.method not in KNOWN_METHODS:
            return Verdict(False, "method_not_allowed", 405, f"method {req.method[:16]!r} is not allowed")
        if len(req.target) > self.max_url_bytes:
            return Verdict(False, "hostile_path", 414, "request URL too long")
        if req.header_bytes > self.max_header_bytes:
            return Verdict(False, "header_too_large", 431, "request headers too large")
        for name in req.headers:
            if identity.is_identity_header(name, self.extra_identity_headers):
                return Verdict(False, "forged_identity_header", 400,
                               f"header {name[:64]!r} may only be set by dpiguard")

        try:
            path, query, raw_query = parse_target(req.target)
        except HostileRequest as exc:
            return Verdict(False, exc.reason, 400, str(exc))
        fhir = self.fhir
        if fhir is not None and fhir.policy.owns(path):
            return fhir.decide(self, req, path, query, raw_query, io, now)
        try:
            match = policy.routes.match(req.method, path, query)
        except HostileRequest as exc:
            return Verdict(False, exc.reason, 400, str(exc))
        forward_target = path + ("?" + raw_query if raw_query else "")

        if match is not None and match.public:
            return Verdict(True, "public", forward_target=forward_target, public=True)

        session, token_source = self._session(req, io, now)
        if session is None:
            reason = "session_expired" if token_source else "not_authenticated"
            return Verdict(False, reason, 401, "please log in")
        verdict = Verdict(False, "", 403, user=session.user, roles=session.roles, session=session)
        if match is None:
            verdict.reason, verdict.message = "no_route", "this address is not open through dpiguard"
            return verdict
        verdict.patient, verdict.category, verdict.action, verdict.fhir = (
            match.patient, match.category, match.action, match.fhir)

        if req.method in UNSAFE_METHODS and token_source == "cookie" and not self._same_origin(req):
            verdict.reason, verdict.message = "csrf_origin_mismatch", "cross-site request refused"
            return verdict
        refusal = authorize(policy, session.roles, match)
        if refusal is not None:
            verdict.reason, verdict.message = refusal
            return verdict
        care_team_required = needs_care_team(policy, match)
        if match.patient and (care_team_required or self.access is not None):
            decision = self._care_team(session.user, match.patient, match.category, match.action, io, now,
                                       care_team_required)
            verdict.source = decision.source
            if not decision.member:
                verdict.reason = decision.reason
                verdict.message = REFUSAL_MESSAGES.get(decision.reason, decision.reason)
                return verdict
            verdict.break_glass = decision.break_glass
            verdict.objection_overridden = decision.objection_overridden

        return self._grant(req, verdict, session, token_source, forward_target, io, now)

    def _grant(self, req: Incoming, verdict: Verdict, session: Session, token_source: str | None,
               forward_target: str, io: bool, now: float) -> Verdict:
        """Allow: identity headers and signed assertion for the upstream, session credentials removed."""
        mass = self.mass_access
        if mass is not None and verdict.patient and mass.blocked(session.user, now):
            verdict.reason = "mass_access"
            verdict.message = "too many different patients opened in a short time; access paused, contact your supervisor"
            return verdict
        units = self._user_units(session.user, io, now)
        if mass is not None and verdict.patient:
            mass.note(session.user, verdict.patient, now)
        verdict.units = units
        verdict.allowed, verdict.reason, verdict.status = True, "allowed", 200
        verdict.forward_target = forward_target
        verdict.set_headers = {
            identity.HEADER_USER: session.user,
            identity.HEADER_ROLES: ",".join(session.roles),
            identity.HEADER_UNITS: ",".join(units),
            identity.HEADER_REQUEST_ID: req.request_id,
            identity.HEADER_ASSERTION: self.signer.sign(session.user, list(session.roles), list(units),
                                                       session.sid_hash, now=now),
        }
        if verdict.break_glass is not None:
            verdict.set_headers[identity.HEADER_BREAK_GLASS] = verdict.break_glass.id
        if token_source == "cookie":
            verdict.cookie_header = self._strip_cookie(req.headers.get("cookie", ""))
        else:
            verdict.drop_authorization = True
        return verdict

    # -- steps -------------------------------------------------------------------------------------
    def session_token(self, req: Incoming) -> tuple[str | None, str | None]:
        """The session id the client presented, and where: ('cookie'|'bearer'|None)."""
        auth = req.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip(), "bearer"
        cookie = req.headers.get("cookie")
        if cookie:
            for part in cookie.split(";"):
                name, _, value = part.strip().partition("=")
                if name == self.cookie_name:
                    return value, "cookie"
        return None, None

    def _session(self, req: Incoming, io: bool, now: float) -> tuple[Session | None, str | None]:
        token, source = self.session_token(req)
        if not token:
            return None, None
        if not io:
            session = self.sessions.get_local(token, now)
            metrics.session_lookup(session is not None)
            if session is None:
                raise NeedIO()
        else:
            session = self.sessions.get(token, now)
        return session, source

    def _care_team(self, user: str, patient: str, category: str, action: str, io: bool, now: float,
                   care_team_required: bool = True) -> CachedDecision:
        key = (user, patient, category, action)
        cached = self.cache.get(key, now)
        if cached is not None:
            return cached
        if not io:
            raise NeedIO()
        generation = self.cache.generation()
        if self.access is not None:
            decision, valid_until, units = self.access.decide_with_units(
                user, patient, category, action, care_team_required, now)
        else:
            membership, units = self.careteam.membership_and_units(user, patient, now, category)
            decision, valid_until = CachedDecision(membership.member, membership.source), membership.valid_until
        expires = now + self.decision_ttl
        if valid_until is not None:
            expires = min(expires, valid_until)
        self.cache.put(key, decision, expires, generation)
        self._remember_units(user, tuple(units), now, generation)  # saves the units read that follows
        return decision

    def _user_units(self, user: str, io: bool, now: float) -> tuple[str, ...]:
        with self._units_lock:
            hit = self._units.get(user)
        if hit is not None and hit[1] > now:
            return hit[0]
        if not io:
            raise NeedIO()
        generation = self.cache.generation()
        units = tuple(self.careteam.user_units(user, now))
        self._remember_units(user, units, now, generation)
        return units

    def _remember_units(self, user: str, units: tuple[str, ...], now: float, generation: int) -> None:
        if self.cache.enabled and self.cache.generation() == generation:
            with self._units_lock:
                self._units[user] = (units, now + self.units_ttl)

    @staticmethod
    def _same_origin(req: Incoming) -> bool:
        # SameSite=Strict already keeps the cookie off cross-site requests; browsers also say where an
        # unsafe request comes from (Fetch Metadata), so refuse cross-site ones explicitly.
        return req.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")

    def _strip_cookie(self, cookie: str) -> str:
        kept = [p.strip() for p in cookie.split(";") if p.strip() and p.strip().partition("=")[0] != self.cookie_name]
        return "; ".join(kept)

    # -- trace -------------------------------------------------------------------------------------
    def _trace(self, req: Incoming, v: Verdict, policy: Policy | None = None, detail: str | None = None) -> Future:
        """Queue the decision's record (schema: docs/audit.md); the caller awaits the future."""
        if v.user is None and not v.public:
            v.user = self._known_user(req)  # attribute early refusals (hostile paths...) when we can
        if v.forward_target:
            path = v.forward_target.partition("?")[0]
        else:  # refusals: the normalized path when there is one (hostile paths have none)
            try:
                path = normalize_path(req.target.partition("?")[0]) if len(req.target) <= self.max_url_bytes else None
            except HostileRequest:
                path = None
        fhir_type, fhir_id = fhir_resource(path) if v.fhir and path else (None, None)
        return self.audit.submit({
            "event": "access",
            "request_id": req.request_id,
            "outcome": "allow" if v.allowed else "deny",
            "reason": v.reason,
            "user": v.user,
            "roles": list(v.roles),
            "units": list(v.units) if v.units is not None else None,
            "patient": v.patient,
            "category": v.category,
            "action": v.action,
            "method": req.method[:16],
            "path": path,
            "target": req.target[:512],
            "fhir_type": fhir_type,
            "fhir_id": fhir_id,
            "break_glass": None,
            "break_glass_reason": None,
            "client": req.client_ip,
            "care_team": v.source,
            "policy_version": getattr(policy, "version", None) or self._policy_version(),
            "detail": detail,
            **(self._break_glass_fields(v) if v.break_glass is not None else {}),
        })

    @staticmethod
    def _break_glass_fields(v: Verdict) -> dict:
        grant = v.break_glass
        return {"break_glass": True, "break_glass_id": grant.id, "break_glass_reason": grant.reason,
                "break_glass_until": grant.end, "objection_overridden": v.objection_overridden}

    def _known_user(self, req: Incoming) -> str | None:
        """The user of the presented session if this instance already knows it (no I/O)."""
        token, _ = self.session_token(req)
        if not token:
            return None
        try:
            session = self.sessions.get_local(token)
        except Exception:
            return None
        return session.user if session else None

    def _policy_version(self) -> str | None:
        return getattr(self.policy, "version", None)


def audit_unavailable() -> Verdict:
    """The refusal given when a decision's trace cannot be made durable (audit.on_failure: refuse)."""
    return Verdict(False, "audit_unavailable", 503, "the access trace could not be written; request refused")


def fhir_resource(path: str) -> tuple[str | None, str | None]:
    """(resource type, id) of a FHIR REST path such as /fhir/Patient/P0001/_history/2 or /fhir/Observation."""
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        if part[:1].isupper() and part.isalnum():
            ident = parts[i + 1] if i + 1 < len(parts) and not parts[i + 1].startswith(("_", "$")) else None
            return part, ident
    return None, None
