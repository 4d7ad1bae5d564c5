"""For the people at the screen, end to end (real Redis, real demo DPI, real mitmproxy running dpiguard):
no cache of patient data, the session bar in the DPI's pages, the logout page, a form kept across an
ended session, lockout messages, and the console's rules (tests/stack.py). Browser checks (axe,
keyboard, 375 px) are in tests/test_browser.py.

The stack runs with a 4 s idle timeout so that a session can end during a test.
"""

from __future__ import annotations

import html
import re
import time

import httpx
import pytest

from dpiguard.audit.chain import read_records
from dpiguard.demo.runner import DEMO_PASSWORD

from .stack import build_stack

pytestmark = pytest.mark.timeout(240)

IDLE = 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("people"), config_extra={
        "sessions": {"idle_timeout": IDLE, "touch_interval": 1},
        "ui": {"idle_warning_seconds": 2, "helpdesk": "Assistance informatique : poste 4242"}})
    s.start_proxy("a")
    s.start_proxy("b")
    yield s
    s.close()


def records(stack, **match):
    return [r for r in read_records(stack.audit_path) if all(r.get(k) == v for k, v in match.items())]


def browser_login(stack, proxy, user: str, next_target: str = "/", resume: str = "", client=None) -> httpx.Response:
    """The login form as a browser sends it (CSRF cookie and field, same-origin)."""
    c = client or httpx.Client(base_url=proxy.url, timeout=10)
    page = c.get("/_dpiguard/login", params={"next": next_target, **({"resume": resume} if resume else {})})
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    data = {"username": user, "password": DEMO_PASSWORD, "totp": stack.totp(user), "csrf": csrf, "next": next_target}
    if resume:
        data["resume"] = resume
    return c.post("/_dpiguard/login", data=data, headers={"accept": "text/html", "sec-fetch-site": "same-origin"})


# -- no cache, the session bar ----------------------------------------------------------------------

def test_patient_data_is_never_cached_html_json_fhir(stack):
    c = stack.login(stack.proxies[0], "inf.durand")
    for path, headers in (("/patients/P0001/notes", {"accept": "text/html"}), ("/api/patients/P0001/biology", {}),
                          ("/fhir/Observation?patient=P0001", {"accept": "application/fhir+json"})):
        r = c.get(path, headers=headers)
        assert r.status_code == 200, (path, r.text[:200])
        assert r.headers["cache-control"] == "no-store" and r.headers["pragma"] == "no-cache", path
    public = httpx.get(f"{stack.proxies[0].url}/static/style.css")
    assert public.status_code == 200 and public.headers.get("cache-control") != "no-store"  # not patient data


def test_session_bar_in_dpi_pages_only(stack):
    c = stack.login(stack.proxies[0], "inf.noel")
    page = c.get("/patients/P0001", headers={"accept": "text/html", "sec-fetch-dest": "document"})
    assert page.status_code == 200
    body = page.text
    start = body.index('<aside id="dpiguard-bar"')
    assert body.index("<body") < start < body.index("</body>")
    bar = html.unescape(body[start:body.index("</aside>", start)])
    assert 'href="/_dpiguard/logout"' in bar and 'href="/_dpiguard/logout?switch=1"' in bar
    assert "Connecté·e : inf.noel" in bar and "Changer d'utilisateur" in bar and "Se déconnecter" in bar
    assert "/_dpiguard/static/banner.css" in bar and "<script" not in bar and "style=" not in bar
    assert re.search(r"votre session se fermera à \d\d:\d\d", bar)  # the idle warning, a clock time
    assert bar.isascii() or body.count("&#") > 0  # non-ASCII as character references
    css = httpx.get(f"{stack.proxies[0].url}/_dpiguard/static/banner.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert f"animation:dpiguard-idle 1s step-end {IDLE - 2}s forwards" in css.text
    # Not in JSON, not in a fragment, not in FHIR.
    assert "dpiguard-bar" not in c.get("/api/patients/P0001").text
    fragment = c.get("/patients/P0001", headers={"accept": "text/html", "sec-fetch-dest": "empty"})
    assert fragment.status_code == 200 and "dpiguard-bar" not in fragment.text
    en = c.get("/patients/P0001", headers={"accept": "text/html", "accept-language": "en"}).text
    assert "Logged in: inf.noel" in en and "Change user" in en


def test_logout_page_confirms_with_csrf_then_back_shows_nothing(stack):
    proxy = stack.proxies[0]
    c = stack.login(proxy, "dr.gaillard")
    assert c.get("/patients/P0001/notes", headers={"accept": "text/html"}).status_code == 200
    page = c.get("/_dpiguard/logout", headers={"accept": "text/html"})
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    assert "Vous êtes connecté·e en tant que" in html.unescape(page.text) and "dr.gaillard" in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    assert 'name="then" value="switch_user"' in page.text  # "change user" on the same page
    forged = c.post("/_dpiguard/logout", data={"csrf": "forged"}, headers={"accept": "text/html"})
    assert forged.status_code == 403 and "text/html" in forged.headers["content-type"]
    out = c.post("/_dpiguard/logout", data={"csrf": csrf, "then": "switch_user"})
    assert out.status_code == 303 and out.headers["location"] == "/_dpiguard/login?reason=switch_user"
    assert out.headers.get("clear-site-data") == '"cache"'
    # Back: the page is asked again (no-store) and refused, and that attempt is traced.
    again = c.get("/patients/P0001/notes", headers={"accept": "text/html"})
    assert again.status_code == 302 and again.headers["location"].startswith("/_dpiguard/login")
    rid = again.headers["x-dpiguard-request-id"]
    assert records(stack, request_id=rid)[0]["outcome"] == "deny"
    login = c.get(again.headers["location"] + "&reason=switch_user")
    assert "Utilisateur suivant" in html.unescape(login.text)


def test_login_page_says_how_long_sessions_last(stack):
    page = httpx.get(f"{stack.proxies[0].url}/_dpiguard/login", headers={"accept-language": "fr"})
    text = html.unescape(page.text)
    assert '<html lang="fr">' in page.text and "Votre session se ferme après 4 secondes sans activité" in text
    assert "12 heures" in text and "Assistance informatique : poste 4242" in text


# -- a form typed while the session ends ------------------------------------------------------------

NOTE = "Patiente vue à 3 h, douleur thoracique calmée — à revoir au matin"


def test_a_note_sent_after_the_session_ended_is_kept_then_sent_once(stack):
    a, b = stack.proxies
    user = "dr.muller"
    c = httpx.Client(base_url=a.url, timeout=10)
    assert browser_login(stack, a, user, "/patients/P0001/notes", client=c).status_code == 303
    assert c.get("/patients/P0001/notes", headers={"accept": "text/html"}).status_code == 200
    time.sleep(IDLE + 1.5)  # she types a long note; the session ends meanwhile
    stack.upstream_app.clear()
    r = c.post("/patients/P0001/notes", data={"text": NOTE},
               headers={"accept": "text/html", "sec-fetch-site": "same-origin", "referer": f"{a.url}/patients/P0001/notes"})
    assert r.status_code == 303, r.text
    location = r.headers["location"]
    assert location.startswith("/_dpiguard/login?next=%2Fpatients%2FP0001%2Fnotes&reason=session_expired&resume=")
    resume = location.rsplit("resume=", 1)[1]
    assert stack.upstream_app.seen == []  # nothing reached the DPI yet
    login_page = c.get(location)
    assert "a été conservé" in html.unescape(login_page.text) and f'name="resume" value="{resume}"' in login_page.text
    # She logs in again, on another instance: the note goes through, once, decided and traced anew.
    cb = httpx.Client(base_url=b.url, timeout=10, cookies=c.cookies)
    done = browser_login(stack, b, user, "/patients/P0001/notes", resume=resume, client=cb)
    assert done.status_code == 303 and done.headers["location"] == "/patients/P0001/notes", done.text
    posted = [s for s in stack.upstream_app.seen if s["method"] == "POST"]
    assert len(posted) == 1 and posted[0]["path"] == "/patients/P0001/notes"
    assert posted[0]["headers"]["x-dpiguard-user"] == user
    notes = cb.get("/patients/P0001/notes", headers={"accept": "text/html"})
    assert notes.status_code == 200 and NOTE in html.unescape(notes.text)
    rid = done.headers["x-dpiguard-request-id"]
    (decision,) = records(stack, request_id=rid, event="access")
    assert decision["outcome"] == "allow" and decision["method"] == "POST" and decision["user"] == user
    assert records(stack, event="form_kept", user=user, outcome="allow")
    assert records(stack, event="form_resumed", user=user, outcome="allow")
    # The id served once: logging in again with it sends nothing.
    stack.upstream_app.clear()
    again = browser_login(stack, a, user, "/patients/P0001/notes", resume=resume)
    assert again.status_code == 303 and again.headers["location"] == "/patients/P0001/notes"
    assert [s for s in stack.upstream_app.seen if s["method"] == "POST"] == []


def test_a_kept_form_goes_to_its_author_only(stack):
    a = stack.proxies[0]
    c = httpx.Client(base_url=a.url, timeout=10)
    assert browser_login(stack, a, "dr.martin", "/patients/P0001/notes", client=c).status_code == 303
    time.sleep(IDLE + 1.5)
    r = c.post("/patients/P0001/notes", data={"text": "note of dr.martin"},
               headers={"accept": "text/html", "sec-fetch-site": "same-origin"})
    resume = r.headers["location"].rsplit("resume=", 1)[1]
    stack.upstream_app.clear()
    other = browser_login(stack, a, "inf.durand", "/patients/P0001/notes", resume=resume)  # the next person
    assert other.status_code == 303
    assert [s for s in stack.upstream_app.seen if s["method"] == "POST"] == []
    assert records(stack, event="form_resumed", user="inf.durand", outcome="deny")
    # Nor is a form kept for a session that was logged out, or sent from another site.
    c2 = stack.login(a, "dr.brunet")
    csrf = c2.get("/_dpiguard/api/session").json()["csrf"]
    c2.post("/_dpiguard/logout", data={"csrf": csrf})
    cookie = {"dpiguard_session": "x" * 43}
    r = httpx.post(f"{a.url}/patients/P0001/notes", data={"text": "t"}, cookies=cookie,
                   headers={"accept": "text/html", "sec-fetch-site": "same-origin"})
    assert r.status_code == 303 and "resume=" not in r.headers["location"]


# -- lockouts people understand ---------------------------------------------------------------------

def test_lockout_messages_warn_then_say_until_when(stack):
    a = stack.proxies[0]
    c = httpx.Client(base_url=a.url, timeout=10)
    texts = []
    for _ in range(3):
        page = c.get("/_dpiguard/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        r = c.post("/_dpiguard/login", data={"username": "sec.richard", "password": "Wrong-password-123",
                                             "totp": "000000", "csrf": csrf})
        texts.append((r.status_code, html.unescape(r.text)))
    assert texts[0][0] == 401 and "Il vous reste 2 essais" in texts[0][1]
    assert texts[1][0] == 401 and "Attention : encore un échec et le compte sera verrouillé pendant 5 minutes" in texts[1][1]
    status, text = texts[2]  # the third failure locks, and says so at once, with a clock time
    assert status == 429 and re.search(r"verrouillé jusqu'à \d\d:\d\d \(5 minutes\)", text), text
    assert "Assistance informatique : poste 4242" in text


def test_a_shared_address_is_slowed_never_blocked(stack):
    """20 failures from the ward's one address: a nurse who never failed still logs in."""
    a = stack.proxies[0]
    for i in range(25):
        httpx.post(f"{a.url}/_dpiguard/api/login", json={"username": f"ghost{i}", "password": "x", "totp": "1"})
    time.sleep(2.1)  # login.ip_slow_seconds
    r = httpx.post(f"{a.url}/_dpiguard/api/login", json={"username": "inf.henry", "password": DEMO_PASSWORD,
                                                         "totp": stack.totp("inf.henry")})
    assert r.status_code == 200, r.text
    from dpiguard.services import redis_client

    redis_client(stack.config).delete("dpiguard:ipfail:127.0.0.1", "dpiguard:ipslow:127.0.0.1")
