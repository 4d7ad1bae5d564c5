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
        self.options: list[dict[str, str | None]] = []
        self.text = ""
        self._in = ""
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "input" and a.get("type") == "hidden":
            self.inputs[a["name"]] = a.get("value", "")
        elif tag == "option":
            self.options.append(a)
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


def incoming(method: str, target: str, request_id: str = "0123456789abcdef") -> Incoming:
    return Incoming(method, target, {"accept": "text/html", "content-type": "application/x-www-form-urlencoded"},
                    "127.0.0.1", False, request_id=request_id)


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
    assert '<p class="info">Your session has ended' in expired
    out = portal.login_form(incoming("GET", "/_dpiguard/login"), "reason=" + quote(XSS)).body.decode()
    assert_inert(out)
    assert 'class="info"' not in out and 'class="err"' not in out  # unknown reason: no notice, not echoed
    assert '<p class="info">You are logged out.</p>' in portal.login_form(
        incoming("GET", "/_dpiguard/login"), "reason=logged_out").body.decode()


# -- refusal page and emergency access --------------------------------------------------------------

def test_refusal_page_shows_hostile_values_as_text(portal, session, bg_policy):
    target = "/patients/P0001/biology?x=" + HOSTILE
    verdict = Verdict(False, "not_in_care_team", 403, "", patient="P0001" + HOSTILE, session=session,
                      category="biology", action="read", roles=("doctor",))
    reply = portal.refusal(incoming("GET", target, request_id="rid" + HOSTILE), verdict)
    assert reply.status == 403 and reply.content_type == "text/html; charset=utf-8"
    page = assert_inert(reply.body)
    assert "Reason code: not_in_care_team" in page.text and "Request id: rid" + HOSTILE in page.text
    assert "Emergency access (bris de glace)" in page.text and "opens for 1.5 h" in page.text
    assert page.inputs == {"csrf": session.csrf, "patient": "P0001" + HOSTILE, "next": target}
    assert [o["value"] for o in page.options] == ["urgence_vitale", "garde"]
    assert "Urgence vitale " + HOSTILE in page.text


def test_refusal_page_unknown_reason_is_text(portal, session):
    verdict = Verdict(False, "weird" + HOSTILE, 403, "message " + HOSTILE, session=session)
    page = assert_inert(portal.refusal(incoming("GET", "/patients/P0001/notes"), verdict).body)
    assert "Reason code: weird" + HOSTILE in page.text and "message " + HOSTILE in page.text
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
    assert [o["value"] for o in page.options if "selected" in o] == ["garde"]
    assert "Reason code: invalid_request" + HOSTILE in page.text and "Request id: rid" + HOSTILE in page.text
    assert "The justification is too short " + HOSTILE in page.text


def test_breakglass_refusal_without_form(portal, session):
    portal.breakglass.outcomes.append(RequestOutcome(False, 403, "break_glass_forbidden", "Not for you " + HOSTILE))
    reply = _breakglass_post(portal, {"csrf": session.csrf, "patient": "P0001", "reason": "garde", "text": "x",
                                      "totp": "1"})
    assert reply.status == 403
    page = assert_inert(reply.body)
    assert "form" not in page.tags and "Not for you " + HOSTILE in page.text


def test_templates_autoescape_and_refuse_undefined_values():
    env = portal_module._TEMPLATES
    assert env.autoescape is True
    for name in env.list_templates():
        assert env.get_template(name) is env.get_template(name)  # parsed once, then kept
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("refusal.html").render(text="t", reason="r")  # request_id missing
