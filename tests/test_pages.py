"""The HTML pages dpiguard renders itself (login, refusal, emergency access): autoescaped templates.

Every value a page shows comes from a request, a policy file or the session store, so each is sent
here with quotes and angle brackets: the page must show it as text (escaped once, so a form sends it
back unchanged) and never as markup. See tests/test_e2e_core.py for the same through the real proxy.
"""

from __future__ import annotations

from html.parser import HTMLParser
from types import SimpleNamespace
from urllib.parse import quote, urlencode

import jinja2
import pytest

from dpiguard.auth.sessions import Session
from dpiguard.decision.breakglass import BreakGlassService, RequestOutcome
from dpiguard.decision.verdict import Incoming, Verdict
from dpiguard.edge import portal as portal_module
from dpiguard.edge.portal import Portal
from dpiguard.policy.breakglass import BreakGlassPolicy

XSS = '"><script>alert(1)</script>'
IMG = "<img src=x onerror=alert(1)>"
HOSTILE = f"{XSS}'{IMG}&amp;"  # also: a single quote, and an entity that must stay text


class Page(HTMLParser):
    """Tags, input values and text of a page, as a browser would read them (entities decoded)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.inputs: dict[str, str] = {}
        self.options: list[dict[str, str | None]] = []  # the reasons' radio buttons
        self.attrs: list[tuple[str, dict]] = []
        self.text = ""
        self._in = ""
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "input" and a.get("type") == "hidden":
            self.inputs[a["name"]] = a.get("value", "")
        elif tag == "input" and a.get("type") == "radio":
            self.options.append(a)
        self.attrs.append((tag, a))
        self._in = tag

    def handle_endtag(self, tag):
        self._in = ""

    def handle_data(self, data):
        self.text += data
        if self._in == "textarea":
            self.inputs["textarea"] = self.inputs.get("textarea", "") + data


def assert_inert(body: bytes | str) -> Page:
    html = body.decode() if isinstance(body, bytes) else body
    assert XSS not in html and IMG not in html  # the raw payloads are not in the page
    page = Page(html)
    assert "script" not in page.tags and "img" not in page.tags
    return page


class _Audit:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


class _Sessions:
    idle_timeout = 1800

    def __init__(self, session):
        self.session = session

    def get(self, token):
        return self.session


class _BreakGlass:
    def __init__(self):
        self.outcomes: list[RequestOutcome] = []

    offer = staticmethod(BreakGlassService.offer)  # the real rule: who is offered emergency access

    def request(self, *args, **kwargs):
        return self.outcomes.pop(0)


@pytest.fixture
def bg_policy():
    return BreakGlassPolicy(True, {"urgence_vitale": "Urgence vitale " + HOSTILE, "garde": "Garde"}, 20, 5400,
                            frozenset({"biology"}), source="breakglass.yaml")


@pytest.fixture
def session():
    return Session("hash", "dr.x", ("doctor",), 0.0, 0.0, 0.0, "csrf-" + HOSTILE)


@pytest.fixture
def portal(bg_policy, session):
    return Portal(authenticator=None, sessions=_Sessions(session), audit=_Audit(), cookie_name="dpiguard_session",
                  secure_cookies=False, units_of=lambda user: [], health=lambda: {},
                  policies=lambda: SimpleNamespace(breakglass=bg_policy), breakglass=_BreakGlass())


def incoming(method: str, target: str, request_id: str = "0123456789abcdef", lang: str = "en") -> Incoming:
    return Incoming(method, target, {"accept": "text/html", "content-type": "application/x-www-form-urlencoded",
                                     "accept-language": lang}, "127.0.0.1", False, request_id=request_id)


# -- login ------------------------------------------------------------------------------------------

def test_login_page_shows_hostile_next_as_text(portal):
    target = "/patients/P0001" + HOSTILE
    reply = portal.login_form(incoming("GET", "/_dpiguard/login"), "next=" + quote(target, safe=""))
    assert reply.status == 200 and reply.content_type == "text/html; charset=utf-8"
    page = assert_inert(reply.body)
    assert page.inputs["next"] == target  # escaped once: the form sends it back unchanged
    assert page.inputs["csrf"] and "Set-Cookie" in dict(reply.headers)
    # Not a local path: replaced by "/" (safe_next), never echoed.
    reply = portal.login_form(incoming("GET", "/_dpiguard/login"), "next=" + quote(XSS, safe=""))
    assert assert_inert(reply.body).inputs["next"] == "/"


def test_login_page_error_is_text(portal):
    reply = portal.login_form(incoming("POST", "/_dpiguard/login"), "", "Login failed " + HOSTILE, 401,
                              "/patients/P0001")
    assert reply.status == 401
    page = assert_inert(reply.body)
    assert "Login failed " + HOSTILE in page.text


def test_login_csrf_value_is_escaped(portal, monkeypatch):
    """The token is url-safe today, but the page must not rely on that (it used to be written raw)."""
    monkeypatch.setattr(portal_module.secrets, "token_urlsafe", lambda n=None: "tok" + XSS)
    reply = portal.login_form(incoming("GET", "/_dpiguard/login"), "")
    page = assert_inert(reply.body)
    assert page.inputs["csrf"] == "tok" + XSS


def test_login_page_notices(portal):
    expired = portal.login_form(incoming("GET", "/_dpiguard/login"), "reason=session_expired").body.decode()
    assert '<p class="info" role="status">Your session has ended: after 30 minutes without activity' in expired
    out = portal.login_form(incoming("GET", "/_dpiguard/login"), "reason=" + quote(XSS)).body.decode()
    assert_inert(out)
    assert 'class="info"' not in out and 'class="err"' not in out  # unknown reason: no notice, not echoed
    assert '<p class="info" role="status">You are logged out.</p>' in portal.login_form(
        incoming("GET", "/_dpiguard/login"), "reason=logged_out").body.decode()


# -- refusal page and emergency access --------------------------------------------------------------

def test_refusal_page_shows_hostile_values_as_text(portal, session, bg_policy):
    target = "/patients/P0001/biology?x=" + HOSTILE
    verdict = Verdict(False, "not_in_care_team", 403, "", patient="P0001" + HOSTILE, session=session,
                      category="biology", action="read", roles=("doctor",))
    reply = portal.refusal(incoming("GET", target, request_id="rid" + HOSTILE), verdict)
    assert reply.status == 403 and reply.content_type == "text/html; charset=utf-8"
    page = assert_inert(reply.body)
    assert "Code: not_in_care_team" in page.text and "Reference: rid" + HOSTILE in page.text
    assert "Emergency access (bris de glace)" in page.text and "opens to you for 1 hour 30 minutes" in page.text
    assert "record P0001" + HOSTILE in page.text  # which patient
    assert "Logged in as" in page.text and "dr.x" in page.text  # who
    assert page.inputs == {"csrf": session.csrf, "patient": "P0001" + HOSTILE, "next": target}
    assert [o["value"] for o in page.options] == ["urgence_vitale", "garde"]
    assert "Urgence vitale " + HOSTILE in page.text


def test_refusal_page_unknown_reason_is_text(portal, session):
    verdict = Verdict(False, "weird" + HOSTILE, 403, "message " + HOSTILE, session=session)
    page = assert_inert(portal.refusal(incoming("GET", "/patients/P0001/notes"), verdict).body)
    assert "Code: weird" + HOSTILE in page.text and "message " + HOSTILE in page.text
    assert "form" not in page.tags  # no patient: no emergency access offered


def _breakglass_post(portal, fields):
    body = urlencode(fields).encode()
    return portal.handle(incoming("POST", "/_dpiguard/breakglass", request_id="rid" + HOSTILE), body, "token")


def test_breakglass_refusal_sends_back_the_form_escaped(portal, session):
    portal.breakglass.outcomes.append(RequestOutcome(False, 400, "invalid_request" + HOSTILE,
                                                     "The justification is too short " + HOSTILE))
    text = "short </textarea>" + HOSTILE
    reply = _breakglass_post(portal, {"csrf": session.csrf, "patient": "P0001" + HOSTILE, "reason": "garde",
                                      "text": text, "totp": "1", "next": "/patients/P0001" + HOSTILE})
    assert reply.status == 400 and reply.content_type == "text/html; charset=utf-8"
    page = assert_inert(reply.body)
    assert "</textarea>" + XSS not in reply.body.decode()
    assert page.inputs == {"csrf": session.csrf, "patient": ("P0001" + HOSTILE)[:64],  # as long as an id may be
                           "next": "/patients/P0001" + HOSTILE, "textarea": text}
    assert [o["value"] for o in page.options if "checked" in o] == ["garde"]
    assert "Code: invalid_request" + HOSTILE in page.text and "Reference: rid" + HOSTILE in page.text
    assert "The justification is too short " + HOSTILE in page.text


def test_breakglass_refusal_without_form(portal, session):
    portal.breakglass.outcomes.append(RequestOutcome(False, 403, "weird" + HOSTILE, "Not for you " + HOSTILE))
    reply = _breakglass_post(portal, {"csrf": session.csrf, "patient": "P0001", "reason": "garde", "text": "x",
                                      "totp": "1"})
    assert reply.status == 403
    page = assert_inert(reply.body)
    assert "form" not in page.tags and "Not for you " + HOSTILE in page.text


def test_templates_autoescape_and_refuse_undefined_values(portal):
    env = portal.pages.templates.env("en")
    assert env.autoescape is True
    for name in env.list_templates():
        assert env.get_template(name) is env.get_template(name)  # parsed once, then kept
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("refusal.html").render(text="t", reason="r", L=None)  # request_id, chrome missing


# -- languages ------------------------------------------------------------------------------------

def test_pages_are_french_by_default_english_on_request(portal, session):
    verdict = Verdict(False, "not_in_care_team", 403, "", patient="P0001", session=session, category="biology",
                      action="read", roles=("doctor",))
    fr = portal.refusal(Incoming("GET", "/patients/P0001/biology", {"accept": "text/html"}, "127.0.0.1", False),
                        verdict).body.decode()
    assert '<html lang="fr">' in fr and "Accès refusé" in fr and "équipe de soins" in fr
    assert "Accès d'urgence (bris de glace)" in fr and "1 heure 30 minutes" in fr
    en = portal.refusal(incoming("GET", "/patients/P0001/biology", lang="en-GB,en;q=0.8"), verdict).body.decode()
    assert '<html lang="en">' in en and "Access refused" in en
    # The switch (a cookie) wins over the browser's language; codes never change.
    switched = portal.refusal(Incoming("GET", "/patients/P0001/biology", {
        "accept": "text/html", "accept-language": "fr-FR", "cookie": "dpiguard_lang=en"}, "127.0.0.1", False),
        verdict).body.decode()
    assert "Access refused" in switched and "not_in_care_team" in switched and "not_in_care_team" in fr


def test_json_and_fhir_messages_are_translated_codes_unchanged(portal, session):
    import orjson

    verdict = Verdict(False, "category_not_permitted", 403, "", session=session, roles=("doctor",))
    api = portal.refusal(Incoming("GET", "/api/patients/P1/notes", {}, "127.0.0.1", False), verdict)
    data = orjson.loads(api.body)
    assert data["error"] == "category_not_permitted"
    assert data["message"] == "Votre rôle ne donne pas accès à ce type de données."
    fhir = portal.refusal(Incoming("GET", "/fhir/Observation?patient=P1", {"accept-language": "en"}, "127.0.0.1",
                                   False), verdict)
    issue = orjson.loads(fhir.body)["issue"][0]
    assert issue["details"]["coding"][0]["code"] == "category_not_permitted"
    assert issue["details"]["text"] == "Your role does not give access to this kind of data."


def test_language_switch_sets_a_cookie_and_goes_back_locally(portal):
    reply = portal.handle(incoming("GET", "/_dpiguard/lang?to=en&next=%2F_dpiguard%2Flogin%3Fnext%3D%252Fp"), b"", None)
    headers = dict(reply.headers)
    assert reply.status == 303 and headers["Location"] == "/_dpiguard/login?next=%2Fp"
    assert headers["Set-Cookie"].startswith("dpiguard_lang=en; Path=/")
    reply = portal.handle(incoming("GET", "/_dpiguard/lang?to=xx&next=https://evil.example/"), b"", None)
    assert dict(reply.headers) == {"Location": "/"}  # unknown language: no cookie; never an open redirect


def test_every_page_is_translated():
    """Each template's visible texts come from the catalogue: rendering in French leaves no msgid behind."""
    from babel.messages.pofile import read_po

    from dpiguard.i18n import LOCALE_DIR

    with open(LOCALE_DIR / "fr" / "LC_MESSAGES" / "messages.po", "rb") as fh:
        catalog = read_po(fh, locale="fr")
    untranslated = [m.id for m in catalog if m.id and not (m.string if isinstance(m.string, str) else all(m.string))]
    fuzzy = [m.id for m in catalog if m.id and m.fuzzy]
    assert untranslated == [] and fuzzy == []
