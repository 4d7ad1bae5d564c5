"""Issue 12, proved by an oracle: Hypothesis generates FHIR requests from several users through the real
proxy stack (dpiguard run = mitmproxy + the addon, real Redis, the demo FHIR DPI) and checks, for each:

1. **non-interference**: the same request, by the same user, through a second dpiguard in front of a
   second DPI from which every resource this user may not see was removed, gets the same answer
   (status, headers, body, paging links, totals; normalized only for origins, request ids, cursor
   expiry). Whatever dpiguard lets out, it would have let out had the forbidden data not existed;
2. **data oracle**: every resource in the answer is one the user may see, computed independently from
   the dataset (care team = the demo's unit stays and assignments; objections; categories from
   fhir.yaml and policy.csv), and the masked elements are absent;
3. **request oracle**: the DPI records what it received (tests/stack.py RecordingMiddleware): a write
   that reached it names only patients the user may write for, and no answer to a request naming a
   patient who objected to the user carries anything of that patient.

Runtime: profile ``ci`` (default: 200 examples, one to two minutes); ``HYPOTHESIS_PROFILE=large`` (3,000) for a
long run. deadline=None: the stack is real, latencies vary with the machine.
"""

from __future__ import annotations

import base64
import os
import re
from urllib.parse import quote, urlencode

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpiguard.careteam.objections import ObjectionStore
from dpiguard.decision.assertion import AssertionVerifier
from dpiguard.demo.app import create_app, start_in_thread
from dpiguard.demo.data import build_dataset
from dpiguard.services import careteam_store, load_policies, redis_client

from .redis_server import free_port
from .stack import RecordingMiddleware, build_stack

settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("large", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

pytestmark = pytest.mark.timeout(900)

USERS = {"inf.durand": ("nurse",), "acc.robert": ("reception",), "pha.petit": ("pharmacist",)}
OBJECTIONS = {"inf.durand": {"P0014"}, "acc.robert": {"P0011"}, "pha.petit": set()}
PIDS = ["P0001", "P0002", "P0011", "P0014", "P0003", "P9999"]
PATIENT_REF = re.compile(r"^(?:.*/)?Patient/([A-Za-z0-9-]+)$")
CURSOR = re.compile(r"_cursor=([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")
PID = re.compile(r"\bP\d{4}\b")


# -- the oracle: who may see what, from the dataset and the policy files -----------------------------------

class Oracle:
    def __init__(self, cfg, dataset, policies):
        self.policies = policies
        self.fhir = policies.fhir
        cardio = {p.patient_id for p in dataset.patients_in_units(["CARDIO"])}
        self.team = {"inf.durand": cardio, "acc.robert": set(), "pha.petit": {"P0001"}}
        self.tokens = {}
        for pid in PIDS[:-1]:
            a = dataset.records[pid].administrative
            self.tokens[pid] = {pid, a["insurance_number"], a["phone"]}

    @staticmethod
    def linked(resource) -> set[str]:
        found = set()
        if isinstance(resource, dict) and resource.get("resourceType") == "Patient":
            found.add(str(resource.get("id")))
        stack = [resource]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                ref = item.get("reference")
                if isinstance(ref, str) and (m := PATIENT_REF.match(ref.split("/_history")[0])):
                    found.add(m.group(1))
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        return found

    def may(self, user: str, resource: dict, action: str = "read") -> bool:
        category = self.fhir.category_of(resource)
        if category is None or not self.policies.permits(USERS[user], category, action):
            return False
        patients = self.linked(resource)
        if patients & OBJECTIONS[user]:
            return False
        if self.policies.category(category).care_team_required:
            return bool(patients) and patients <= self.team[user]
        return True

    def may_write_for(self, user: str, patient: str) -> bool:
        return patient in self.team[user] and patient not in OBJECTIONS[user]


def resources_in(body) -> list[dict]:
    out, stack = [], [body]
    while stack:
        item = stack.pop()
        if not isinstance(item, dict):
            continue
        if item.get("resourceType") == "Bundle":
            for entry in item.get("entry") or []:
                stack.append(entry.get("resource"))
                stack.append((entry.get("response") or {}).get("outcome"))
        elif "resourceType" in item and item["resourceType"] != "OperationOutcome":
            out.append(item)
    return out


# -- the two worlds ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    stack = build_stack(tmp_path_factory.mktemp("prop"))
    cfg = stack.config
    objections = ObjectionStore(redis_client(cfg), cfg.redis.prefix)
    for user, patients in OBJECTIONS.items():
        for pid in patients:
            objections.add(pid, "user", user)
    careteam_store(cfg).assign("pha.petit", "P0001")
    proxy_a = stack.start_proxy("a")
    dataset = build_dataset(2026)
    oracle = Oracle(cfg, dataset, load_policies(cfg))
    store_a = stack.upstream_app.app.extensions["dpiguard_demo_fhir"]
    verifier = AssertionVerifier.from_pem_file(stack.workdir / "secrets" / "assertion-ed25519.pub.pem", cfg.audience)
    tokens = {user: stack.login(proxy_a, user).cookies["dpiguard_session"] for user in USERS}
    second = {}
    servers = []
    for user in USERS:  # the world without what `user` may not see, behind its own dpiguard
        app = RecordingMiddleware(create_app(dataset, verifier))
        store = app.app.extensions["dpiguard_demo_fhir"]
        store.copy_from(store_a)
        for kind, ident in store.keys():
            resource = store.read(kind, ident)
            if resource is not None and not oracle.may(user, resource):
                store.forget(kind, ident)
        server, port = start_in_thread(app, "127.0.0.1", free_port())
        servers.append(server)
        proxy = stack.start_proxy(f"b-{user}", env={"DPIGUARD_UPSTREAM__URL": f"http://127.0.0.1:{port}",
                                                    "DPIGUARD_UPSTREAM__AUDIENCE": cfg.audience})
        second[user] = (proxy, app)
    ids = {}
    for kind in ("Observation", "Encounter", "MedicationRequest", "DocumentReference", "Condition",
                 "AllergyIntolerance", "ImagingStudy"):
        ids[kind] = sorted({r["id"] for r in store_a.all(kind) if PID.search(r["id"]) and
                            PID.search(r["id"]).group(0) in PIDS})[:40] + [f"P9999-{kind.lower()}-1"]
    ids["Patient"] = PIDS
    yield {"stack": stack, "a": proxy_a, "second": second, "oracle": oracle, "tokens": tokens, "ids": ids}
    for server in servers:
        server.shutdown()
    stack.close()


# -- requests --------------------------------------------------------------------------------------------

TYPES = ["Observation", "Encounter", "Patient", "MedicationRequest", "DocumentReference", "Condition",
         "AllergyIntolerance", "ImagingStudy"]
pid = st.sampled_from(PIDS)
ref = st.one_of(pid, pid.map(lambda p: f"Patient/{p}"), st.tuples(pid, pid).map(lambda t: f"{t[0]},{t[1]}"),
                st.just("Group/G1"), st.just("Patient?identifier=x"))
PARAMS = {
    "patient": ref, "subject": ref, "subject:Patient": pid, "subject:missing": st.sampled_from(["true", "false",
                                                                                             "Patient/P0002"]),
    "patient:missing": st.sampled_from(["true", ""]), "subject:identifier": pid.map(lambda p: f"urn:x|{p}"),
    "subject:Patient.name": st.sampled_from(["Barbier", "Roux"]), "patient.identifier": pid,
    "encounter": pid.map(lambda p: f"{p}-enc-1"), "code": st.sampled_from(["8867-4", "http://loinc.org|8867-4",
                                                                          "777-3", "84114007"]),
    "category": st.sampled_from(["vital-signs", "laboratory"]), "status": st.sampled_from(["final", "in-progress",
                                                                                         "active", "current"]),
    "_id": st.one_of(pid, st.tuples(pid, pid).map(",".join)), "identifier": pid, "family": st.sampled_from(
        ["Barbier", "Roux", "Laurent", "Bertrand", "Martin"]), "name": st.sampled_from(["Anne", "Camille"]),
    "gender": st.sampled_from(["female", "male"]), "_count": st.sampled_from(["1", "2", "3", "7", "0", "x"]),
    "_sort": st.sampled_from(["-date", "code", "family", "_id"]),
    "_include": st.sampled_from(["Observation:subject", "Observation:subject:Patient", "Encounter:subject",
                                 "Observation:encounter:Encounter", "*"]),
    "_revinclude": st.sampled_from(["Observation:subject", "Encounter:patient", "Provenance:target"]),
    "_offset": st.sampled_from(["1", "20"]), "_getpages": st.just("abc"), "_total": st.sampled_from(
        ["accurate", "none"]), "_summary": st.sampled_from(["count", "false"]), "_elements": st.just("id"),
    "_has:Observation:patient:code": st.just("8867-4"), "code:text": st.just("rate"), "code:not": st.just("1"),
    "focus": ref, "performer": ref, "_lastUpdated": st.just("gt2000-01-01"), "modality": st.just("CT"),
    "type": st.just("11506-3"), "bogus": st.just("1"),
}


@st.composite
def requests(draw, ids):
    kind = draw(st.sampled_from(["search", "search", "search", "post_search", "read", "batch", "write",
                                 "hostile"]))
    user = draw(st.sampled_from(sorted(USERS)))

    def a_search():
        rtype = draw(st.sampled_from(TYPES))
        names = draw(st.lists(st.sampled_from(sorted(PARAMS)), max_size=4))
        return f"{rtype}?" + urlencode([(n, draw(PARAMS[n])) for n in names])

    def a_read():
        rtype = draw(st.sampled_from(sorted(ids)))
        ident = draw(st.sampled_from(ids[rtype]))
        tail = draw(st.sampled_from(["", "", "/_history", "/_history/1", "/_history/2"]))
        return f"{rtype}/{ident}{tail}"

    if kind == "search":
        return user, "GET", "/fhir/" + a_search(), None, {}
    if kind == "post_search":
        rtype, _, form = a_search().partition("?")
        return user, "POST", f"/fhir/{rtype}/_search", form.encode(), {
            "content-type": "application/x-www-form-urlencoded"}
    if kind == "read":
        validators = draw(st.sampled_from([{}, {"if-none-match": 'W/"1"'}, {"range": "bytes=0-5"},
                                           {"if-modified-since": "Mon, 01 Jan 2001 00:00:00 GMT"}]))
        return user, "GET", "/fhir/" + a_read(), None, validators
    if kind == "batch":
        entries = [{"request": {"method": "GET", "url": a_search() if draw(st.booleans()) else a_read()}}
                   for _ in range(draw(st.integers(1, 3)))]
        return user, "POST", "/fhir", {"resourceType": "Bundle", "type": draw(st.sampled_from(["batch",
                                                                                              "transaction"])),
                                       "entry": entries}, {}
    if kind == "write":
        patient = draw(pid)
        vital = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"code": "8867-4"}]},
                 "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                           "code": "vital-signs"}]}],
                 "subject": {"reference": draw(st.sampled_from([f"Patient/{patient}", "Patient?identifier=x"]))}}
        target = draw(st.sampled_from(ids["Observation"]))
        return draw(st.sampled_from([
            (user, "POST", "/fhir/Observation", vital, {}),
            (user, "PATCH", f"/fhir/Observation/{target}",
             [{"op": "replace", "path": "/subject/reference", "value": f"Patient/{patient}"}],
             {"content-type": "application/json-patch+json"}),
            (user, "PATCH", f"/fhir/Observation/{target}",
             [{"op": "replace", "path": "/valueQuantity/value", "value": 99}],
             {"content-type": "application/json-patch+json"}),
            (user, "PUT", f"/fhir/Observation/{target}", dict(vital, id=target), {}),
            (user, "POST", "/fhir", {"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": vital, "request": {"method": "POST", "url": "Observation"}}]}, {}),
        ]))
    path = draw(st.sampled_from(["/fhir/Observation%2FP0002-bio-1", "/fhir/./Observation/P0002-bio-1",
                                 "/fhir//Observation", "/fhir/Observation/P0002-bio-1;x",
                                 "/fhir/Patient/P0002/../P0014", "/fhir/Observation/_history", "/fhir",
                                 "/fhir/Patient/P0014/$everything", "/fhir/Patient/P0002/Observation?code=777-3",
                                 "/fhir/Observation/P0002-bio-1/$meta", "/fhir/Observation?patient=P0014%2CP0001",
                                 "/fhir/Observation?patient=P0001&patient=P0014", "/fhir/Observation?_getpages=x",
                                 "/fhir/Observation?code=8867-4&_offset=3&_count=1", "/fhir/metadata?x=1",
                                 "/fhir/Patient?_has:Observation:patient:code=8867-4",
                                 "/fhir/Observation?patient=P0001;subject=P0002", "/fhir/%2e%2e/api/patients"]))
    header = draw(st.sampled_from([{}, {"X-Original-URL": "/fhir/Patient/P0014"}, {"X_Remote_User": "dr.martin"},
                                   {"X-Forwarded-Host": "evil.example"}, {"X-HTTP-Method-Override": "DELETE"},
                                   {"X-Rewrite-URL": "/fhir/Observation?patient=P0002"},
                                   {"If-None-Exist": "patient=P0002"}, {"X-DPIGuard-User": "dr.martin"}]))
    return user, draw(st.sampled_from(["GET", "HEAD", "OPTIONS"])), path, None, header


# -- checks ----------------------------------------------------------------------------------------------

def _cursor(match) -> str:
    payload = orjson.loads(base64.urlsafe_b64decode(match.group(1) + "=" * (-len(match.group(1)) % 4)))
    payload.pop("e", None)
    return "_cursor=" + quote(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS).decode())


def normalized(r: httpx.Response, origin: str) -> tuple:
    text = r.text.replace(origin, "ORIGIN")
    text = re.sub(r"request id [0-9a-f]{16}", "request id X", text)
    text = re.sub(r'"request_id":"[0-9a-f]{16}"', '"request_id":"X"', text)
    text = CURSOR.sub(_cursor, text)
    text = re.sub(r'"lastUpdated":"[^"]*"', '"lastUpdated":"T"', text)
    headers = sorted((k, CURSOR.sub(_cursor, v.replace(origin, "ORIGIN")) if k == "location" else "")
                     for k, v in r.headers.items() if k not in ("date", "content-length", "x-dpiguard-request-id"))
    return r.status_code, headers, text


def send(client: httpx.Client, proxy, token, method, path, body, headers) -> httpx.Response:
    hdrs = {"authorization": f"Bearer {token}", **headers}
    content = body if isinstance(body, bytes) else orjson.dumps(body) if body is not None else None
    if content is not None and "content-type" not in hdrs:
        hdrs["content-type"] = "application/fhir+json"
    return client.request(method, proxy.url + path, content=content, headers=hdrs)


def check_answer(w, user, method, path, body, r: httpx.Response) -> None:
    oracle, stack = w["oracle"], w["stack"]
    request_text = path + (body.decode() if isinstance(body, bytes) else orjson.dumps(body).decode()
                           if body is not None else "")
    parsed = None
    if r.content and "json" in r.headers.get("content-type", ""):
        parsed = r.json()
    for resource in resources_in(parsed):
        assert oracle.may(user, resource), f"{user} got {resource['resourceType']}/{resource.get('id')} via " \
                                           f"{method} {path}"
        if user == "pha.petit" and resource["resourceType"] == "Patient":
            assert "address" not in resource and "telecom" not in resource
    for patient in OBJECTIONS[user]:
        for token in oracle.tokens[patient]:
            if token not in request_text:
                assert token not in r.text, f"{token} of {patient} (objection) leaked to {user} via {path}"
    # What reached the DPI for this request (dpiguard's own reads included).
    request_id = r.headers.get("x-dpiguard-request-id")
    upstream = [x for x in stack.upstream_app.seen if x["headers"].get("x-dpiguard-request-id") == request_id]
    for seen in upstream:
        named = set(PID.findall(seen["raw_uri"] + seen["body"].decode("utf-8", "replace")))
        written = named if seen["method"] != "GET" else set()
        if seen["method"] == "POST" and seen["path"].rstrip("/") == "/fhir":  # a Bundle: its write entries
            entries = orjson.loads(seen["body"]).get("entry") or []
            written = set(PID.findall(orjson.dumps([e for e in entries if e["request"]["method"] != "GET"]).decode()))
        assert all(oracle.may_write_for(user, p) for p in written), f"write for {written} reached the DPI"
        for patient in named & OBJECTIONS[user]:
            for token in oracle.tokens[patient]:
                if token not in request_text:
                    assert token not in r.text


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=30) as c:
        yield c


def test_nothing_of_a_forbidden_patient_reaches_the_client(worlds, client):
    ids = worlds["ids"]

    ran = []

    @given(requests(ids))
    def run(example):
        ran.append(example)
        user, method, path, body, headers = example
        token = worlds["tokens"][user]
        proxy_b, _ = worlds["second"][user]
        a = send(client, worlds["a"], token, method, path, body, headers)
        b = send(client, proxy_b, token, method, path, body, headers)
        check_answer(worlds, user, method, path, body, a)
        assert normalized(a, worlds["a"].url) == normalized(b, proxy_b.url), (user, method, path)
        # Paging behaviour: follow dpiguard's links in both worlds.
        for _ in range(3):
            if a.status_code != 200 or "json" not in a.headers.get("content-type", ""):
                break
            nxt = [link["url"] for link in a.json().get("link", []) if link.get("relation") == "next"]
            nxt_b = [link["url"] for link in b.json().get("link", []) if link.get("relation") == "next"]
            assert len(nxt) == len(nxt_b)
            if not nxt:
                break
            a = send(client, worlds["a"], token, "GET", nxt[0][len(worlds["a"].url):], None, {})
            b = send(client, proxy_b, token, "GET", nxt_b[0][len(proxy_b.url):], None, {})
            check_answer(worlds, user, "GET", nxt[0], None, a)
            assert normalized(a, worlds["a"].url) == normalized(b, proxy_b.url), (user, "next of", path)

    run()
    print(f"\n{len(ran)} examples, {len({(u, m, p) for u, m, p, _, _ in ran})} distinct requests")
    assert len(ran) >= 20  # the oracle did run