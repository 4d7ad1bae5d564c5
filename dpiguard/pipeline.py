"""The request pipeline: from an incoming request to a verdict (forward with identity, or refuse).

It knows nothing of mitmproxy: ``dpiguard/addon.py`` adapts flows to :class:`Incoming` and verdicts
back to flows. Steps, in order (see docs/architecture.md):

1. limits (URL and header sizes) and forged identity headers;
2. HTTP mapping: normalize the path, match a route → (patient, category, action) or public;
3. authentication: session from cookie or bearer token;
4. authorization: the user's roles may do the action on the category (precomputed from Casbin);
5. care team: the user belongs to the patient's care team (decision cache, Redis behind);
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
from dataclasses import dataclass, field
from typing import Mapping

import redis

from . import identity, metrics
from .audit import AuditError, AuditLog
from .cache import DecisionCache
from .careteam import CareTeamStore
from .httpmap import HostileRequest, normalize_path, parse_query
from .identity import AssertionSigner
from .policy import Policy
from .sessions import Session, SessionStore

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


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


@dataclass(frozen=True)
class CachedDecision:
    member: bool
    source: str


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
        # Units of each user, valid now (for the identity headers); dropped on `user:U` events.
        self._units: dict[str, tuple[tuple[str, ...], float]] = {}
        self._units_lock = threading.Lock()
        self.units_ttl = 60.0

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
        try:
            verdict = self._decide(req, io, now)
        except NeedIO:
            raise
        except Exception as exc:  # fail closed: any unexpected error is a refusal
            if isinstance(exc, redis.RedisError):
                metrics.redis_error("decision")
            verdict = Verdict(False, "internal_error", 503, f"dpiguard could not decide: {type(exc).__name__}")
            verdict.set_headers = {}
            self._trace(req, verdict, detail=f"{type(exc).__name__}: {exc}"[:500])
            return verdict
        try:
            self._trace(req, verdict)
        except AuditError:
            return Verdict(False, "internal_error", 503, "the access trace could not be written; request refused")
        return verdict

    def _decide(self, req: Incoming, io: bool, now: float) -> Verdict:
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

        raw_path, _, raw_query = req.target.partition("?")
        if "#" in raw_query or "#" in raw_path:
            return Verdict(False, "hostile_path", 400, "fragment in request target")
        try:
            path = normalize_path(raw_path)
            query = parse_query(raw_query)
        except HostileRequest as exc:
            return Verdict(False, exc.reason, 400, str(exc))
        policy = self.policy
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
        if not policy.permits(session.roles, match.category, match.action):
            verdict.reason = "category_not_permitted"
            verdict.message = f"your role may not {match.action} {match.category} data"
            return verdict
        category = policy.category(match.category)
        if category.care_team_required:
            if not match.patient:  # a route must name the patient of a care-team category
                verdict.reason, verdict.message = "no_route", "no patient in this request"
                return verdict
            decision = self._care_team(session.user, match.patient, match.category, match.action, io, now)
            verdict.source = decision.source
            if not decision.member:
                verdict.reason = "not_in_care_team"
                verdict.message = "you are not in this patient's care team"
                return verdict

        units = self._user_units(session.user, io, now)
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

    def _care_team(self, user: str, patient: str, category: str, action: str, io: bool, now: float) -> CachedDecision:
        key = (user, patient, category, action)
        cached = self.cache.get(key, now)
        if cached is not None:
            return cached
        if not io:
            raise NeedIO()
        generation = self.cache.generation()
        membership = self.careteam.membership(user, patient, now)
        decision = CachedDecision(membership.member, membership.source)
        expires = now + self.decision_ttl
        if membership.valid_until is not None:
            expires = min(expires, membership.valid_until)
        self.cache.put(key, decision, expires, generation)
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
        if self.cache.enabled and self.cache.generation() == generation:
            with self._units_lock:
                self._units[user] = (units, now + self.units_ttl)
        return units

    @staticmethod
    def _same_origin(req: Incoming) -> bool:
        # SameSite=Strict already keeps the cookie off cross-site requests; browsers also say where an
        # unsafe request comes from (Fetch Metadata), so refuse cross-site ones explicitly.
        return req.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")

    def _strip_cookie(self, cookie: str) -> str:
        kept = [p.strip() for p in cookie.split(";") if p.strip() and p.strip().partition("=")[0] != self.cookie_name]
        return "; ".join(kept)

    # -- trace -------------------------------------------------------------------------------------
    def _trace(self, req: Incoming, v: Verdict, detail: str | None = None) -> None:
        if v.user is None and not v.public:
            v.user = self._known_user(req)  # attribute early refusals (hostile paths...) when we can
        self.audit.write({
            "event": "access",
            "request_id": req.request_id,
            "outcome": "allow" if v.allowed else "deny",
            "reason": v.reason,
            "user": v.user,
            "roles": list(v.roles),
            "patient": v.patient,
            "category": v.category,
            "action": v.action,
            "method": req.method[:16],
            "path": req.target[:512],
            "client": req.client_ip,
            "care_team": v.source,
            "policy_version": self._policy_version(),
            "detail": detail,
        })

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
