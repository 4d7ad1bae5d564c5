"""The request pipeline: from an incoming request to a verdict (forward with identity, or refuse).

It knows nothing of mitmproxy: the proxy edge (``dpiguard/edge/addon.py``) adapts flows to
:class:`Incoming` and verdicts back to flows. Steps, in order (see docs/architecture.md):

1. limits (URL and header sizes) and forged identity headers;
2. HTTP mapping: normalize the path, match a route → (patient, category, action) or public;
3. authentication: session from cookie or bearer token;
4. authorization: the user's roles may do the action on the category (precomputed from Casbin);
5. care team: patient objection, care-team membership, emergency access (``access.py``; decision
   cache, Redis behind);
   under the FHIR base path, steps 2-5 are the FHIR step (``fhir.py``), which uses the same public
   steps of this class (:meth:`Pipeline.session`, :meth:`Pipeline.care_team`, :meth:`Pipeline.grant`,
   :meth:`Pipeline.trace`);
6. identity headers and signed assertion for the upstream;
7. one trace record per decision.

The common case does no I/O at all: sessions, units and care-team decisions come from in-process
caches kept exact by the invalidation bus. When a step needs Redis, :meth:`Pipeline.decide` raises
:class:`NeedIO` if called with ``io=False``; the addon then re-runs it with ``io=True`` in a worker
thread so the event loop never blocks on the network.

Each decision reads the policy set once (``pipeline.policies``, swapped whole by a reload) and hands
that same :class:`~dpiguard.policy.snapshot.PolicySet` to every step; the verdict keeps it
(``verdict.policies``) for the checks of the answer, and its trace record names its version.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import redis

from dpiguard import metrics
from dpiguard.audit.chain import AuditError, AuditLog
from dpiguard.auth.sessions import Session, SessionStore, presented_token
from dpiguard.careteam.store import CareTeamStore
from dpiguard.decision import assertion as identity
from dpiguard.decision.access import AccessDecider, AccessDecision, AccessFacts, decide_from_facts, facts_key
from dpiguard.decision.assertion import AssertionSigner
from dpiguard.decision.cache import DecisionCache
from dpiguard.decision.headers import ROUTING_HEADERS
from dpiguard.decision.massaccess import MassAccessMonitor
from dpiguard.decision.verdict import REFUSAL_MESSAGES, Incoming, NeedIO, Verdict, audit_unavailable
from dpiguard.fhir.compartment import fhir_resource
from dpiguard.policy.evaluate import KNOWN_METHODS, UNSAFE_METHODS, authorize, needs_care_team, parse_target
from dpiguard.policy.paths import HostileRequest, normalize_path
from dpiguard.policy.snapshot import PolicySet

SHARED_VALUES_MAX = 4096  # distinct shared decision tuples kept (Pipeline._shared_value)


class Pipeline:
    def __init__(
        self,
        *,
        policies: PolicySet,
        sessions: SessionStore,
        careteam: CareTeamStore,
        access: AccessDecider,
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
        fhir=None,
        mass_access: MassAccessMonitor | None = None,
    ):
        self.policies = policies  # swapped whole (one attribute assignment) on reload
        self.sessions = sessions
        self.careteam = careteam
        self.access = access  # objections + care team + emergency access in one round trip (access.py)
        self.cache = cache
        self.signer = signer
        self.audit = audit
        self.cookie_name = cookie_name
        self._cookie_lower = cookie_name.lower()
        self.instance_id = instance_id
        self.decision_ttl = decision_ttl
        self.max_header_bytes = max_header_bytes
        self.max_url_bytes = max_url_bytes
        self.extra_identity_headers = tuple(h.lower() for h in extra_identity_headers)
        # Header names only dpiguard may set, or that reroute the request (read as servers read them).
        self._identity_keys = frozenset(identity.header_key(h) for h in
                                        identity.DEFAULT_FOREIGN_IDENTITY_HEADERS + self.extra_identity_headers)
        self.require_tls = require_tls
        self.fhir = fhir  # dpiguard.decision.fhir.FhirEnforcer: requests under the base path of fhir.yaml
        self.mass_access = mass_access  # in-process checks only (massaccess.py)
        # Units of each user, valid now (for the identity headers); dropped on `user:U` events.
        self._units: dict[str, tuple[tuple[str, ...], float]] = {}
        self._units_lock = threading.Lock()
        self.units_ttl = 60.0
        # Cached decisions that many entries share (see _shared_value): one tuple for all of them.
        self._shared_values: dict[tuple, tuple] = {}

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
        policies = self.policies  # read once: a reload swaps the attribute, never mutates a set
        try:
            verdict = self._decide(req, io, now, policies)
        except NeedIO:
            raise
        except Exception as exc:  # fail closed: any unexpected error is a refusal
            return self.failed(req, exc, policies)
        return self._traced(req, verdict, policies, None)

    def failed(self, req: Incoming, exc: BaseException, policies: PolicySet | None = None) -> Verdict:
        """The refusal (503 ``internal_error``) of a request whose decision could not be taken: an error of
        its own, or of a read made for it (dpiguard.edge.prefetch); traced like any decision."""
        if isinstance(exc, redis.RedisError):
            metrics.redis_error("decision")
        verdict = Verdict(False, "internal_error", 503, f"dpiguard could not decide: {type(exc).__name__}")
        verdict.set_headers = {}
        return self._traced(req, verdict, self.policies if policies is None else policies,
                            f"{type(exc).__name__}: {exc}"[:500])

    def _traced(self, req: Incoming, verdict: Verdict, policies: PolicySet, detail: str | None) -> Verdict:
        verdict.policies = policies
        if verdict.pending:
            return verdict  # traced by the FHIR body check, once the body is in
        try:
            verdict.audit = self.trace(req, verdict, policies, detail)
        except AuditError:
            return audit_unavailable()
        return verdict

    def _decide(self, req: Incoming, io: bool, now: float, policies: PolicySet) -> Verdict:
        if self.require_tls and not req.tls:
            return Verdict(False, "tls_required", 400, "this service is only served over HTTPS")
        if req.method not in KNOWN_METHODS:
            return Verdict(False, "method_not_allowed", 405, f"method {req.method[:16]!r} is not allowed")
        if len(req.target) > self.max_url_bytes:
            return Verdict(False, "hostile_path", 414, "request URL too long")
        if req.header_bytes > self.max_header_bytes:
            return Verdict(False, "header_too_large", 431, "request headers too large")
        for name, value in req.headers.items():
            key = name.replace("_", "-") if "_" in name else name  # names are lower-case already
            if key.startswith(identity.RESERVED_PREFIX) or key in self._identity_keys:
                return Verdict(False, "forged_identity_header", 400,
                               f"header {name[:64]!r} may only be set by dpiguard")
            if key in ROUTING_HEADERS:
                return Verdict(False, "routing_header", 400,
                               f"header {name[:64]!r} would reroute the request: not accepted")
            if "\n" in value or "\r" in value:
                return Verdict(False, "malformed_header", 400,
                               f"header {name[:64]!r} is folded over several lines (obs-fold): not accepted")

        try:
            path, query, raw_query = parse_target(req.target)
        except HostileRequest as exc:
            return Verdict(False, exc.reason, 400, str(exc))
        if self.fhir is not None and policies.fhir is not None and policies.fhir.owns(path):
            return self.fhir.decide(self, policies, req, path, query, raw_query, io, now)
        try:
            match = policies.table.routes.match(req.method, path, query)
        except HostileRequest as exc:
            return Verdict(False, exc.reason, 400, str(exc))
        forward_target = path + ("?" + raw_query if raw_query else "")

        if match is not None and match.public:
            return Verdict(True, "public", forward_target=forward_target, public=True)

        session, token_source = self.session(req, io, now)
        if session is None:
            reason = "session_expired" if token_source else "not_authenticated"
            return Verdict(False, reason, 401, "please log in")
        verdict = Verdict(False, "", 403, user=session.user, roles=session.roles, session=session)
        if match is None:
            verdict.reason, verdict.message = "no_route", "this address is not open through dpiguard"
            return verdict
        verdict.patient, verdict.category, verdict.action, verdict.fhir = (
            match.patient, match.category, match.action, match.fhir)

        if not self.origin_ok(req, token_source):
            verdict.reason, verdict.message = "csrf_origin_mismatch", "cross-site request refused"
            return verdict
        refusal = authorize(policies.table, session.roles, match)
        if refusal is not None:
            verdict.reason, verdict.message = refusal
            return verdict
        if match.patient:
            decision = self.care_team(session.user, match.patient, match.category, match.action, io, now,
                                      policies, needs_care_team(policies.table, match))
            verdict.source = decision.source
            if not decision.member:
                verdict.units = self._known_units(session.user, now)  # the trace says which units (no I/O)
                verdict.reason = decision.reason
                verdict.message = REFUSAL_MESSAGES.get(decision.reason, decision.reason)
                return verdict
            verdict.break_glass = decision.break_glass
            verdict.objection_overridden = decision.objection_overridden

        return self.grant(req, verdict, session, token_source, forward_target, io, now)

    # -- public steps (the FHIR step uses them too) ------------------------------------------------
    def session_token(self, req: Incoming) -> tuple[str | None, str | None]:
        """The session id the client presented, and where: ('cookie'|'bearer'|None)."""
        return presented_token(req.headers, self.cookie_name)

    def session(self, req: Incoming, io: bool, now: float) -> tuple[Session | None, str | None]:
        """Step 3: the session of the request and where its id came from (None if there is none or it
        ended). Raises NeedIO when ``io`` is False and this instance does not have the session."""
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

    @staticmethod
    def origin_ok(req: Incoming, token_source: str | None) -> bool:
        """An unsafe request authenticated by the cookie must come from our own pages.

        SameSite=Strict already keeps the cookie off cross-site requests; browsers also say where an
        unsafe request comes from (Fetch Metadata), so cross-site ones are refused explicitly."""
        if req.method not in UNSAFE_METHODS or token_source != "cookie":
            return True
        return req.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")

    def care_team(self, user: str, patient: str, category: str, action: str, io: bool, now: float,
                  policies: PolicySet, care_team_required: bool = True) -> AccessDecision:
        """Step 5 for one patient: objection, care team, emergency access (cached; Redis behind).

        Three tiers: the decision itself; else the facts of the user and patient read for another category
        or action (:class:`~dpiguard.decision.access.AccessFacts`, in the same cache, dropped by the same
        invalidations), decided again in-process; else one Redis round trip, whose facts are kept too.
        Raises NeedIO when ``io`` is False and neither is cached."""
        key = (user, patient, category, action)
        cache = self.cache
        cached = cache.get(key, now)
        if cached is not None:
            return AccessDecision(*cached)
        generation = cache.generation()  # read before the facts: a drop after it rejects what is put
        facts = cache.get(facts_key(user, patient), now)
        if facts is not None:
            facts = AccessFacts.unpacked(facts)
        read = facts is None or not facts.usable_with(policies)
        if read:
            if not io:
                raise NeedIO((user, patient))
            generation = cache.generation()
            facts = self.access.read_facts(user, patient, now, policies)
        decision, valid_until, units = decide_from_facts(facts, user, patient, category, action,
                                                         care_team_required, now, policies)
        if read:  # kept once a decision could be taken from them (malformed data raised above)
            cache.put(facts_key(user, patient), facts.packed(), None, generation, now, decision=False)
        expires = facts.read_at + self.decision_ttl  # no longer than a decision taken at the read
        if valid_until is not None:
            expires = min(expires, valid_until)
        # Kept as a plain tuple, out of the collector's full walks of the heap, which hold the event loop
        # (AccessDecision.as_tuple; dpiguard.edge.runner.FreezeStartupHeap).
        cache.put(key, self._shared_value(decision), expires, generation, now)
        self._remember_units(user, tuple(units), now, generation)  # saves the units read that follows
        return decision

    def store_facts(self, user: str, patient: str, facts: AccessFacts, generation: int) -> bool:
        """Keep care-team facts read elsewhere (the event loop's own read: dpiguard.edge.prefetch) as
        :meth:`care_team` keeps its own, unless an invalidation came since ``generation`` was read (before
        the read) or the cache is off; returns whether they were kept. Malformed facts are kept too: each
        decision taken from them is then a refusal (``internal_error``), as one taken from a fresh read."""
        return self.cache.put(facts_key(user, patient), facts.packed(), None, generation, facts.read_at,
                              decision=False)

    def grant(self, req: Incoming, verdict: Verdict, session: Session, token_source: str | None,
              forward_target: str, io: bool, now: float) -> Verdict:
        """Step 6, allow: identity headers and signed assertion for the upstream, session credentials
        removed. May still refuse (mass-access throttle): check ``verdict.allowed``."""
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
        # dpiguard's session credentials never reach the DPI, whichever one this request logged in with
        # (a bearer request can carry someone else's session cookie, a cookie request a bearer token).
        cookie = req.headers.get("cookie")
        if cookie is not None and self._cookie_lower in cookie.lower():
            verdict.cookie_header = self._strip_cookie(cookie)
        verdict.drop_authorization = "authorization" in req.headers
        return verdict

    def trace(self, req: Incoming, v: Verdict, policies: PolicySet | None, detail: str | None = None) -> Future:
        """Step 7: queue the decision's record (schema: docs/audit.md); the caller awaits the future
        before answering or forwarding. ``policies``: the set the decision was taken with."""
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
        policies = policies or v.policies or self.policies
        return self.audit.submit({
            "event": "access",
            "request_id": req.request_id,
            "outcome": "allow" if v.allowed else "deny",
            "reason": v.reason,
            "user": v.user,
            "idp": v.session.source if v.session is not None else None,
            "rpps": (v.session.rpps or None) if v.session is not None else None,
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
            "policy_version": policies.version,
            "detail": detail,
            **(self._break_glass_fields(v) if v.break_glass is not None else {}),
        })

    # -- helpers -----------------------------------------------------------------------------------
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

    def _known_units(self, user: str, now: float) -> tuple[str, ...] | None:
        """The user's units if this instance knows them now (in-process only), else None."""
        with self._units_lock:
            hit = self._units.get(user)
        return hit[0] if hit is not None and hit[1] > now else None

    def _remember_units(self, user: str, units: tuple[str, ...], now: float, generation: int) -> None:
        if self.cache.enabled and self.cache.generation() == generation:
            with self._units_lock:
                self._units[user] = (units, now + self.units_ttl)

    def _shared_value(self, decision: AccessDecision) -> tuple:
        """The decision as the cache keeps it, one tuple for equal decisions that repeat across users and
        patients: a refusal, or an assignment of some kind (``assignment:KIND``, most decisions at the
        release profile's scale). A decision from a stay names the stay, so it does not repeat across
        patients, and one under an emergency access holds its grant: those keep their own tuple. The table
        is bounded (:data:`SHARED_VALUES_MAX`); tuples are immutable, so sharing them changes no decision."""
        value = decision.as_tuple()
        if decision.break_glass is not None or (decision.source or "").startswith("unit:"):
            return value
        table = self._shared_values
        shared = table.get(value)
        if shared is not None:
            return shared
        if len(table) >= SHARED_VALUES_MAX:
            table.clear()  # a data set with unusually many distinct kinds: start again
        table[value] = value
        return value

    def _strip_cookie(self, cookie: str) -> str:
        kept = [p.strip() for p in cookie.split(";")
                if p.strip() and p.strip().partition("=")[0].strip().lower() != self._cookie_lower]
        return "; ".join(kept)

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
