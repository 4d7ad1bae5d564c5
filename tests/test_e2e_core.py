"""End to end through a real mitmproxy running dpiguard, a real Redis process and the real demo DPI."""

from __future__ import annotations

import html
import re
import socket
import time

import httpx
import pytest

from dpiguard.audit.chain import read_records
from dpiguard.demo.runner import DEMO_PASSWORD
from dpiguard.services import careteam_store, session_store

from .stack import build_stack

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("stack"))
    s.start_proxy("a")
    s.start_proxy("b")
    yield s
    s.close()


@pytest.fixture
def proxy(stack):
    return stack.proxies[0]


def records(stack, **match):
    out = []
    for rec in read_records(stack.audit_path):
        if all(rec.get(k) == v for k, v in match.items()):
            out.append(rec)
    return out


# -- the three access decisions of the issue ------------------------------------------------------

def test_nurse_reads_biology_of_patient_in_her_unit(stack, proxy):
    c = stack.client(proxy, "inf.durand")
    r = c.get("/api/patients/P0001/biology")
    assert r.status_code == 200, r.text
    assert "P0001" in r.text
    seen = stack.upstream_app.seen[-1]
    # The upstream got dpiguard's identity, a signed assertion, and never the session id.
    assert seen["headers"]["x-dpiguard-user"] == "inf.durand"
    assert seen["headers"]["x-dpiguard-roles"] == "nurse"
    assert "CARDIO" in seen["headers"]["x-dpiguard-units"]
    assert seen["headers"]["x-dpiguard-assertion"].count(".") == 2
    assert "authorization" not in seen["headers"]
    assert "dpiguard_session" not in seen["headers"].get("cookie", "")


def test_nurse_refused_for_patient_of_another_unit(stack, proxy):
    c = stack.client(proxy, "inf.durand")
    before = len(stack.upstream_app.seen)
    r = c.get("/api/patients/P0002/biology")
    assert r.status_code == 403
    body = r.json()
    assert body["error"] == "not_in_care_team"
    assert re.fullmatch(r"[0-9a-f]{16}", body["request_id"])
    assert len(stack.upstream_app.seen) == before  # nothing reached the DPI
    rec = records(stack, request_id=body["request_id"])
    assert len(rec) == 1
    rec = rec[0]
    assert rec["outcome"] == "deny" and rec["reason"] == "not_in_care_team"
    for key in ("time", "user", "roles", "patient", "category", "action", "method", "path", "client", "instance"):
        assert rec[key], key
    assert rec["patient"] == "P0002" and rec["category"] == "biology" and rec["action"] == "read"
    assert rec["instance"] == "a"


def test_reception_refused_clinical_notes(stack, proxy):
    c = stack.client(proxy, "acc.robert")
    r = c.get("/api/patients/P0001/notes")
    assert r.status_code == 403
    assert r.json()["error"] == "category_not_permitted"
    # reception does see administrative data
    assert c.get("/api/patients/P0001").status_code == 200


def test_refusal_as_html_page_for_browsers(stack, proxy):
    c = stack.client(proxy, "acc.robert")
    r = c.get("/patients/P0001/notes", headers={"accept": "text/html"})
    assert r.status_code == 403
    assert r.headers["content-type"].startswith("text/html")
    assert "category_not_permitted" in r.text and "Référence" in r.text and '<html lang="fr">' in r.text
    assert "Votre rôle ne donne pas accès à ce type de données." in r.text  # a sentence; the code is small
    assert "dossier P0001" in r.text and "Notes médicales et infirmières" in r.text  # which patient, what data
    assert "acc.robert" in r.text  # who is logged in


XSS = '"><script>alert(1)</script>'


def _hidden(page: str, name: str) -> str:
    """The value a hidden form field sends back (what a browser reads: entities decoded)."""
    return html.unescape(re.search(rf'<input type="hidden" name="{name}" value="([^"]*)">', page).group(1))


def test_login_page_shows_hostile_next_as_text(stack, proxy):
    r = httpx.get(f"{proxy.url}/_dpiguard/login", params={"next": XSS})  # not a local path: "/"
    assert r.status_code == 200 and XSS not in r.text and "<script" not in r.text
    assert _hidden(r.text, "next") == "/"
    r = httpx.get(f"{proxy.url}/_dpiguard/login", params={"next": "/patients/P0001" + XSS})
    assert r.status_code == 200 and XSS not in r.text and "<script" not in r.text
    assert _hidden(r.text, "next") == "/patients/P0001" + XSS  # shown as text, sent back unchanged


def test_refusal_page_shows_hostile_target_as_text(stack, proxy):
    # inf.durand is offered emergency access to P0002: the form carries the address back (next).
    token = stack.client(proxy, "inf.durand").cookies.get("dpiguard_session")
    status, raw = _raw_get(proxy.port, f"/patients/P0002/biology?x={XSS}'", {
        "Cookie": f"dpiguard_session={token}", "Accept": "text/html"})
    page = raw.decode()
    assert status == 403 and "Accès d'urgence (bris de glace)" in page, page
    assert XSS not in page and "<script" not in page
    assert _hidden(page, "next") == f"/patients/P0002/biology?x={XSS}'"


def test_refusal_as_fhir_operation_outcome(stack, proxy):
    c = stack.client(proxy, "inf.durand")
    r = c.get("/fhir/Observation", params={"patient": "P0002"})
    assert r.status_code == 403
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["details"]["coding"][0]["code"] == "not_in_care_team"
    ok = c.get("/fhir/Observation", params={"patient": "P0001"})
    assert ok.status_code == 200 and ok.json()["resourceType"] == "Bundle"


# -- no session ------------------------------------------------------------------------------------

def test_no_session_browser_redirected_api_401(stack, proxy):
    r = httpx.get(f"{proxy.url}/patients/P0001", headers={"accept": "text/html"})
    assert r.status_code == 302
    assert r.headers["location"].startswith("/_dpiguard/login?next=%2Fpatients%2FP0001")
    r = httpx.get(f"{proxy.url}/api/patients/P0001")
    assert r.status_code == 401
    assert r.json()["error"] == "not_authenticated"
    r = httpx.get(f"{proxy.url}/api/patients/P0001", headers={"authorization": "Bearer forged-token"})
    assert r.status_code == 401


def test_static_assets_are_public(stack, proxy):
    r = httpx.get(f"{proxy.url}/static/style.css")
    assert r.status_code == 200


# -- browser login with the form ----------------------------------------------------------------------

def test_form_login_sets_strict_cookie_and_rotates(stack, proxy):
    c = httpx.Client(base_url=proxy.url, timeout=10)
    page = c.get("/_dpiguard/login?next=/patients/P0001")
    assert page.status_code == 200 and 'name="totp"' in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    # Without the CSRF cookie/field pair the form is refused.
    bad = httpx.post(f"{proxy.url}/_dpiguard/login", data={"username": "dr.gaillard", "password": DEMO_PASSWORD,
                                                           "totp": "000000", "csrf": "x"})
    assert bad.status_code == 400
    r = c.post("/_dpiguard/login", data={"username": "dr.gaillard", "password": DEMO_PASSWORD,
                                         "totp": stack.totp("dr.gaillard"), "csrf": csrf, "next": "/patients/P0001"})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/patients/P0001"
    set_cookie = [v for v in r.headers.get_list("set-cookie") if v.startswith("dpiguard_session=")][0]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/" in set_cookie
    first = c.cookies.get("dpiguard_session")
    assert c.get("/patients/P0001", headers={"accept": "text/html"}).status_code == 200
    # Logging in again rotates the id; the old one no longer works.
    page = c.get("/_dpiguard/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = c.post("/_dpiguard/login", data={"username": "dr.gaillard", "password": DEMO_PASSWORD,
                                         "totp": stack.totp("dr.gaillard"), "csrf": csrf})
    assert r.status_code == 303
    assert c.cookies.get("dpiguard_session") != first
    stale = httpx.get(f"{proxy.url}/api/patients/P0001", cookies={"dpiguard_session": first})
    assert stale.status_code == 401


def test_logout_ends_session(stack, proxy):
    c = stack.login(proxy, "dr.mathieu")
    me = c.get("/_dpiguard/api/session").json()
    assert c.get("/api/patients/P0001").status_code in (200, 403)
    r = c.post("/_dpiguard/logout", data={"csrf": me["csrf"]})
    assert r.status_code == 303
    assert httpx.get(f"{proxy.url}/_dpiguard/api/session",
                     cookies={"dpiguard_session": "x"}).status_code == 401
    assert c.get("/api/patients/P0001").status_code == 401


# -- brute force -----------------------------------------------------------------------------------

def _api_login(proxy, user, password, code):
    return httpx.post(f"{proxy.url}/_dpiguard/api/login",
                      json={"username": user, "password": password, "totp": code})


def test_three_wrong_totp_lock_the_account(stack, proxy):
    user = "inf.legrand"
    for _ in range(3):
        r = _api_login(proxy, user, DEMO_PASSWORD, "000000")
        assert r.status_code in (401, 429)
    r = _api_login(proxy, user, DEMO_PASSWORD, stack.totp(user))
    assert r.status_code == 429
    assert r.json()["error"] == "locked"
    assert int(r.headers["retry-after"]) > 0
    # The same outward answer for an account that does not exist (no enumeration).
    for _ in range(3):
        _api_login(proxy, "nobody.here", "whatever-Password1", "123456")
    assert _api_login(proxy, "nobody.here", "whatever-Password1", "123456").json()["error"] == "locked"
    assert records(stack, event="login_locked")


def test_wrong_password_and_wrong_totp_look_the_same(stack, proxy):
    user = "sec.richard"
    a = _api_login(proxy, user, "Wrong-password-123", stack.totp(user))
    b = _api_login(proxy, user, DEMO_PASSWORD, "999999")
    assert a.status_code == b.status_code == 401
    # Both factors count on one counter: only the attempts left differ, never which factor failed.
    assert (a.json().pop("attempts_left"), b.json().pop("attempts_left")) == (2, 1)
    assert {k: v for k, v in a.json().items() if k != "attempts_left"} == {
        k: v for k, v in b.json().items() if k != "attempts_left"}
    redis_client_ = session_store(stack.config).redis
    redis_client_.delete(f"dpiguard:authfail:{{{user}}}")


def test_reused_totp_code_refused_on_other_instance(stack):
    user = "pha.michel"
    code = stack.totp(user)
    assert _api_login(stack.proxies[0], user, DEMO_PASSWORD, code).status_code == 200
    r = _api_login(stack.proxies[1], user, DEMO_PASSWORD, code)
    assert r.status_code == 401
    failures = records(stack, event="login_failure", user=user)
    assert failures and failures[-1]["detail"] == "totp_reused"


# -- hostile input ---------------------------------------------------------------------------------

HOSTILE = [
    "/api/patients/P0001/../P0002/notes",
    "/api/patients/P0001/%2e%2e/P0002/notes",
    "/api/patients/P0001/%2E%2e/P0002/notes",
    "//api/patients/P0002/notes",
    "/api//patients/P0002/notes",
    "/api/patients/P0001%2fP0002/notes",
    "/api/patients/P0001%5cP0002/notes",
    "/api/patients/P0001/notes%00",
    "/api/patients/P0001/%252e%252e/P0002",
]


def _raw_get(port: int, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """Send a request line exactly as given (HTTP clients normalize paths; attackers do not)."""
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


@pytest.mark.parametrize("target", HOSTILE)
def test_hostile_paths_refused_and_never_forwarded(stack, proxy, target):
    c = stack.client(proxy, "dr.martin")
    token = c.cookies.get("dpiguard_session")
    stack.upstream_app.clear()
    status, body = _raw_get(proxy.port, target, {"Cookie": f"dpiguard_session={token}"})
    assert status == 400, body
    assert b"hostile_path" in body
    assert stack.upstream_app.seen == []
    request_id = re.search(rb'"request_id":"([0-9a-f]+)"', body).group(1).decode()
    (rec,) = records(stack, request_id=request_id)
    assert rec["reason"] == "hostile_path" and rec["user"] == "dr.martin"  # attributed, for the DPO


def test_second_patient_in_query_refused(stack, proxy):
    c = stack.client(proxy, "inf.durand")
    stack.upstream_app.clear()
    r = c.get("/api/patients/P0001/biology", params={"patient": "P0002"})
    assert r.status_code == 400 and r.json()["error"] == "ambiguous_patient"
    # FHIR: every listed patient must pass (see tests/test_e2e_fhir.py); P0002 is not hers.
    r = c.get("/fhir/Observation?patient=P0001&patient=P0002")
    assert r.status_code == 403 and "not_in_care_team" in r.text
    r = c.get("/fhir/Observation?patient=P0001,P0002")
    assert r.status_code == 403 and "not_in_care_team" in r.text
    assert stack.upstream_app.seen == []


@pytest.mark.parametrize("header", ["X-DPIGuard-User", "x-dpiguard-roles", "X-Remote-User", "X-Forwarded-User"])
def test_client_identity_headers_refused(stack, proxy, header):
    c = stack.client(proxy, "acc.robert")
    stack.upstream_app.clear()
    r = c.get("/api/patients/P0001/notes", headers={header: "dr.martin"})
    assert r.status_code == 400 and r.json()["error"] == "forged_identity_header"
    assert stack.upstream_app.seen == []


def test_oversized_header_refused(stack, proxy):
    c = stack.client(proxy, "dr.martin")
    r = c.get("/api/patients/P0001", headers={"x-padding": "a" * 20000})
    assert r.status_code == 431
    assert records(stack, reason="header_too_large")


def test_portal_prefix_never_forwarded(stack, proxy):
    stack.upstream_app.clear()
    r = httpx.get(f"{proxy.url}/_dpiguard/../api/patients/P0001")
    assert r.status_code in (400, 401, 404)
    r = httpx.get(f"{proxy.url}/_dpiguard/anything")
    assert r.status_code == 404
    assert stack.upstream_app.seen == []
    (rec,) = records(stack, request_id=r.headers["x-dpiguard-request-id"])  # every refusal is traced
    assert (rec["event"], rec["outcome"], rec["reason"]) == ("portal_refusal", "deny", "not_found")


def test_portal_body_must_be_small_and_declared(stack, proxy):
    chunks = (b'{"username":"dr.martin",' for _ in range(1))  # a generator: sent chunked, no Content-Length
    r = httpx.post(f"{proxy.url}/_dpiguard/api/login", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    r2 = httpx.post(f"{proxy.url}/_dpiguard/api/login", content=b"x" * 20000,
                    headers={"content-type": "application/json"})
    assert r2.status_code == 413
    for response in (r, r2):
        (rec,) = records(stack, request_id=response.headers["x-dpiguard-request-id"])
        assert (rec["outcome"], rec["reason"]) == ("deny", "body_too_large")


def test_unknown_route_refused_after_login(stack, proxy):
    c = stack.client(proxy, "dr.martin")
    r = c.get("/admin/export-all-patients")
    assert r.status_code == 403 and r.json()["error"] == "no_route"


def test_cross_site_post_refused(stack, proxy):
    c = stack.client(proxy, "dr.martin")
    r = c.post("/api/patients/P0001/notes", json={"text": "x"}, headers={"sec-fetch-site": "cross-site"})
    assert r.status_code == 403 and r.json()["error"] == "csrf_origin_mismatch"
    r = c.post("/api/patients/P0001/notes", json={"text": "note from test"})
    assert r.status_code == 201


# -- coherence across instances ----------------------------------------------------------------------

def test_care_team_removal_enforced_on_other_instance_within_one_second(stack):
    a, b = stack.proxies[0], stack.proxies[1]
    user = "inf.noel"  # nurse of CARDIO, like inf.durand
    ca, cb = stack.client(a, user), stack.client(b, user)
    # Warm both instances' caches with an allow.
    for c in (ca, cb):
        for _ in range(3):
            assert c.get("/api/patients/P0001/biology").status_code == 200
    cfg = stack.config
    ct = careteam_store(cfg)
    ct.remove_unit_member(user, "CARDIO")
    removed_at = time.monotonic()
    try:
        deadline = removed_at + 1.0
        while cb.get("/api/patients/P0001/biology").status_code == 200:
            assert time.monotonic() < deadline, "stale allow served more than 1 s after the removal"
        # After the first refusal, never a stale allow again, on either instance.
        for _ in range(30):
            assert cb.get("/api/patients/P0001/biology").status_code == 403
            assert ca.get("/api/patients/P0001/biology").status_code == 403
    finally:
        ct.add_unit_member(user, "CARDIO")
    deadline = time.monotonic() + 2
    while ca.get("/api/patients/P0001/biology").status_code != 200:
        assert time.monotonic() < deadline


def test_sessions_revoke_effective_on_all_instances(stack):
    user = "sec.bernard"
    ca, cb = stack.login(stack.proxies[0], user), stack.login(stack.proxies[1], user)
    assert ca.get("/api/patients/P0001").status_code == 200
    assert cb.get("/api/patients/P0001").status_code == 200
    assert session_store(stack.config).revoke_user(user) == 2
    deadline = time.monotonic() + 1.0
    while ca.get("/api/patients/P0001").status_code != 401 or cb.get("/api/patients/P0001").status_code != 401:
        assert time.monotonic() < deadline


def test_every_decision_traced_with_policy_version(stack):
    recs = [r for r in read_records(stack.audit_path) if r.get("event") == "access"]
    assert any(r["outcome"] == "allow" for r in recs)
    assert all(r.get("policy_version") for r in recs if r.get("reason") != "internal_error")
