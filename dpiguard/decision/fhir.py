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

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

from dpiguard.decision.pipeline import Pipeline
from dpiguard.decision.verdict import Incoming, NeedIO, Verdict
from dpiguard.fhir.compartment import FhirRefusal, FhirRequest, analyze, fhir_resource
from dpiguard.fhir.cursor import Cursor, CursorError, CursorSigner
from dpiguard.fhir.response import (
    BundleRewriter,
    CheckedAnswer,
    Judge,
    collect_page,
    next_link,
    not_found_outcome,
    operation_outcome,
    page_bundle,
    patient_links,
    process,
)
from dpiguard.fhir.writes import (
    PatchError,
    apply_json_patch,
    has_conditional_reference,
    local_reference_map,
    resolve_local_references,
)
from dpiguard.policy.paths import HostileRequest, normalize_path, parse_query
from dpiguard.policy.snapshot import PolicySet

MAX_BODY = 5 * 1024 * 1024
STATUS_OF = {"not_in_care_team": 403, "patient_objection": 403, "category_not_permitted": 403,
             "fhir_type_not_mapped": 403, "fhir_no_patient": 403, "fhir_invalid_response": 502, "fhir_not_found": 404}


@dataclass
class FhirContext:
    request: FhirRequest
    filtered_search: bool
    proxy_origin: str
    categories: tuple[str, ...] = ()
    detail: dict = field(default_factory=dict)
    path: str = ""  # the FHIR path searched (/fhir/Observation)
    client_query: str = ""  # the search as the client wrote it, without _count and _cursor
    page_offset: int = 0  # dpiguard's paging, in visible matches
    page_size: int = 0


DEFAULT_PAGE = 20
UPSTREAM_PAGE = 500  # entries asked of the DPI per page while dpiguard fills its own pages
MAX_SCAN = 10000  # entries of the DPI's answer read at most to fill one page (else fhir_search_too_broad)
NOT_FORWARDED = frozenset({"_count", "_total", "_cursor"})
CONDITIONAL_HEADERS = ("if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "if-range", "range")


def _without(raw_query: str, names: frozenset[str]) -> str:
    """The raw query without the parameters ``names`` (compared decoded, so %5Fcount is _count too)."""
    kept = []
    for piece in raw_query.split("&"):
        if not piece:
            continue
        name = parse_query(piece.partition("=")[0] + "=")
        if not set(name) & names:
            kept.append(piece)
    return "&".join(kept)


Fetcher = Callable[[str, str, dict], "dict | None"]


class FhirEnforcer:
    """The FHIR step. Holds no policy: each call uses the policy set of its decision (``policies.fhir``
    for the FHIR mapping, ``policies.table`` for roles and categories)."""

    def __init__(self, fetcher: Fetcher | None, upstream_origin: str, public_origin: str = "",
                 cursors: CursorSigner | None = None, upstream_page: int = UPSTREAM_PAGE, max_scan: int = MAX_SCAN):
        self.fetcher = fetcher
        self.cursors = cursors or CursorSigner(secrets.token_bytes(32))  # per process if no key is given
        self.upstream_page, self.max_scan = upstream_page, max_scan
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
        if "if-none-exist" in req.headers:  # conditional create: a search whose answer is a status
            return _refuse(v, "fhir_not_supported", "conditional create (If-None-Exist) is not open through dpiguard",
                           403, "not-supported")
        if req.method in ("GET", "DELETE") and (req.headers.get("content-length", "0") != "0"
                                                or "transfer-encoding" in req.headers):
            return _refuse(v, "fhir_invalid_request", f"a FHIR {req.method} takes no body", 400, "invalid")
        offset, size = 0, None
        if "_cursor" in query:  # a page link of dpiguard's: the search it continues, re-decided whole
            if set(query) - {"_cursor", "_format", "_pretty"} or len(query["_cursor"]) != 1:
                return _refuse(v, "fhir_forbidden_parameter", "a page link of dpiguard takes no other parameter")
            try:
                cursor = self.cursors.read(query["_cursor"][0], session.user, path, now)
                raw_query, query = cursor.query, parse_query(cursor.query)
            except (CursorError, HostileRequest, orjson.JSONDecodeError) as exc:
                return _refuse(v, "fhir_invalid_cursor", str(exc) if isinstance(exc, CursorError) else
                               "malformed page link", 400, "invalid")
            if "_cursor" in query:
                return _refuse(v, "fhir_invalid_cursor", "malformed page link", 400, "invalid")
            offset, size = cursor.offset, cursor.size
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
        refusal = self._check_request(pipe, policies, v, freq, ctx, io, now)
        if refusal is not None:
            return refusal
        if freq.post_search:  # the parameters are in the body: decided once it is in
            ctx.path, ctx.client_query = path.rsplit("/_search", 1)[0], raw_query
            raw_query = ""
        elif freq.interaction in ("search", "operation"):
            # dpiguard pages the answer itself: the DPI is asked for large pages, the client's _count
            # and _total are read by dpiguard and never forwarded.
            ctx.path, ctx.client_query = path, _without(raw_query, NOT_FORWARDED)
            ctx.page_offset, ctx.page_size = offset, size or freq.count or DEFAULT_PAGE
            raw_query = "&".join(q for q in (ctx.client_query, f"_count={self.upstream_page}") if q)
        forward = path + ("?" + raw_query if raw_query else "")
        pipe.grant(req, v, session, token_source, forward, io, now)
        if not v.allowed:
            return v  # refused at the last step (mass-access throttle): traced now, never left pending
        v.fhir_context = ctx
        v.pending = freq.needs_body or freq.needs_stored
        # Validators and ranges of the client would let the DPI answer 304/206/412 about a resource
        # before dpiguard sees it (an existence and version oracle): never forwarded.
        v.drop_headers = CONDITIONAL_HEADERS
        return v

    def _check_request(self, pipe: Pipeline, policies: PolicySet, v: Verdict, freq: FhirRequest, ctx: FhirContext,
                       io: bool, now: float) -> Verdict | None:
        """Role x category, search mode, masked elements, every patient named: the refusal, or None."""
        if freq.interaction in ("capabilities", "bundle"):
            return None
        fhir = policies.fhir
        if freq.interaction == "operation":
            categories = sorted({c for rule in fhir.types.values() for c in rule.categories})
        else:
            rule = fhir.types[freq.resource_type]
            categories = [rule.category] + sorted(rule.categories - {rule.category})
        permitted = [c for c in categories if policies.permits(v.roles, c, freq.action)]
        if not permitted:
            v.category = categories[0]
            return _refuse(v, "category_not_permitted", f"your role may not {freq.action} "
                                                        f"{freq.resource_type} resources")
        v.category = permitted[0]
        ctx.categories = tuple(permitted)
        ctx.filtered_search = freq.interaction == "search" and not freq.scoped
        if ctx.filtered_search and not freq.post_search and fhir.types[freq.resource_type].search != "filter":
            return _refuse(v, "fhir_search_not_scoped",
                           f"a {freq.resource_type} search must name the patient (patient=...)")
        probe = self._masked_probe(policies, v.roles, freq, permitted)
        if probe:
            return _refuse(v, "fhir_forbidden_parameter",
                           f"search parameter {probe!r} is about an element your role does not see")
        strict = freq.interaction == "operation"  # $everything: the care team, whatever the categories
        for patient in freq.patients:
            decision = self._passes(pipe, policies, v.user, patient, permitted, freq.action, io, now, strict)
            if not decision.member:
                v.patient = patient
                return _refuse(v, decision.reason, _message(decision.reason))
        return None

    @staticmethod
    def _passes(pipe: Pipeline, policies: PolicySet, user: str, patient: str, categories, action: str, io: bool,
                now: float, strict: bool = False):
        """The patient passes if, for one category the role may use, no care team is needed or the user
        is in it (the response check then applies each resource's own category). ``strict``: the user
        must be in the care team as soon as one of the categories needs it."""
        needing = [c for c in categories if policies.category(c).care_team_required]
        if needing and (len(needing) == len(categories) or strict):
            return pipe.care_team(user, patient, needing[0], action, io, now, policies)
        # a patient objection refuses whatever the category
        free = [c for c in categories if c not in needing]
        return pipe.care_team(user, patient, free[0], action, io, now, policies, False)

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
            reason, message = self._check_write(pipe, req, v, body, now)
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

    def _check_write(self, pipe: Pipeline, req: Incoming, v: Verdict, body: bytes,
                     now: float) -> tuple[str | None, str]:
        ctx: FhirContext = v.fhir_context
        freq = ctx.request
        if len(body) > MAX_BODY:
            return "fhir_invalid_request", "request body too large"
        parsed = None
        if freq.needs_body and not freq.post_search:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                return "fhir_invalid_request", "the body is not valid JSON"
        if freq.post_search:
            return self._check_post_search(pipe, req, v, body, now)
        judge = self._judge(pipe, v, True, now)
        if freq.interaction == "bundle":
            return self._check_bundle(pipe, v, judge, parsed, now)
        content_type = req.headers.get("content-type", "").split(";")[0].strip().lower()
        reason, message, version = self._check_entry(v, judge, freq, parsed, content_type)
        if not reason and version and freq.needs_stored:
            # The DPI applies the write only to the version dpiguard checked (no change in between).
            v.set_headers["If-Match"] = f'W/"{version}"'
        return reason, message

    def _check_post_search(self, pipe: Pipeline, req: Incoming, v: Verdict, body: bytes,
                           now: float) -> tuple[str | None, str]:
        """``POST Type/_search``: the form's parameters and the URL's, read as one search (default-deny,
        patients, masks), forwarded to the DPI as a GET and paged by dpiguard like any search."""
        ctx: FhirContext = v.fhir_context
        content_type = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            return "fhir_invalid_request", "a POST _search takes an application/x-www-form-urlencoded body"
        try:
            form = body.decode("ascii")
            merged_raw = "&".join(q for q in (ctx.client_query, form) if q)
            merged = parse_query(merged_raw)
        except (UnicodeDecodeError, HostileRequest):
            return "fhir_invalid_request", "malformed search form"
        fhir = v.policies.fhir
        try:
            freq = analyze("GET", fhir.segments(ctx.path), merged, types=fhir.types,
                           allowed_params=fhir.allow_parameters, operations=fhir.operations)
        except FhirRefusal as exc:
            return exc.reason, exc.message
        if freq.interaction != "search" or "_cursor" in merged:
            return "fhir_invalid_request", "malformed search form"
        v.patient = ",".join(freq.patients) or None
        refusal = self._check_request(pipe, v.policies, v, freq, ctx, True, now)
        if refusal is not None:
            return refusal.reason, refusal.message
        ctx.request = freq
        ctx.client_query = _without(merged_raw, NOT_FORWARDED)
        ctx.page_offset, ctx.page_size = 0, freq.count or DEFAULT_PAGE
        query = "&".join(q for q in (ctx.client_query, f"_count={self.upstream_page}") if q)
        v.forward_target = f"{ctx.path}?{query}"
        v.forward_method, v.forward_body = "GET", b""
        return None, ""

    def _check_entry(self, v: Verdict, judge: Judge, freq: FhirRequest, resource: Any,
                     content_type: str = "application/fhir+json") -> tuple[str | None, str, str | None]:
        """(refusal reason or None, message, version of the stored resource checked)."""
        if freq.interaction in ("create", "update"):
            reason, message = self._check_resource(judge, freq, resource)
            if reason:
                return reason, message, None
        if freq.interaction == "patch" and content_type != "application/json-patch+json":
            if content_type in ("application/fhir+json", "application/json") and isinstance(resource, dict):
                return "fhir_not_supported", "FHIRPath Patch is not supported through dpiguard: use JSON Patch", None
            return "fhir_invalid_request", "a patch must be a JSON Patch (application/json-patch+json)", None
        if not freq.needs_stored:
            return None, "", None
        stored = self._fetch(v, freq.resource_type, freq.resource_id)
        if stored is None:
            # Nothing stored: answered like a resource the user may not see (no existence oracle);
            # update-as-create is not open through dpiguard (create with POST).
            v.conceal = True
            return "fhir_not_found", "no such resource, or not one you may see", None
        if not isinstance(stored, dict) or stored.get("resourceType") != freq.resource_type or \
                stored.get("id") != freq.resource_id:
            raise ValueError("the DPI answered another resource than the one asked for")
        verdict = judge.resource(stored, "write")
        if not verdict.ok:
            v.conceal = True  # same answer as a missing resource; the trace has the reason
            return verdict.reason, "the stored resource is about a patient or data you may not write", None
        version = str((stored.get("meta") or {}).get("versionId") or "") or None
        if freq.interaction == "patch":
            try:
                result = apply_json_patch(stored, resource)
            except PatchError as exc:
                return "fhir_invalid_request", f"the patch cannot be applied: {exc}", None
            reason, message = self._check_resource(judge, freq, result)
            if reason:
                return reason, "the patched resource: " + message, None
        return None, "", version

    @staticmethod
    def _check_resource(judge: Judge, freq: FhirRequest, resource: Any) -> tuple[str | None, str]:
        """A resource as it will be stored (created, replaced or patched) is judged like a read."""
        if not isinstance(resource, dict) or resource.get("resourceType") != freq.resource_type:
            return "fhir_invalid_request", f"the body must be a {freq.resource_type} resource"
        if freq.interaction in ("update", "patch") and resource.get("id") not in (None, freq.resource_id):
            return "fhir_invalid_request", "the id in the body does not match the URL"
        if has_conditional_reference(resource):
            return "fhir_conditional_reference", "conditional references (Patient?identifier=...) cannot be " \
                                                 "checked: reference the patient by its id"
        verdict = judge.resource(resource, "write")
        if not verdict.ok:
            return verdict.reason, "the resource is about a patient or data you may not write"
        for patient in freq.patients:  # Patient/P in the URL
            if patient not in verdict.patients and verdict.patients:
                return "fhir_invalid_request", "the patient in the body does not match the URL"
        return None, ""

    def _check_bundle(self, pipe: Pipeline, v: Verdict, judge: Judge, bundle: Any, now: float) -> tuple[str | None, str]:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or \
                bundle.get("type") not in ("transaction", "batch"):
            return "fhir_invalid_request", "only transaction and batch Bundles may be posted to the base"
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            return "fhir_invalid_request", "Bundle.entry must be a list"
        fhir = v.policies.fhir
        local = local_reference_map(entries)
        if local is None:
            return "fhir_invalid_request", "a Bundle entry has a malformed or repeated fullUrl"
        changed = False
        for number, entry in enumerate(entries, start=1):
            request = entry.get("request") if isinstance(entry, dict) else None
            if not isinstance(request, dict) or not isinstance(request.get("url"), str):
                return "fhir_invalid_request", f"entry {number}: request.method and request.url are required"
            method = str(request.get("method", "")).upper()
            if method not in ("GET", "POST", "PUT", "DELETE"):
                return "fhir_invalid_request", f"entry {number}: method {method[:10]!r} is not allowed in a Bundle"
            url = request["url"]
            if set(request) & {"ifNoneExist", "ifNoneMatch", "ifModifiedSince"} or \
                    ("ifMatch" in request and method not in ("PUT", "DELETE")):
                return "fhir_not_supported", f"entry {number}: conditional requests are not open inside a Bundle"
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
                decision = self._passes(pipe, v.policies, v.user, patient, permitted, freq.action, True, now)
                if not decision.member:
                    return decision.reason, f"entry {number}: {_message(decision.reason)}"
            if method == "GET" and bundle["type"] == "transaction":
                # All or nothing at the DPI: a read of a missing resource fails the whole transaction, one
                # of a withheld resource does not; the difference would tell that it exists.
                return "fhir_not_supported", f"entry {number}: reads are not open inside a transaction; use a batch"
            if freq.interaction == "search":
                # One page of the DPI's, filtered: how many entries are left would tell how many were
                # hidden. Searches are paged by dpiguard only as plain searches.
                return "fhir_not_supported", f"entry {number}: searches are not open inside a Bundle; run them " \
                                             "as plain searches"
            if freq.action == "write":
                resource = resolve_local_references(entry.get("resource"), local)
                reason, message, version = self._check_entry(v, judge, freq, resource)
                if reason:
                    return reason, f"entry {number}: {message}"
                if version and freq.needs_stored:
                    request["ifMatch"] = f'W/"{version}"'
                    changed = True
        if changed:
            v.forward_body = orjson.dumps(bundle)  # with the versions checked (ifMatch)
        return None, ""

    def _fetch(self, v: Verdict, kind: str, ident: str) -> dict | None:
        if self.fetcher is None:
            raise RuntimeError("no upstream fetcher configured for FHIR writes")
        return self.fetcher(f"{v.policies.fhir.base_path}/{kind}/{ident}", ident, dict(v.set_headers))

    def _judge(self, pipe: Pipeline, v: Verdict, io: bool, now: float) -> Judge:
        user = v.user
        policies = v.policies
        return Judge(fhir=policies.fhir, policy=policies, roles=tuple(v.roles),
                     access=lambda patient, category, action, required: _access(pipe.care_team(
                         user, patient, category, action, io, now, policies, required)))

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
        by_id = ctx.request.interaction in ("read", "vread", "history") or ctx.request.needs_stored
        if by_id and status in (404, 410):
            # Missing and forbidden answer alike (no existence oracle); the trace tells them apart.
            record.update(outcome="allow", reason="not_found", returned=0, hidden=0)
            return 404, orjson.dumps(not_found_outcome(req.request_id)), record
        if not body.strip():
            if ctx.request.interaction in ("read", "vread", "search", "history", "operation"):
                raise ValueError(f"empty FHIR answer ({status}) to a read")
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
        judge = self._judge(pipe, v, io, now)
        interaction = ctx.request.interaction
        if interaction in ("search", "operation", "read", "vread", "history") and not 200 <= status < 300:
            # The DPI's own error about a search or a read may depend on what it holds (a hidden resource
            # it failed on, a resource it refused itself): only dpiguard's answer, by status class.
            record.update(outcome="deny", reason="fhir_upstream_error", returned=0, hidden=0)
            if status < 500 and interaction in ("read", "vread", "history"):
                return 404, orjson.dumps(not_found_outcome(req.request_id)), record
            code = 400 if status < 500 else 502
            outcome = operation_outcome("fhir_upstream_error", code, f"the DPI could not answer this request "
                                        f"({'client' if code == 400 else 'server'} error)", req.request_id,
                                        "invalid" if code == 400 else "exception")
            return code, orjson.dumps(outcome), record
        if interaction in ("search", "operation"):
            return self._search_answer(pipe, req, v, parsed, judge, rewriter, io, now, record)
        result = process(parsed, status, judge, rewriter, filtered_search=ctx.filtered_search,
                         request_id=req.request_id)
        record.update(returned=result.returned, hidden=result.hidden, hidden_reasons=result.hidden_reasons,
                      masked=sorted(result.masked), patients=sorted(result.patients)[:100])
        if interaction == "history" and result.hidden and not result.refused_reason:
            # The history of one resource: any hidden version refuses the whole answer, like a read.
            result.refused_reason = next(iter(result.hidden_reasons))
        if result.refused_reason:
            reason = result.refused_reason
            record.update(outcome="deny", reason=reason)
            if by_id:
                record["concealed"] = True  # answered like a missing resource
                return 404, orjson.dumps(not_found_outcome(req.request_id)), record
            outcome = _outcome(reason, _message(reason), req.request_id)
            return STATUS_OF.get(reason, 403), orjson.dumps(outcome), record
        record.update(outcome="allow", reason="filtered" if result.hidden else "allowed")
        return status, orjson.dumps(result.body), record

    def _search_answer(self, pipe: Pipeline, req: Incoming, v: Verdict, first: Any, judge: Judge,
                       rewriter: BundleRewriter, io: bool, now: float, record: dict) -> tuple[int, bytes, dict]:
        """dpiguard's page of a search: the DPI's pages are read (following its ``next`` links, with the
        user's identity) until the visible matches fill the page asked for plus one, or the search ends.
        Nothing of the DPI's paging (links, offsets, tokens, total) reaches the client."""
        ctx: FhirContext = v.fhir_context
        offset, size = ctx.page_offset, ctx.page_size
        need = offset + size + 1
        out = CheckedAnswer(None, 200, request_id=req.request_id)
        matches: list = []
        includes: list = []
        page, scanned = first, 0
        while True:
            got, extra = collect_page(page, judge, rewriter, out)
            matches += got
            includes += extra
            scanned += len(page.get("entry") or [])
            following = next_link(page)
            if len(matches) >= need or following is None:
                break
            if scanned >= self.max_scan:
                record.update(outcome="deny", reason="fhir_search_too_broad", returned=0, hidden=out.hidden,
                              hidden_reasons=out.hidden_reasons, scanned=scanned)
                outcome = operation_outcome("fhir_search_too_broad", 403, "this search matches too many "
                                            "resources: narrow it (a patient, a code, a date)", req.request_id,
                                            "too-costly")
                return 403, orjson.dumps(outcome), record
            if not io:
                raise NeedIO()  # the rest is read from the DPI in a worker thread
            page = self._fetch_page(v, following)
        exhausted = len(matches) < need
        links = [{"relation": "self", "url": self._page_url(ctx, v.user, offset, size, now)}]
        if len(matches) > offset + size:
            links.append({"relation": "next", "url": self._page_url(ctx, v.user, offset + size, size, now)})
        if offset > 0:
            links.append({"relation": "previous",
                          "url": self._page_url(ctx, v.user, max(0, offset - size), size, now)})
        bundle = page_bundle(matches, includes, offset, size, exhausted, links)
        visible = bundle["entry"]
        patients: set[str] = set()
        for entry in visible:  # what each visible entry names, as the client gets it (masks applied)
            known = out.entry_patients.get(id(entry))
            patients.update(known if known is not None else patient_links(entry["resource"])[0])
        record.update(outcome="allow", reason="filtered" if out.hidden else "allowed", returned=len(visible),
                      hidden=out.hidden, hidden_reasons=out.hidden_reasons, masked=sorted(out.masked),
                      patients=sorted(patients)[:100], scanned=scanned, page_offset=offset, page_size=size)
        return 200, orjson.dumps(bundle), record

    def _page_url(self, ctx: FhirContext, user: str | None, offset: int, size: int, now: float) -> str:
        base = ctx.proxy_origin + ctx.path
        if offset == 0 and ctx.page_offset == 0 and ctx.client_query == "" and size == DEFAULT_PAGE:
            return base
        token = self.cursors.issue(user or "", Cursor(ctx.path, ctx.client_query, offset, size), now)
        return f"{base}?_cursor={token}"

    def _fetch_page(self, v: Verdict, url: str) -> Any:
        """The DPI's next page of a search, from its own link (only on the DPI, under the FHIR base)."""
        prefix = self.upstream_origin + v.policies.fhir.base_path + "/"
        if not url.startswith(prefix) or "#" in url:
            raise ValueError("the DPI's next link points outside its FHIR base")
        if self.fetcher is None:
            raise RuntimeError("no upstream fetcher configured for FHIR paging")
        headers = {k: val for k, val in v.set_headers.items() if k.lower().startswith("x-dpiguard-")}
        page = self.fetcher(url[len(self.upstream_origin):], "", headers)
        if page is None:
            raise ValueError("the DPI's next page is gone")
        return page


def _access(decision) -> tuple[bool, str]:
    return decision.member, decision.reason


def _refuse(v: Verdict, reason: str, message: str, status: int = 403, issue: str = "forbidden") -> Verdict:
    v.allowed, v.reason, v.message, v.status, v.fhir_issue = False, reason, message, status, issue
    v.set_headers = {}
    return v


def _message(reason: str) -> str:
    return {"not_in_care_team": "you are not in this patient's care team",
            "patient_objection": "the patient has objected to your access to their record",
            "category_not_permitted": "your role does not give access to this kind of data",
            "fhir_no_patient": "this resource names no patient dpiguard can check",
            "fhir_type_not_mapped": "this resource type is not open through dpiguard"}.get(reason, reason)


def _outcome(reason: str, message: str, request_id: str) -> dict:
    return operation_outcome(reason, STATUS_OF.get(reason, 403), message, request_id,
                             "exception" if reason == "fhir_invalid_response" else "forbidden")
