"""The FHIR step of the decision: the pipeline asks it about requests under the FHIR base path, the
proxy edge about request bodies (writes) and answers.

Three moments, all fail closed:

1. ``decide`` (requestheaders, no I/O in the common case): session, request analysis
   (:mod:`dpiguard.fhir.compartment`), role x category (policy.csv), care team of every patient the request names.
   Reads by id and searches are forwarded with a :class:`FhirContext` for the response check.
   Writes are "pending": decided by ``decide_body`` once the body is in.
2. ``decide_body`` (request hook, worker thread): the patients in the body and, for update / patch /
   delete, in the stored resource (read from the DPI with the user's identity); every entry of a
   transaction or batch. One failure refuses the whole request: nothing reaches the DPI.
3. ``process_response`` (response hook): every returned resource is checked (its patient links and its
   category), searches are filtered, elements masked, links rewritten to the proxy; one trace record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

from dpiguard.decision.pipeline import Pipeline
from dpiguard.decision.verdict import Incoming, Verdict
from dpiguard.fhir.compartment import FhirRefusal, FhirRequest, analyze, fhir_resource
from dpiguard.fhir.response import BundleRewriter, Judge, patient_links, process
from dpiguard.policy.paths import HostileRequest, normalize_path, parse_query
from dpiguard.policy.snapshot import PolicySet

MAX_BODY = 5 * 1024 * 1024
STATUS_OF = {"not_in_care_team": 403, "category_not_permitted": 403, "fhir_type_not_mapped": 403,
             "fhir_no_patient": 403, "fhir_invalid_response": 502}


@dataclass
class FhirContext:
    request: FhirRequest
    filtered_search: bool
    proxy_origin: str
    categories: tuple[str, ...] = ()
    detail: dict = field(default_factory=dict)


Fetcher = Callable[[str, str, dict], "dict | None"]


class FhirEnforcer:
    """The FHIR step. Holds no policy: each call uses the policy set of its decision (``policies.fhir``
    for the FHIR mapping, ``policies.table`` for roles and categories)."""

    def __init__(self, fetcher: Fetcher | None, upstream_origin: str, public_origin: str = ""):
        self.fetcher = fetcher
        self.upstream_origin = upstream_origin.rstrip("/")
        # mitmproxy has already replaced the client's Host header by the upstream's when our hooks run,
        # so links back to dpiguard use the configured public origin (fhir.public_origin).
        self.public_origin = public_origin.rstrip("/")
        # Called with the raw body of answers holding a Patient resource (privacy learner: a queue append).
        self.on_patient_answer = None

    # -- 1. request headers --------------------------------------------------------------------------
    def decide(self, pipe: Pipeline, policies: PolicySet, req: Incoming, path: str, query: dict, raw_query: str,
               io: bool, now: float) -> Verdict:
        fhir = policies.fhir
        session, token_source = pipe.session(req, io, now)
        if session is None:
            v = Verdict(False, "session_expired" if token_source else "not_authenticated", 401, "please log in")
            v.fhir = True
            return v
        v = Verdict(False, "", 403, user=session.user, roles=session.roles, session=session, fhir=True)
        try:
            freq = analyze(req.method, fhir.segments(path), query, types=fhir.types,
                           allowed_params=fhir.allow_parameters, operations=fhir.operations)
        except FhirRefusal as exc:
            return _refuse(v, exc.reason, exc.message, exc.status, exc.issue)
        v.action = freq.action
        v.patient = ",".join(freq.patients) or None
        if not pipe.origin_ok(req, token_source):
            return _refuse(v, "csrf_origin_mismatch", "cross-site request refused")
        ctx = FhirContext(freq, freq.interaction == "search" and not freq.scoped, self.public_origin)
        if freq.interaction not in ("capabilities", "bundle"):
            if freq.interaction == "operation":
                categories = sorted({c for rule in fhir.types.values() for c in rule.categories})
            else:
                rule = fhir.types[freq.resource_type]
                categories = [rule.category] + sorted(rule.categories - {rule.category})
            permitted = [c for c in categories if policies.permits(session.roles, c, freq.action)]
            if not permitted:
                v.category = categories[0]
                return _refuse(v, "category_not_permitted", f"your role may not {freq.action} "
                                                            f"{freq.resource_type} resources")
            v.category = permitted[0]
            ctx.categories = tuple(permitted)
            if ctx.filtered_search and fhir.types[freq.resource_type].search != "filter":
                return _refuse(v, "fhir_search_not_scoped",
                               f"a {freq.resource_type} search must name the patient (patient=...)")
            probe = self._masked_probe(policies, session.roles, freq, permitted)
            if probe:
                return _refuse(v, "fhir_forbidden_parameter",
                               f"search parameter {probe!r} is about an element your role does not see")
            strict = freq.interaction == "operation"  # $everything: the care team, whatever the categories
            for patient in freq.patients:
                if not self._passes(pipe, policies, session.user, patient, permitted, freq.action, io, now, strict):
                    v.patient = patient
                    return _refuse(v, "not_in_care_team", "you are not in this patient's care team")
        forward = path + ("?" + raw_query if raw_query else "")
        pipe.grant(req, v, session, token_source, forward, io, now)
        if not v.allowed:
            return v  # refused at the last step (mass-access throttle): traced now, never left pending
        v.fhir_context = ctx
        v.pending = freq.needs_body or freq.needs_stored
        return v

    @staticmethod
    def _passes(pipe: Pipeline, policies: PolicySet, user: str, patient: str, categories, action: str, io: bool,
                now: float, strict: bool = False) -> bool:
        """The patient passes if, for one category the role may use, no care team is needed or the user
        is in it (the response check then applies each resource's own category). ``strict``: the user
        must be in the care team as soon as one of the categories needs it."""
        needing = [c for c in categories if policies.category(c).care_team_required]
        if needing and (len(needing) == len(categories) or strict):
            return pipe.care_team(user, patient, needing[0], action, io, now, policies).member
        # a patient objection refuses whatever the category
        free = [c for c in categories if c not in needing]
        return pipe.care_team(user, patient, free[0], action, io, now, policies, False).member

    @staticmethod
    def _masked_probe(policies: PolicySet, roles, freq: FhirRequest, categories) -> str | None:
        """A search parameter on an element masked for the user (Patient?address=...) is refused."""
        if freq.interaction != "search":
            return None
        for category in categories:
            masked = policies.fhir.masked(roles, category, lambda r, c=category: policies.permits([r], c, "read"))
            for element in masked.get(freq.resource_type, []):
                top = element.split(".")[0].lower()
                aliases = {top} | ({"phone", "email"} if top == "telecom" else set())
                for param in freq.params:
                    if any(param == a or param.startswith(a + "-") for a in aliases):
                        return param
        return None

    # -- 2. request body (writes) ----------------------------------------------------------------------
    def decide_body(self, pipe: Pipeline, req: Incoming, v: Verdict, body: bytes, now: float | None = None) -> Verdict:
        """Complete a pending FHIR write; traces the final decision. Runs in a worker thread."""
        now = time.time() if now is None else now
        try:
            reason, message = self._check_write(pipe, v, body, now)
            if reason:
                _refuse(v, reason, message, STATUS_OF.get(reason, 400 if reason.startswith("fhir_invalid") else 403),
                        "invalid" if reason.startswith("fhir_invalid") else "forbidden")
            detail = None
        except Exception as exc:  # fail closed
            _refuse(v, "internal_error", "dpiguard could not check this FHIR write", 503, "exception")
            detail = f"{type(exc).__name__}: {exc}"[:500]
        v.pending = False
        try:
            v.audit = pipe.trace(req, v, v.policies, detail)  # the edge awaits its durability
        except Exception:
            _refuse(v, "internal_error", "the access trace could not be written; request refused", 503, "exception")
        return v

    def _check_write(self, pipe: Pipeline, v: Verdict, body: bytes, now: float) -> tuple[str | None, str]:
        ctx: FhirContext = v.fhir_context
        freq = ctx.request
        if len(body) > MAX_BODY:
            return "fhir_invalid_request", "request body too large"
        parsed = None
        if freq.needs_body:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                return "fhir_invalid_request", "the body is not valid JSON"
        judge = self._judge(pipe, v, True, now)
        if freq.interaction == "bundle":
            return self._check_bundle(pipe, v, judge, parsed, now)
        return self._check_entry(v, judge, freq, parsed)

    def _check_entry(self, v: Verdict, judge: Judge, freq: FhirRequest, resource: Any) -> tuple[str | None, str]:
        if freq.interaction in ("create", "update"):
            if not isinstance(resource, dict) or resource.get("resourceType") != freq.resource_type:
                return "fhir_invalid_request", f"the body must be a {freq.resource_type} resource"
            if freq.interaction == "update" and resource.get("id") not in (None, freq.resource_id):
                return "fhir_invalid_request", "the id in the body does not match the URL"
            verdict = judge.resource(resource, "write")
            if not verdict.ok:
                return verdict.reason, "the resource sent is about a patient or data you may not write"
            for patient in freq.patients:  # Patient/P in the URL
                if patient not in verdict.patients and verdict.patients:
                    return "fhir_invalid_request", "the patient in the body does not match the URL"
        if freq.needs_stored:
            stored = self._fetch(v, freq.resource_type, freq.resource_id)
            if stored is not None:
                verdict = judge.resource(stored, "write")
                if not verdict.ok:
                    return verdict.reason, "the stored resource is about a patient or data you may not write"
                if freq.interaction == "patch":
                    patients, unreadable = patient_links(resource)
                    if unreadable:
                        return "fhir_no_patient", "the patch names a patient dpiguard cannot read"
                    for patient in patients:
                        if not judge.member(patient, verdict.category, "write"):
                            return "not_in_care_team", "the patch moves the resource to another patient"
            elif freq.interaction in ("patch", "delete"):
                return None, ""  # nothing stored: the DPI answers 404
        return None, ""

    def _check_bundle(self, pipe: Pipeline, v: Verdict, judge: Judge, bundle: Any, now: float) -> tuple[str | None, str]:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or \
                bundle.get("type") not in ("transaction", "batch"):
            return "fhir_invalid_request", "only transaction and batch Bundles may be posted to the base"
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            return "fhir_invalid_request", "Bundle.entry must be a list"
        fhir = v.policies.fhir
        for number, entry in enumerate(entries, start=1):
            request = entry.get("request") if isinstance(entry, dict) else None
            if not isinstance(request, dict) or not isinstance(request.get("url"), str):
                return "fhir_invalid_request", f"entry {number}: request.method and request.url are required"
            method = str(request.get("method", "")).upper()
            if method not in ("GET", "POST", "PUT", "DELETE"):
                return "fhir_invalid_request", f"entry {number}: method {method[:10]!r} is not allowed in a Bundle"
            url = request["url"]
            if "://" in url:
                return "fhir_invalid_request", f"entry {number}: use relative URLs (Type/id)"
            raw_path, _, raw_query = url.partition("?")
            try:
                segments = normalize_path("/" + raw_path.lstrip("/"))[1:].split("/")
                query = parse_query(raw_query)
            except HostileRequest as exc:
                return "fhir_invalid_request", f"entry {number}: {exc}"
            try:
                freq = analyze(method, segments, query, types=fhir.types,
                               allowed_params=fhir.allow_parameters, operations=frozenset())
            except FhirRefusal as exc:
                return exc.reason, f"entry {number}: {exc.message}"
            if freq.interaction in ("bundle", "operation", "capabilities"):
                return "fhir_not_supported", f"entry {number}: not allowed inside a Bundle"
            rule = fhir.types[freq.resource_type]
            permitted = [c for c in sorted(rule.categories) if v.policies.permits(v.roles, c, freq.action)]
            if not permitted:
                return "category_not_permitted", f"entry {number}: your role may not {freq.action} {freq.resource_type}"
            if freq.interaction == "search" and not freq.scoped and rule.search != "filter":
                return "fhir_search_not_scoped", f"entry {number}: the search must name the patient"
            for patient in freq.patients:
                if not self._passes(pipe, v.policies, v.user, patient, permitted, freq.action, True, now):
                    return "not_in_care_team", f"entry {number}: you are not in this patient's care team"
            if freq.action == "write":
                reason, message = self._check_entry(v, judge, freq, entry.get("resource"))
                if reason:
                    return reason, f"entry {number}: {message}"
        return None, ""

    def _fetch(self, v: Verdict, kind: str, ident: str) -> dict | None:
        if self.fetcher is None:
            raise RuntimeError("no upstream fetcher configured for FHIR writes")
        return self.fetcher(f"{v.policies.fhir.base_path}/{kind}/{ident}", ident, dict(v.set_headers))

    def _judge(self, pipe: Pipeline, v: Verdict, io: bool, now: float) -> Judge:
        user = v.user
        policies = v.policies
        return Judge(fhir=policies.fhir, policy=policies, roles=tuple(v.roles),
                     member=lambda patient, category, action: pipe.care_team(
                         user, patient, category, action, io, now, policies).member)

    # -- 3. response ------------------------------------------------------------------------------------
    def process_response(self, pipe: Pipeline, req: Incoming, v: Verdict, status: int, content_type: str,
                         body: bytes, io: bool, now: float | None = None) -> tuple[int, bytes, dict]:
        """(status, body, trace record) for the client. Raises NeedIO when io is False and a decision
        is cold; raises on anything unexpected (the addon then answers 503)."""
        now = time.time() if now is None else now
        ctx: FhirContext = v.fhir_context
        fhir_type, fhir_id = fhir_resource(req.target.partition("?")[0])
        record = {"event": "fhir_response", "request_id": req.request_id, "user": v.user,
                  "roles": list(v.roles), "units": list(v.units or ()), "method": req.method[:16],
                  "path": req.target[:512], "fhir_type": fhir_type, "fhir_id": fhir_id,
                  "category": v.category, "action": v.action, "client": req.client_ip,
                  "interaction": ctx.request.interaction, "resource_type": ctx.request.resource_type,
                  "upstream_status": status, "policy_version": v.policies.version,
                  "fhir_policy_version": v.policies.fhir.version}
        if not body.strip():
            if 200 <= status < 300 and ctx.request.interaction in ("read", "vread", "search", "history", "operation"):
                raise ValueError("empty FHIR answer to a read")
            record.update(outcome="allow", reason="allowed", returned=0, hidden=0)
            return status, body, record
        if "json" not in content_type.lower():
            raise ValueError(f"FHIR answer is not JSON ({content_type[:64]})")
        parsed = orjson.loads(body)
        if self.on_patient_answer is not None and b'"Patient"' in body:
            self.on_patient_answer(body)
        if ctx.request.interaction == "capabilities":
            if not isinstance(parsed, dict) or parsed.get("resourceType") not in ("CapabilityStatement",
                                                                                   "OperationOutcome"):
                raise ValueError("metadata did not answer a CapabilityStatement")
            record.update(outcome="allow", reason="allowed", returned=1, hidden=0)
            return status, body, record
        rewriter = BundleRewriter(self.upstream_origin, ctx.proxy_origin)
        result = process(parsed, status, self._judge(pipe, v, io, now), rewriter,
                         filtered_search=ctx.filtered_search)
        record.update(returned=result.returned, hidden=result.hidden, hidden_reasons=result.hidden_reasons,
                      masked=sorted(result.masked), patients=sorted(result.patients)[:100])
        if ctx.request.interaction == "history" and result.hidden and not result.refused_reason:
            # The history of one resource: any hidden version refuses the whole answer, like a read.
            result.refused_reason = next(iter(result.hidden_reasons))
        if result.refused_reason:
            reason = result.refused_reason
            record.update(outcome="deny", reason=reason)
            outcome = _outcome(reason, _message(reason), req.request_id)
            return STATUS_OF.get(reason, 403), orjson.dumps(outcome), record
        record.update(outcome="allow", reason="filtered" if result.hidden else "allowed")
        return status, orjson.dumps(result.body), record


def _refuse(v: Verdict, reason: str, message: str, status: int = 403, issue: str = "forbidden") -> Verdict:
    v.allowed, v.reason, v.message, v.status, v.fhir_issue = False, reason, message, status, issue
    v.set_headers = {}
    return v


def _message(reason: str) -> str:
    return {"not_in_care_team": "you are not in this patient's care team",
            "category_not_permitted": "your role does not give access to this kind of data",
            "fhir_no_patient": "this resource names no patient dpiguard can check",
            "fhir_type_not_mapped": "this resource type is not open through dpiguard"}.get(reason, reason)


def _outcome(reason: str, message: str, request_id: str) -> dict:
    from dpiguard.fhir.response import operation_outcome
    return operation_outcome(reason, STATUS_OF.get(reason, 403), message, request_id,
                             "exception" if reason == "fhir_invalid_response" else "forbidden")
