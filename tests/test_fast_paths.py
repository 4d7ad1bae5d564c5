"""Fast paths taken for speed (issue 14) must decide exactly what the code they shortcut decided.

- The walks over a FHIR resource that find the patients it names (and the references it holds) skip
  scalars; the oracles below are the straightforward walks (every value of every object and array
  visited), as the functions were written before; Hypothesis searches JSON trees, with references to
  patients and to other resources at any depth, for a difference.
- A search page remembers the patients of each visible entry from its judgement, and walks again only
  an entry a mask changed; the oracle is the walk of every visible (masked) resource, as the trace
  record's ``patients`` was computed before. The judge's masks, cached per category, are the ones the
  FHIR mapping gives.
- A query parameter with nothing to decode is returned as it is; the oracle is the decoding loop.
- A session handed out by the local cache is a copy made without ``__init__``; it must equal
  ``dataclasses.replace`` and share nothing mutable with the cached one.
- :func:`~dpiguard.edge.flows.forward` rebuilds the request's header list in one pass; the oracle is
  one mitmproxy ``Headers`` call per edit, as it was written before (same values per header name).
- :meth:`~dpiguard.policy.routes.RouteTable.match` tries only the routes of the request's method that
  can match its first path segment, and answers a query-less request without reading the query; the
  oracle is the scan of every route in table order, as it was written before (same route, patient and
  ambiguity refusal for any generated table, path and query).

Pure logic: no server involved.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpiguard.auth.sessions import Session
from dpiguard.decision.verdict import Verdict
from dpiguard.edge.flows import STRIP_KEY, forward
from dpiguard.fhir.compartment import patient_of_reference
from dpiguard.fhir.response import (
    BundleRewriter,
    CheckedAnswer,
    Judge,
    _prune_includes,
    _references,
    collect_page,
    patient_links,
)
from dpiguard.policy.paths import HostileRequest, _decode_query_part
from dpiguard.policy.routes import (
    PATIENT_ID_RE,
    Route,
    RouteTable,
    _patient_param_values,
    _patient_reference,
    _pattern_segments,
)


def oracle_patient_links(resource):
    found, unreadable = set(), False
    if isinstance(resource, dict) and resource.get("resourceType") == "Patient" and "id" in resource:
        patient = patient_of_reference(str(resource["id"]), bare_is_patient=True)
        if patient:
            found.add(patient)
        else:
            unreadable = True
    stack = [resource]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("reference")
            if isinstance(ref, str) and not ref.startswith("#"):
                patient = patient_of_reference(ref, bare_is_patient=False)
                if patient:
                    found.add(patient)
                elif patient is False or (patient is None and item.get("type") == "Patient"):
                    unreadable = True
            elif item.get("type") == "Patient" and "identifier" in item:
                unreadable = True
            stack.extend(v for k, v in item.items() if k != "reference")
        elif isinstance(item, list):
            stack.extend(item)
    return found, unreadable


def oracle_references(resource):
    found = set()
    stack = [resource]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("reference")
            if isinstance(ref, str) and "/" in ref:
                parts = ref.split("/")
                if len(parts) >= 4 and parts[-2] == "_history":
                    parts = parts[:-2]
                found.add("/".join(parts[-2:]))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


REFERENCES = st.sampled_from([
    "Patient/P1", "Patient/P2", "Patient/P1/_history/3", "http://dpi.example/fhir/Patient/P3", "Patient/",
    "Patient/a b", "patient/P1", "#contained", "Observation/o1", "Encounter/e1/_history/2", "P4", "",
    "Group/g1", "Patient/P1?x=1", "urn:uuid:1234",
])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False),
                    st.text(max_size=6), REFERENCES)
KEYS = st.sampled_from(["reference", "type", "identifier", "subject", "resourceType", "id", "entry",
                        "resource", "code", "value", "performer", "contained", "x"])
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(KEYS, children, max_size=5),
        # objects shaped like references, patients and logical references
        st.fixed_dictionaries({"reference": st.one_of(REFERENCES, children)},
                              optional={"type": st.sampled_from(["Patient", "Group"]), "display": children}),
        st.fixed_dictionaries({"type": st.just("Patient"), "identifier": children}),
        st.fixed_dictionaries({"resourceType": st.sampled_from(["Patient", "Observation"]),
                               "id": st.one_of(st.sampled_from(["P1", "P 2", "", "P9"]), st.integers())},
                              optional={"subject": children, "contained": st.lists(children, max_size=2)}),
    ),
    max_leaves=30,
)


@settings(max_examples=600, deadline=None)
@given(JSON)
def test_patient_links_finds_what_the_full_walk_finds(resource):
    assert patient_links(resource) == oracle_patient_links(resource)


@settings(max_examples=600, deadline=None)
@given(JSON)
def test_references_finds_what_the_full_walk_finds(resource):
    assert _references(resource) == oracle_references(resource)


def oracle_prune(entries):
    matches = [e for e in entries if (e.get("search") or {}).get("mode", "match") == "match"]
    keys = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in matches
            if isinstance(e.get("resource"), dict) and "resourceType" in e["resource"] and "id" in e["resource"]}
    referenced = set().union(*(oracle_references(e.get("resource")) for e in matches)) if matches else set()
    kept = []
    for entry in entries:
        if (entry.get("search") or {}).get("mode", "match") == "match":
            kept.append(entry)
            continue
        r = entry.get("resource")
        key = f"{r['resourceType']}/{r['id']}" if isinstance(r, dict) and "resourceType" in r and "id" in r else None
        if key in referenced or oracle_references(r) & keys:
            kept.append(entry)
    return kept


ENTRY = st.fixed_dictionaries(
    {"resource": st.fixed_dictionaries({"resourceType": st.sampled_from(["Patient", "Observation", "Encounter"]),
                                        "id": st.sampled_from(["P1", "o1", "e1", "x"])},
                                       optional={"subject": st.fixed_dictionaries({"reference": REFERENCES})})},
    optional={"search": st.fixed_dictionaries({}, optional={"mode": st.sampled_from(["match", "include", "outcome"])})},
)


@settings(max_examples=400, deadline=None)
@given(st.lists(ENTRY, max_size=6))
def test_included_entries_kept_exactly_as_before(entries):
    assert _prune_includes(entries) == oracle_prune(entries)


class _Rules:
    """The FHIR mapping's two answers a Judge asks: every Observation is biology; masks as given."""

    def __init__(self, masks: list[str]):
        self.mask_elements, self.asked = masks, 0

    def category_of(self, resource):
        return "biology" if resource.get("resourceType") == "Observation" else None

    def masked(self, roles, category, permits):
        self.asked += 1
        return {"Observation": list(self.mask_elements)} if self.mask_elements else {}


class _Policy:
    def permits(self, roles, category, action):
        return True

    def category(self, name):
        return type("Category", (), {"care_team_required": True})()


OBSERVATION = st.fixed_dictionaries(
    {"resourceType": st.just("Observation"), "id": st.sampled_from(["o1", "o2", "o3"]),
     "subject": st.fixed_dictionaries({"reference": st.sampled_from(["Patient/P1", "Patient/P2"])})},
    optional={"performer": st.lists(st.fixed_dictionaries({"reference": REFERENCES}), max_size=2),
              "note": st.lists(st.fixed_dictionaries({}, optional={"authorReference": JSON, "text": st.text(max_size=3)}),
                               max_size=2),
              "focus": JSON},
)


@settings(max_examples=500, deadline=None)
@given(st.lists(OBSERVATION, max_size=6),
       st.lists(st.sampled_from(["performer", "note.authorReference", "focus", "status"]), unique=True, max_size=3))
def test_search_entry_patients_are_those_of_the_visible_resource(resources, masks):
    rules = _Rules(masks)
    judge = Judge(fhir=rules, policy=_Policy(), roles=("nurse", "doctor"), access=lambda *a: (True, "allowed"))
    out = CheckedAnswer(None, 200)
    bundle = {"resourceType": "Bundle", "type": "searchset",
              "entry": [{"fullUrl": f"http://dpi/fhir/Observation/{r['id']}", "resource": r} for r in resources]}
    matches, _ = collect_page(bundle, judge, BundleRewriter("http://dpi", "https://proxy"), out)
    for entry in matches:
        walked, _ = patient_links(entry["resource"])  # the resource as the client gets it
        known = out.entry_patients.get(id(entry))
        if known is not None:
            assert set(known) == walked
    assert rules.asked <= 1  # one category: the masks are computed once per answer


def oracle_decode(raw: str) -> str:
    data = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "%":
            pair = raw[i + 1:i + 3]
            if len(pair) != 2 or not set(pair) <= set("0123456789abcdefABCDEF"):
                raise HostileRequest("hostile_path", "bad percent-encoding")
            data.append(int(pair, 16))
            i += 3
            continue
        if ord(char) > 0x7E:
            raise HostileRequest("hostile_path", "non-ASCII")
        data.extend(b" " if char == "+" else char.encode("ascii"))
        i += 1
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise HostileRequest("hostile_path", "not UTF-8") from None
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise HostileRequest("hostile_path", "control character")
    return text


QUERY_TEXT = st.lists(st.one_of(st.characters(min_codepoint=0, max_codepoint=0x80),
                                 st.sampled_from(["%", "+", "%2", "%20", "%0A", "%C3%A9", "%ZZ", "é", "\x7f"])),
                      max_size=8).map("".join)


@settings(max_examples=1500, deadline=None)
@given(QUERY_TEXT)
def test_query_part_decoding_unchanged(raw):
    try:
        expected = oracle_decode(raw)
    except HostileRequest:
        with pytest.raises(HostileRequest):
            _decode_query_part(raw)
        return
    assert _decode_query_part(raw) == expected


def test_session_copy_is_replace_and_independent():
    s = Session("h", "inf.dupont", ("nurse",), 1.0, 2.0, 3.0, "csrf", touched_at=4.0, login_step=5,
                display_name="Dupont", source="ldap", rpps="10001234567")
    c = s.copy()
    assert c == dataclasses.replace(s) and c is not s and type(c) is Session
    c.last_seen = 99.0
    assert s.last_seen == 3.0
    assert {f.name for f in dataclasses.fields(Session)} == set(vars(c))


# -- forward(): the request headers rebuilt in one pass ---------------------------------------------

def oracle_forward_headers(flow, v) -> None:
    """forward()'s header edits as they were written before: one mitmproxy Headers call per edit."""
    request = flow.request
    for raw_name in flow.metadata.get(STRIP_KEY, ()):
        request.headers.pop(raw_name.decode("latin-1"), None)
    for name in v.drop_headers:
        request.headers.pop(name, None)
    if v.public:
        request.headers.pop("cookie", None)
        request.headers.pop("authorization", None)
        return
    for name, value in v.set_headers.items():
        request.headers[name] = value
    if v.cookie_header is not None:
        if v.cookie_header:
            request.headers["cookie"] = v.cookie_header
        else:
            request.headers.pop("cookie", None)
    if v.drop_authorization:
        request.headers.pop("authorization", None)


def _by_name(headers) -> dict[bytes, list[bytes]]:
    """Header values per case-folded name, in order (the order of different names carries no meaning)."""
    out: dict[bytes, list[bytes]] = {}
    for name, value in headers.fields:
        out.setdefault(name.lower(), []).append(value)
    return out


NAMES = st.sampled_from(["Host", "Cookie", "cookie", "Authorization", "X-DPIGuard-User", "x-dpiguard-user",
                         "X-Forwarded-For", "X_Forwarded_For", "Accept", "If-None-Match", "Prefer",
                         "X-DPIGuard-Roles", "Forwarded"])
VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x17F, exclude_characters="\x7f"), max_size=12)


@settings(max_examples=800, deadline=None)
@given(fields=st.lists(st.tuples(NAMES, VALUES), max_size=10),
       strip=st.lists(NAMES, max_size=3), drop=st.lists(NAMES, max_size=2),
       set_headers=st.dictionaries(NAMES, VALUES, max_size=4),
       cookie=st.none() | VALUES, drop_authorization=st.booleans(), public=st.booleans())
def test_forward_edits_headers_as_one_call_per_edit_did(fields, strip, drop, set_headers, cookie,
                                                        drop_authorization, public):
    from mitmproxy.test import tflow

    raw = [(n.encode(), val.encode("utf-8", "surrogateescape")) for n, val in fields]
    v = Verdict(True, "allowed", forward_target="/x?y=1", set_headers=set_headers, cookie_header=cookie,
                drop_authorization=drop_authorization, public=public, drop_headers=tuple(drop))
    flows = []
    for _ in range(2):
        flow = tflow.tflow()
        flow.request.headers.fields = tuple(raw)
        if strip:
            flow.metadata[STRIP_KEY] = [n.encode() for n in strip]
        flows.append(flow)
    forward(flows[0], v)
    flows[1].request.path = v.forward_target
    oracle_forward_headers(flows[1], v)
    assert flows[0].request.path == "/x?y=1"
    assert _by_name(flows[0].request.headers) == _by_name(flows[1].request.headers)


# -- RouteTable.match: candidate routes by method and first segment ---------------------------------

def oracle_resolve_patient(route, captured, query):
    pairs = _patient_param_values(query, route.patient_query)
    for key, value in pairs:
        if "," in value:
            raise HostileRequest("ambiguous_patient", "several")
    if len(pairs) > 1:
        raise HostileRequest("ambiguous_patient", "twice")
    if captured is not None:
        if pairs and _patient_reference(pairs[0][1]) != captured:
            raise HostileRequest("ambiguous_patient", "other")
        return captured
    if route.patient_query is None or not pairs:
        return None
    key, value = pairs[0]
    if key != route.patient_query:
        return None
    patient = _patient_reference(value)
    return patient if PATIENT_ID_RE.match(patient) else None


def oracle_match(table: RouteTable, patient_bound, method, path, query):
    """Every route in table order, as RouteTable.match was written before."""
    path_segments = [] if path == "/" else path[1:].split("/")
    for route in table.routes:
        if route.method != method:
            continue
        matched, captured = route.match_path(path_segments)
        if not matched:
            continue
        if route.public:
            return ("public", route.name)
        patient = oracle_resolve_patient(route, captured, query)
        if patient is None and patient_bound.get(route.category, True):
            return None
        return (route.name, route.category, route.action, patient, route.fhir)
    return None


def _as_outcome(m):
    if m is None:
        return None
    return ("public", m.route_name) if m.public else (m.route_name, m.category, m.action, m.patient, m.fhir)


def _outcome(fn):
    try:
        return fn()
    except HostileRequest as exc:
        return ("hostile", exc.reason)


LITERALS = ["api", "patients", "static", "fhir", "P1", "notes"]
SEGMENT = st.sampled_from(LITERALS + ["{patient}", "*"])
PATTERN = st.builds(lambda segs, rest: "/" + "/".join(segs + (["**"] if rest else [])),
                    st.lists(SEGMENT, max_size=3), st.booleans())
ROUTE_SPEC = st.tuples(PATTERN, st.sampled_from(["GET", "POST", "HEAD"]), st.booleans(),
                       st.sampled_from(["biology", "directory"]), st.sampled_from([None, "patient", "ipp"]))
PATH = st.lists(st.sampled_from(LITERALS + ["P2", "x", "A-9", "bad id"]), max_size=4).map(lambda s: "/" + "/".join(s))
QUERY = st.dictionaries(st.sampled_from(["patient", "ipp", "subject:Patient", "code", "Patient_ID"]),
                        st.lists(st.sampled_from(["P1", "P2", "Patient/P1", "P1,P2", "x y"]), min_size=1, max_size=2),
                        max_size=3)


@settings(max_examples=1500, deadline=None)
@given(specs=st.lists(ROUTE_SPEC, max_size=8), method=st.sampled_from(["GET", "POST", "HEAD", "PUT"]),
       path=PATH, query=QUERY)
def test_route_match_finds_the_route_the_full_scan_finds(specs, method, path, query):
    routes = []
    for line, (pattern, route_method, public, category, patient_query) in enumerate(specs):
        try:
            segments = _pattern_segments(pattern)
        except ValueError:
            continue
        routes.append(Route(f"r{line}", pattern, route_method, public, None if public else category,
                            None if public else "read", patient_query, False, segments, line))
    bound = {"biology": True, "directory": False}
    table = RouteTable(routes, bound)

    assert _outcome(lambda: _as_outcome(table.match(method, path, query))) == _outcome(lambda: oracle_match(table, bound, method, path, query))


def test_route_match_of_the_shipped_routes_unchanged():
    from dpiguard.policy.snapshot import PolicySet

    policies = PolicySet.load(Path(__file__).resolve().parent.parent / "policies")
    table = policies.table.routes
    bound = {name: c.patient_bound for name, c in policies.categories.items()}
    targets = ["/", "/patients", "/patients/P1", "/patients/P1/biology", "/api/patients/P1/notes",
               "/static/app.js", "/static", "/favicon.ico", "/patients/P1/unknown", "/api", "/api/patients/bad id"]
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE"):
        for path in targets:
            for query in ({}, {"patient": ["P1"]}, {"patient": ["P2"]}, {"ipp": ["P1,P2"]}):
                got = _outcome(lambda: _as_outcome(table.match(method, path, query)))
                assert got == _outcome(lambda: oracle_match(table, bound, method, path, query)), (method, path, query)
