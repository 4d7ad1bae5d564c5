"""dpiguard's own pages under the reserved prefix ``/_dpiguard/`` (never forwarded upstream).

- ``GET  /_dpiguard/login``        login form (user name, password and TOTP code on one form, so a
                                    failure never tells which factor was wrong)
- ``POST /_dpiguard/login``        form login; CSRF: double-submit cookie + SameSite=Strict
- ``POST /_dpiguard/api/login``    JSON login for scripts: ``{"username","password","totp"}``
- ``GET  /_dpiguard/logout``       who is logged in, and the log out / change user buttons
- ``POST /_dpiguard/logout``       form logout (CSRF token of the session)
- ``POST /_dpiguard/api/logout``   JSON logout (bearer token or cookie)
- ``GET  /_dpiguard/api/session``  who am I, session expiry
- ``GET  /_dpiguard/lang?to=en&next=/…``  the language switch (a cookie), then back
- ``GET  /_dpiguard/static/…``     the pages' style sheets
- ``GET  /_dpiguard/health``       liveness/readiness summary
- ``POST /_dpiguard/breakglass``   emergency access form (from the refusal page; CSRF = session token)
- ``POST /_dpiguard/api/breakglass`` emergency access for scripts: ``{"patient","reason","text","totp"}``
  (see dpiguard/decision/breakglass.py and docs/breakglass.md)
- ``GET|POST /_dpiguard/breakglass/end``  end one's own emergency access early
- ``/_dpiguard/oidc/…``            OpenID Connect / Pro Santé Connect login and logout (edge/oidc.py)
- ``/_dpiguard/console/…``         the web console for DPOs, RSSIs and the helpdesk (console.py)

Also renders refusals: HTML for browsers, JSON for API clients, FHIR OperationOutcome for FHIR paths,
and keeps a form sent with an ended session (``keep_form``, ``dpiguard/auth/resume.py``). Human texts
are in the person's language (French by default, :mod:`dpiguard.i18n`); machine codes never change.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, quote

import orjson
from jinja2 import PackageLoader

from dpiguard import metrics
from dpiguard.audit.chain import AuditError, AuditLog
from dpiguard.auth.login import Authenticator, LoginResult
from dpiguard.auth.resume import KeptForm, ResumeStore, is_form
from dpiguard.auth.sessions import SessionStore, cookie_value, presented_token
from dpiguard.decision.verdict import REFUSAL_MESSAGES, Incoming, Verdict
from dpiguard.edge.pages import (
    ACTION_TEXT,
    PREFIX,
    REASON_TEXT,
    Pages,
    PageSettings,
    reason_text,
    safe_next,
    same_origin_path,
)
from dpiguard.i18n import LANG_COOKIE, Localizer, TemplateSet
from dpiguard.policy.snapshot import PolicySet

__all__ = ["PREFIX", "MAX_BODY", "Portal", "PortalSettings", "Reply", "SECURITY_HEADERS", "safe_next"]

MAX_BODY = 16 * 1024
log = logging.getLogger("dpiguard")
REASON_SYSTEM = "urn:dpiguard:reason"

SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("Pragma", "no-cache"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy",
     "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
     "base-uri 'none'"),
)

#: The Content-Security-Policy of the only pages that run a script, the security-key step
#: (``/_dpiguard/static/webauthn.js``, same origin; edge/enrol.py): a reply that carries its own
#: Content-Security-Policy header replaces the default one (edge/flows.py ``respond``).
SCRIPT_CSP = ("Content-Security-Policy",
              "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
              "frame-ancestors 'none'; base-uri 'none'")

FHIR_ISSUE_CODE = {
    400: "invalid", 401: "login", 403: "forbidden", 405: "not-supported", 413: "too-long", 414: "too-long",
    429: "throttled", 431: "too-long", 503: "exception",
}

STATIC_FILES = {"dpiguard.css": "text/css; charset=utf-8",
                "webauthn.js": "text/javascript; charset=utf-8"}  # the security-key step (edge/enrol.py)
HTML = "text/html; charset=utf-8"


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    replay: Any = None  # (KeptForm, session token): the addon sends the kept form on (edge/resume.py)


@dataclass(frozen=True)
class PortalSettings:
    """What the portal's pages say and do (from the configuration's ui, sessions and login sections)."""

    pages: PageSettings = PageSettings()
    idle_timeout: int = 1800
    absolute_lifetime: int = 43200
    idle_warning: int = 120
    console_roles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def _login_status(result: LoginResult) -> int:
    """The HTTP status of a refused login: 429 with a wait, 503 directory down, 403 no role, else 401."""
    if result.retry_after:
        return 429
    return {"directory_unavailable": 503, "no_role": 403}.get(result.reason, 401)


def wants_html(headers: Mapping[str, str], method: str) -> bool:
    """A browser navigation (a page or a form), not a script: it gets pages, not JSON."""
    if "text/html" not in headers.get("accept", ""):
        return False
    return method in ("GET", "HEAD") or is_form(headers.get("content-type", ""))


def is_fhir(target: str, headers: Mapping[str, str]) -> bool:
    return target.startswith("/fhir/") or "fhir+json" in headers.get("accept", "")


#: The pipeline's own one-line messages, which say no more than the reason's sentence.
_GENERIC = frozenset(REFUSAL_MESSAGES.values()) | {"please log in", "this address is not open through dpiguard",
                                                   "cross-site request refused"}


def _detail(v: Verdict) -> str:
    """What a refusal's message adds to its reason (a FHIR entry, a parameter...), or ""."""
    return v.message if v.message and v.message not in _GENERIC else ""


def _form(body: bytes, fields: int = 10) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=fields).items()}


class Portal:
    def __init__(
        self,
        *,
        authenticator: Authenticator,
        sessions: SessionStore,
        audit: AuditLog,
        cookie_name: str,
        secure_cookies: bool,
        units_of: Callable[[str], list[str]],
        health: Callable[[], dict[str, Any]],
        policies: Callable[[], PolicySet],
        breakglass=None,
        settings: PortalSettings | None = None,
        resume: ResumeStore | None = None,
        console=None,
    ):
        self.authenticator = authenticator
        self.sessions = sessions
        self.audit = audit
        self.cookie_name = cookie_name
        self.secure = secure_cookies
        self.csrf_cookie = ("__Host-" if secure_cookies else "") + "dpiguard_csrf"
        self.units_of = units_of
        self.health = health
        self._traced = threading.local()  # events written while serving the current request (handle)
        self.breakglass = breakglass  # BreakGlassService, or None (emergency access off)
        self.policies = policies  # the policy set in service now (the pipeline's)
        self.settings = settings or PortalSettings()
        self.pages = Pages(self.settings.pages, policies)
        self.resume = resume  # kept forms (None or ttl 0: off)
        self.console = console  # dpiguard.edge.console.Console, or None
        self.enrol = None  # dpiguard.edge.enrol.Enrolment (enrolment, recovery codes, security keys), or None
        self.admin_roles = frozenset(self.settings.console_roles)
        self._static = self._static_files()
        self.oidc = None  # dpiguard.edge.oidc.OidcPages when OpenID Connect login is on (services.py)

    def _static_files(self) -> dict[str, tuple[bytes, str]]:
        from importlib.resources import files

        out = {name: ((files("dpiguard.edge") / "static" / name).read_bytes(), ctype)
               for name, ctype in STATIC_FILES.items()}
        css = TemplateSet(PackageLoader("dpiguard.edge", "templates"))
        warn_after = max(0, self.settings.idle_timeout - self.settings.idle_warning)
        out["banner.css"] = (css.env("en").get_template("banner.css").render(warn_after=warn_after).encode(),
                             "text/css; charset=utf-8")
        return out

    # -- dispatch ----------------------------------------------------------------------------------
    def handle(self, req: Incoming, body: bytes, session_token: str | None) -> Reply:
        """Serve one portal request. Runs in a worker thread (argon2, Redis). Never raises.

        Every refusal leaves a trace line: handlers trace their own events; a reply of 400 or more
        whose handler traced nothing (unknown page, wrong content type...) gets a ``portal_refusal``."""
        self._traced.count = 0
        reply = self._serve(req, body, session_token)
        is_status_report = req.target.partition("?")[0] == "/_dpiguard/health"  # "not ready" is no refusal
        if reply.status >= 400 and self._traced.count == 0 and not is_status_report:
            try:
                error = orjson.loads(reply.body).get("error") if reply.content_type == "application/json" else None
            except (orjson.JSONDecodeError, AttributeError):
                error = None
            try:
                self._event(req, "portal_refusal", None, "deny", str(error or f"http_{reply.status}"))
            except AuditError:
                pass  # the reply is already a refusal; the audit failure shows in health and the log
        return reply

    def _serve(self, req: Incoming, body: bytes, session_token: str | None) -> Reply:
        path, _, query = req.target.partition("?")
        route = (req.method, path)
        try:
            if len(body) > MAX_BODY:
                return self._json(413, {"error": "body_too_large"})
            if req.method in ("GET", "HEAD") and path.startswith("/_dpiguard/static/"):
                return self.static(path.rsplit("/", 1)[-1])
            if route == ("GET", "/_dpiguard/lang"):
                return self.switch_language(query)
            if route == ("GET", "/_dpiguard/login"):
                return self.login_form(req, query)
            if route == ("POST", "/_dpiguard/login"):
                return self.login_submit(req, body)
            if route == ("POST", "/_dpiguard/api/login"):
                return self.api_login(req, body)
            if self.enrol is not None and path.startswith(("/_dpiguard/enrol", "/_dpiguard/login/key",
                                                           "/_dpiguard/account", "/_dpiguard/breakglass/key")):
                served = self.enrol.handle(self, req, path, query, body, session_token)
                if served is not None:
                    return served
            if route == ("GET", "/_dpiguard/logout"):
                return self.logout_page(req, query, session_token)
            if route == ("POST", "/_dpiguard/logout"):
                return self.logout(req, body, session_token, form=True)
            if route == ("POST", "/_dpiguard/api/logout"):
                return self.logout(req, body, session_token, form=False)
            if route == ("GET", "/_dpiguard/api/session"):
                return self.whoami(req, session_token)
            if self.breakglass is not None:
                if route == ("POST", "/_dpiguard/breakglass"):
                    return self.breakglass_request(req, body, session_token, form=True)
                if route == ("POST", "/_dpiguard/api/breakglass"):
                    return self.breakglass_request(req, body, session_token, form=False)
                if path == "/_dpiguard/breakglass/end" and req.method in ("GET", "POST"):
                    return self.breakglass_end(req, query, body, session_token)
            if self.oidc is not None and path.startswith("/_dpiguard/oidc/"):
                reply = self.oidc.serve(self, req, path, query, body, session_token)
                if reply is not None:
                    return reply
            if route == ("GET", "/_dpiguard/health"):
                info = self.health()
                return self._json(200 if info.get("ready") else 503, info)
            if self.console is not None and (path == "/_dpiguard/console" or path.startswith("/_dpiguard/console/")):
                return self.console.handle(self, req, path, query, body, session_token)
            if wants_html(req.headers, req.method):
                return self.message(req, 404, "not_found", title=self.l10n(req).gettext("Page not found"))
            return self._json(404, {"error": "not_found", "request_id": req.request_id})
        except AuditError:
            return self._json(503, {"error": "audit_unavailable", "message": "the access trace could not be written",
                                    "request_id": req.request_id})
        except Exception as exc:  # fail closed, and say so
            log.exception("dpiguard: error in a dpiguard page (%s %s)", req.method, req.target.partition("?")[0][:128])
            try:
                self._event(req, "portal_error", None, "deny", "internal_error", f"{type(exc).__name__}: {exc}"[:300])
            except AuditError:
                pass
            return self._json(503, {"error": "internal_error", "request_id": req.request_id})

    # -- pages -------------------------------------------------------------------------------------
    def l10n(self, req: Incoming) -> Localizer:
        return self.pages.localizer(req.headers)

    def page(self, req: Incoming, template: str, status: int = 200, session=None,
             headers: list[tuple[str, str]] | None = None, **context: Any) -> Reply:
        l10n = self.l10n(req)
        chrome = self.pages.chrome(l10n, req.target, *(self._who(session) if session else ()))
        return Reply(status, self.pages.render(template, l10n, chrome, **context), HTML, headers or [])

    @staticmethod
    def _who(session) -> tuple[str, str, tuple[str, ...]]:
        return session.user, getattr(session, "display_name", "") or "", tuple(session.roles)

    def message(self, req: Incoming, status: int, code: str, *, title: str, text: str = "",
                links: list[tuple[str, str]] | None = None, session=None, error: bool = True,
                headers: list[tuple[str, str]] | None = None) -> Reply:
        l10n = self.l10n(req)
        return self.page(req, "message.html", status, session, headers, title=title,
                         text=text or reason_text(l10n, code), links=links or [("/", l10n.gettext(
                             "Home of the patient record"))], code=code, request_id=req.request_id, error=error)

    def static(self, name: str) -> Reply:
        hit = self._static.get(name)
        if hit is None:
            return self._json(404, {"error": "not_found"})
        return Reply(200, hit[0], hit[1])

    def switch_language(self, query: str) -> Reply:
        params = parse_qs(query, max_num_fields=5)
        lang = params.get("to", [""])[0]
        target = safe_next(params.get("next", ["/"])[0], portal_pages=True)
        headers = [("Location", target)]
        if lang in self.settings.pages.languages:
            parts = [f"{LANG_COOKIE}={lang}", "Path=/", "SameSite=Lax", "HttpOnly", "Max-Age=31536000"]
            if self.secure:
                parts.append("Secure")
            headers.append(("Set-Cookie", "; ".join(parts)))
        return Reply(303, b"", "text/plain", headers)

    # -- login -------------------------------------------------------------------------------------
    def login_form(self, req: Incoming, query: str, error: str = "", status: int = 200,
                   next_target: str | None = None, warning: str = "", resume: str | None = None,
                   headers: list[tuple[str, str]] | None = None) -> Reply:
        params = parse_qs(query, max_num_fields=10)
        next_target = safe_next(next_target if next_target is not None else params.get("next", ["/"])[0],
                                portal_pages=True)
        resume = resume if resume is not None else params.get("resume", [""])[0]
        resume = resume if resume and len(resume) <= 64 and resume.replace("-", "").replace("_", "").isalnum() else ""
        csrf = secrets.token_urlsafe(24)
        l10n = self.l10n(req)
        s = self.settings
        reply = self.page(req, "login.html", status, None, error=error, warning=warning,
                          reason=params.get("reason", [""])[0], csrf=csrf, next=next_target, resume=resume,
                          idle=l10n.duration(s.idle_timeout), lifetime=l10n.duration(s.absolute_lifetime),
                          oidc_button=self.oidc.button(l10n) if self.oidc is not None else "",
                          keys=self.enrol is not None and self.enrol.keys is not None,
                          recovery=getattr(self.authenticator, "recovery", None) is not None)
        reply.headers = (headers or []) + [("Set-Cookie", self._cookie(self.csrf_cookie, csrf, path="/"))]
        return reply

    def login_submit(self, req: Incoming, body: bytes) -> Reply:
        form = _form(body)
        l10n = self.l10n(req)
        sent = form.get("csrf", "")
        cookie = cookie_value(req.headers.get("cookie", ""), self.csrf_cookie)
        if not sent or not cookie or not hmac.compare_digest(sent, cookie):
            self._event(req, "login_failure", form.get("username", "")[:64] or None, "deny", "csrf_failed")
            return self.login_form(req, "", l10n.gettext("Your form expired; please try again."), 400,
                                   form.get("next", "/"), resume=form.get("resume", ""))
        result = self._login(req, form.get("username", ""), form.get("password", ""), form.get("totp", ""))
        if not result.ok:
            error, warning = self._login_error(l10n, result)
            return self.login_form(req, "", error, _login_status(result), form.get("next", "/"),
                                   warning=warning, resume=form.get("resume", ""))
        return self.complete_login(req, result, form.get("next", "/"), form.get("resume", ""))

    def complete_login(self, req: Incoming, result: LoginResult, next_target: str, resume_id: str = "") -> Reply:
        """After a successful form login (both factors checked): the session, its cookie, where to go."""
        blocked = self._account_kind_refusal(req, result)
        if blocked is not None:
            return blocked
        token, session = self._open_session(req, result)
        cookies = [("Set-Cookie", self._cookie(self.cookie_name, token, path="/")),
                   ("Set-Cookie", self._cookie(self.csrf_cookie, "", path="/", max_age=0))]
        kept = self._take_kept(req, resume_id, session.user)
        if kept is not None:
            return Reply(303, b"", "text/plain", cookies, replay=(kept, token))
        target = safe_next(next_target, portal_pages=True)
        if self._is_admin(session.roles) and target == "/":
            target = "/_dpiguard/console"
        return Reply(303, b"", "text/plain", [("Location", target)] + cookies)

    def api_login(self, req: Incoming, body: bytes) -> Reply:
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
        l10n = self.l10n(req)
        if ctype != "application/json":
            # A cross-site HTML form cannot send application/json without a CORS preflight.
            return self._json(415, {"error": "unsupported_media_type", "message": "send application/json"})
        try:
            data = orjson.loads(body)
            username, password, totp = (str(data["username"]), str(data["password"]), str(data["totp"]))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._event(req, "login_failure", None, "deny", "invalid_credentials", "malformed_request")
            return self._json(400, {"error": "bad_request", "message": 'expected {"username","password","totp"}'})
        result = self._login(req, username, password, totp)
        if not result.ok:
            headers = [("Retry-After", str(result.retry_after))] if result.retry_after else []
            error, warning = self._login_error(l10n, result)
            data = {"error": result.reason, "message": error}
            if result.attempts_left is not None:
                data["attempts_left"] = result.attempts_left
            if result.retry_after:
                data["retry_after"] = result.retry_after
            return self._json(_login_status(result), data, headers)
        blocked = self._account_kind_refusal(req, result, api=True)
        if blocked is not None:
            return blocked
        token, session = self._open_session(req, result)
        return self._json(200, {
            "token": token, "token_type": "Bearer", "user": session.user, "roles": list(session.roles),
            "expires_at": int(session.abs_expiry), "idle_timeout": self.sessions.idle_timeout,
        }, [("Set-Cookie", self._cookie(self.cookie_name, token, path="/"))])

    def _is_admin(self, roles) -> bool:
        return bool(self.admin_roles) and not self.admin_roles.isdisjoint(roles)

    def _account_kind_refusal(self, req: Incoming, result: LoginResult, api: bool = False) -> Reply | None:
        """Administrative accounts are kept apart from care accounts: one mixing both kinds of roles
        is refused (rule 1 of dpi-rules.md), with a trace record; the RSSI must split it."""
        roles = tuple(result.user.roles)
        if not self._is_admin(roles) or all(r in self.admin_roles for r in roles):
            return None
        self._event(req, "login_failure", result.user.login, "deny", "mixed_account", ",".join(roles)[:200])
        l10n = self.l10n(req)
        text = l10n.gettext("This account mixes care roles and administrative roles (DPO, security officer, "
                            "helpdesk). Such accounts are refused: ask the security officer to split it.")
        if api:
            return self._json(403, {"error": "mixed_account", "message": text})
        return self.message(req, 403, "mixed_account", title=l10n.gettext("Account refused"), text=text)

    def _take_kept(self, req: Incoming, resume_id: str, user: str) -> KeptForm | None:
        if not resume_id or self.resume is None or not self.resume.enabled:
            return None
        kept = self.resume.take(resume_id, user)
        self._event(req, "form_resumed", user, "allow" if kept else "deny", "ok" if kept else "not_kept",
                    f"{kept.method} {kept.target.partition('?')[0][:200]} (kept by {kept.request_id})" if kept else None)
        return kept

    def _login(self, req: Incoming, username: str, password: str, totp: str) -> LoginResult:
        try:
            result = self.authenticator.login(username[:256], password[:1024], totp[:16], req.client_ip)
        except Exception:
            metrics.login("error")
            raise
        metrics.login("success" if result.ok else result.reason if result.reason in ("locked", "throttled")
                      else "failure")
        login = (result.user.login if result.user else username.strip().lower()[:64]) or None
        if result.ok:
            # detail: which second factor, when not the TOTP code (recovery_code, security_key)
            self._event(req, "login_success", login, "allow", "ok", result.detail if result.detail != "ok" else None,
                        idp=getattr(result, "source", "local"))
        else:
            event = {"locked": "login_locked", "throttled": "login_throttled"}.get(result.reason, "login_failure")
            self._event(req, event, login, "deny", result.reason, getattr(result, "detail", None))
        return result

    def _open_session(self, req: Incoming, result: LoginResult):
        old, _ = presented_token(req.headers, self.cookie_name)
        if old:
            self.sessions.destroy(old)  # the id is rotated at login
        return self.sessions.create(result.user.login, result.user.roles, login_step=result.totp_step,
                                    display_name=result.user.display_name, source=getattr(result, "source", "local"))

    def login_error(self, l10n: Localizer, result: LoginResult) -> tuple[str, str]:
        return self._login_error(l10n, result)

    def _login_error(self, l10n: Localizer, result: LoginResult) -> tuple[str, str]:
        """(what went wrong, a warning) for a failed login, in the person's language."""
        if result.reason == "throttled":
            return (l10n.ngettext("Many failed logins came from this workstation's network address: wait "
                                  "%(num)d second before trying again.",
                                  "Many failed logins came from this workstation's network address: wait "
                                  "%(num)d seconds before trying again.", max(1, result.retry_after)), "")
        if result.reason == "locked":
            unlock = l10n.clock(time.time() + result.retry_after)
            return (l10n.gettext("Too many failed attempts: the account is locked until %(time)s (%(wait)s).",
                                 time=unlock, wait=l10n.duration(result.retry_after)),
                    l10n.gettext("If you need access before then, call the helpdesk: %(helpdesk)s",
                                 helpdesk=self.pages.helpdesk(l10n)))
        if result.reason == "directory_unavailable":
            return (l10n.gettext("The hospital's user directory cannot be reached, so your password cannot be "
                                 "checked now. Try again in a few minutes."),
                    l10n.gettext("If it lasts, call the helpdesk: %(helpdesk)s", helpdesk=self.pages.helpdesk(l10n)))
        if result.reason == "no_role":
            return (l10n.gettext("Your account is known, but none of its directory groups gives access to the "
                                 "patient record."),
                    l10n.gettext("Ask your supervisor or the helpdesk to check your groups: %(helpdesk)s",
                                 helpdesk=self.pages.helpdesk(l10n)))
        error = l10n.gettext("Login failed: user name, password or authenticator code is incorrect.")
        left = result.attempts_left
        if left == 1:
            return error, l10n.gettext("Careful: one more failed attempt and the account is locked for %(wait)s.",
                                       wait=l10n.duration(self.authenticator.policy.lock_seconds))
        if left is not None and left > 1:
            return error, l10n.ngettext("%(num)d attempt left before the account is locked.",
                                        "%(num)d attempts left before the account is locked.", left)
        return error, ""

    # -- logout / whoami ---------------------------------------------------------------------------
    def logout_page(self, req: Incoming, query: str, token: str | None) -> Reply:
        session = self.sessions.get(token) if token else None
        switch = "switch" in parse_qs(query, max_num_fields=5)
        if session is None:
            reason = "switch_user" if switch else "logged_out"
            return Reply(303, b"", "text/plain", [("Location", f"/_dpiguard/login?reason={reason}")])
        return self.page(req, "logout.html", 200, session, csrf=session.csrf, switch=switch,
                         account=self.enrol is not None)

    def logout(self, req: Incoming, body: bytes, token: str | None, form: bool) -> Reply:
        session = self.sessions.get(token) if token else None
        sent = _form(body, 5) if form else {}
        if session is not None:
            if form and not hmac.compare_digest(sent.get("csrf", ""), session.csrf):
                self._event(req, "logout", session.user, "deny", "csrf_failed")
                if wants_html(req.headers, req.method):
                    l10n = self.l10n(req)
                    return self.message(req, 403, "csrf_failed", title=l10n.gettext("Not logged out"),
                                        links=[("/_dpiguard/logout", l10n.gettext("Log out"))], session=session)
                return self._json(403, {"error": "csrf_failed"})
            idp_logout = self.oidc.logout_target(session) if self.oidc is not None else None
            self.sessions.destroy(token)
            self._event(req, "logout", session.user, "allow", "ok", "and at the identity provider" if idp_logout else None)
        else:
            idp_logout = None
        clear = [("Set-Cookie", self._cookie(self.cookie_name, "", path="/", max_age=0)),
                 ("Clear-Site-Data", '"cache"')]
        if idp_logout and form:  # RP-initiated logout: the browser goes on to the IdP (not a form redirect: CSP)
            l10n = self.l10n(req)
            return self.page(req, "oidc_continue.html", 200, None, clear, title=l10n.gettext("You are logged out"),
                             text=l10n.gettext("Logging you out of the identity provider too…"), target=idp_logout,
                             label=l10n.gettext("Continue"))
        if idp_logout:
            return self._json(200, {"logged_out": True, "idp_logout": idp_logout}, clear)
        if form:
            then = "switch_user" if sent.get("then") == "switch_user" else "logged_out"
            return Reply(303, b"", "text/plain", [("Location", f"/_dpiguard/login?reason={then}")] + clear)
        return self._json(200, {"logged_out": session is not None}, clear)

    def whoami(self, req: Incoming, token: str | None) -> Reply:
        session = self.sessions.get(token) if token else None
        if session is None:
            return self._json(401, {"error": "not_authenticated"})
        return self._json(200, {
            "user": session.user, "roles": list(session.roles), "units": self.units_of(session.user),
            "expires_at": int(session.abs_expiry), "idle_timeout": self.sessions.idle_timeout,
            "idle_expires_at": int(session.last_seen + self.sessions.idle_timeout), "csrf": session.csrf,
        })

    # -- refusals ----------------------------------------------------------------------------------
    def localize_outcome(self, req: Incoming, body: bytes) -> bytes:
        """dpiguard's own FHIR OperationOutcome (made where no person's language is known) with each
        issue's ``details.text`` in the person's language; the codes never change. Anything else (the
        DPI's resources, a body that is not an outcome) is returned as it is."""
        if b'"OperationOutcome"' not in body[:64]:
            return body
        try:
            outcome = orjson.loads(body)
            l10n = self.l10n(req)
            changed = False
            for issue in outcome.get("issue", []):
                details = issue.get("details") or {}
                for coding in details.get("coding", []):
                    if coding.get("system") == REASON_SYSTEM and coding.get("code") in REASON_TEXT:
                        details["text"] = reason_text(l10n, coding["code"])
                        changed = True
            return orjson.dumps(outcome) if changed else body
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            return body

    def refusal(self, req: Incoming, v: Verdict) -> Reply:
        """The answer to a refused request. Runs on the event loop: no I/O here."""
        l10n = self.l10n(req)
        text = reason_text(l10n, v.reason, v.message)
        admin = v.status == 403 and bool(v.roles) and all(r in self.admin_roles for r in v.roles)
        if admin:  # an administrative account on the DPI: it opens no record (the code stays the same)
            text = reason_text(l10n, "admin_account")
        html = wants_html(req.headers, req.method) and not v.fhir and not is_fhir(req.target, req.headers)
        if v.status == 401 and html:
            next_target = req.target if req.method in ("GET", "HEAD") else (
                same_origin_path(req.headers) or req.target)
            location = "/_dpiguard/login?next=" + quote(safe_next(next_target), safe="")
            if v.reason == "session_expired":
                location += "&reason=session_expired"
            return Reply(302 if req.method in ("GET", "HEAD") else 303, b"", "text/plain", [("Location", location)])
        extra = [("WWW-Authenticate", 'Bearer realm="dpiguard"')] if v.status == 401 else []
        if v.retry_after:
            extra.append(("Retry-After", str(v.retry_after)))
        if v.fhir or is_fhir(req.target, req.headers):
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{
                    "severity": "error",
                    "code": v.fhir_issue or FHIR_ISSUE_CODE.get(v.status, "forbidden"),
                    "details": {"coding": [{"system": REASON_SYSTEM, "code": v.reason}],
                                "text": f"{text} ({detail})" if (detail := _detail(v)) else text},
                    "diagnostics": f"dpiguard refused the request ({v.reason}); request id {req.request_id}"
                                   + (f": {v.message}" if v.message else ""),
                }],
            }
            return Reply(v.status, orjson.dumps(outcome), "application/fhir+json", extra)
        bg_policy = (v.policies or self.policies()).breakglass
        offer = self.breakglass is not None and self.breakglass.offer(bg_policy, v.reason, v.roles, v.patient,
                                                                      v.category, v.action)
        if html:
            fields = (self._breakglass_form(l10n, bg_policy, v.patient, v.session.csrf, req.target)
                      if offer and v.session else None)
            session = v.session
            return self.page(req, "refusal.html", v.status, session, extra, text=text, reason=v.reason,
                             request_id=req.request_id, patient=v.patient or "",
                             category=self.pages.category_label(l10n, v.category),
                             action=l10n.gettext(ACTION_TEXT[v.action]) if v.action in ACTION_TEXT else "",
                             back=same_origin_path(req.headers), advice=self._advice(l10n, v, bool(fields)),
                             breakglass=fields)
        data = {"error": v.reason, "message": text, "request_id": req.request_id}
        if _detail(v):
            data["detail"] = v.message
        if offer:
            data["break_glass"] = "/_dpiguard/api/breakglass"
        return self._json(v.status, data, extra)

    def _advice(self, l10n: Localizer, v: Verdict, breakglass: bool) -> list[str]:
        helpdesk = self.pages.helpdesk(l10n)
        out = []
        if v.roles and all(r in self.admin_roles for r in v.roles):
            return [l10n.gettext("Open the dpiguard console: /_dpiguard/console")]
        if breakglass:
            out.append(l10n.gettext("If this is an emergency, open an emergency access (bris de glace) with the "
                                    "form below: it takes a reason, a sentence and your current code."))
        if v.reason == "not_in_care_team":
            out.append(l10n.gettext("If you take care of this patient, ask the unit's executive or the "
                                    "admissions office to add the stay or the assignment to the patient record."))
        elif v.reason == "category_not_permitted":
            out.append(l10n.gettext("Your role does not need this kind of data. If it should, ask your "
                                    "supervisor: the security officer decides what each role sees."))
        elif v.reason == "patient_objection":
            out.append(l10n.gettext("The patient's objection can only be lifted by the patient; contact the "
                                    "data protection officer if you have a question."))
        elif v.reason == "mass_access":
            out.append(l10n.gettext("Your supervisor or the helpdesk can lift the pause once they checked."))
        out.append(l10n.gettext("Quote the reference below to the helpdesk. %(helpdesk)s", helpdesk=helpdesk))
        return out

    def keep_form(self, req: Incoming, body: bytes, token: str | None) -> Reply:
        """A browser form sent with an ended session: keep it for its author, send them to log in.
        Runs in a worker thread. Anything not keepable gets the usual login redirect."""
        owner = self.sessions.owner_of_ended(token) if token else None
        keepable = (owner is not None and self.resume is not None and self.resume.enabled
                    and len(body) <= self.resume.max_bytes
                    and req.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none"))
        next_target = same_origin_path(req.headers) or "/"
        location = "/_dpiguard/login?next=" + quote(safe_next(next_target), safe="") + "&reason=session_expired"
        if not keepable:
            self._event(req, "form_kept", owner, "deny", "not_kept", f"{req.method} {req.target[:200]}")
            return Reply(303, b"", "text/plain", [("Location", location)])
        resume_id = self.resume.keep(owner, req.method, req.target, req.headers.get("content-type", ""), body,
                                     req.request_id)
        self._event(req, "form_kept", owner, "allow", "ok", f"{req.method} {req.target.partition('?')[0][:200]}")
        return Reply(303, b"", "text/plain", [("Location", location + "&resume=" + resume_id)])

    # -- emergency access (bris de glace) ----------------------------------------------------------
    def _breakglass_form(self, l10n: Localizer, policy, patient: str, csrf: str, next_target: str, error: str = "",
                         reason: str = "", text: str = "", warning: str = "") -> dict[str, Any]:
        """The fields of the emergency-access form (templates/breakglass_form.html)."""
        reasons = [(code, l10n.gettext(label)) for code, label in policy.reasons.items()]
        return {"policy": policy, "reasons": reasons, "patient": patient, "csrf": csrf, "next": safe_next(next_target),
                "keys": self.enrol is not None and self.enrol.keys is not None and self.breakglass is not None,
                "error": error, "warning": warning, "reason": reason, "text": text,
                "duration": l10n.duration(policy.duration_seconds)}

    def _breakglass_message(self, l10n: Localizer, outcome, policy) -> tuple[str, str]:
        """(what went wrong, a warning) for a refused emergency access, in the person's language."""
        e = outcome.error
        if e == "invalid_request":
            return {"patient": l10n.gettext("Unknown or missing patient."),
                    "reason": l10n.gettext("Choose a reason from the list."),
                    "text_short": l10n.gettext("The justification needs at least %(n)s characters.",
                                               n=policy.justification_min_length),
                    "text_invalid": l10n.gettext("The justification must be plain text of at most 2000 characters."),
                    }.get(outcome.field, l10n.gettext("The request is incomplete.")), ""
        if e == "invalid_totp":
            left = outcome.attempts_left
            warning = ""
            if left == 1:
                warning = l10n.gettext("Careful: one more wrong code and the account is locked for %(wait)s.",
                                       wait=l10n.duration(self.authenticator.policy.lock_seconds))
            elif left:
                warning = l10n.ngettext("%(num)d attempt left before the account is locked.",
                                        "%(num)d attempts left before the account is locked.", left)
            return l10n.gettext("The authenticator code is incorrect."), warning
        if e == "totp_reused":
            return (l10n.ngettext("This code was already used. The next code appears in %(num)d second: type it "
                                  "then. This is not counted as a failed attempt.",
                                  "This code was already used. The next code appears in %(num)d seconds: type it "
                                  "then. This is not counted as a failed attempt.", outcome.retry_after), "")
        if e == "locked":
            return (l10n.gettext("Too many failed attempts: the account is locked until %(time)s (%(wait)s).",
                                 time=l10n.clock(time.time() + outcome.retry_after),
                                 wait=l10n.duration(outcome.retry_after)),
                    l10n.gettext("Call the helpdesk: %(helpdesk)s", helpdesk=self.pages.helpdesk(l10n)))
        if e == "throttled":
            return (l10n.ngettext("Too many attempts from this network address: wait %(num)d second.",
                                  "Too many attempts from this network address: wait %(num)d seconds.",
                                  max(1, outcome.retry_after)), "")
        return {"break_glass_disabled": l10n.gettext("Emergency access is not enabled here."),
                "break_glass_forbidden": l10n.gettext("Your role may not use emergency access."),
                "patient_objection": l10n.gettext("The patient has objected to your access; emergency access "
                                                  "cannot override it."),
                }.get(e, outcome.message), ""

    def breakglass_request(self, req: Incoming, body: bytes, token: str | None, form: bool,
                           second_factor=None) -> Reply:
        session = self.sessions.get(token) if token else None
        l10n = self.l10n(req)
        if session is None:
            self._event(req, "break_glass_request", None, "deny", "not_authenticated")
            if form:
                return self.message(req, 401, "session_expired", title=l10n.gettext("Session ended"),
                                    links=[("/_dpiguard/login", l10n.gettext("Log in"))])
            return self._json(401, {"error": "not_authenticated", "message": reason_text(l10n, "not_authenticated")},
                              [("WWW-Authenticate", 'Bearer realm="dpiguard"')])
        _, source = presented_token(req.headers, self.cookie_name)
        if form:
            data = _form(body)
            if not hmac.compare_digest(data.get("csrf", ""), session.csrf):
                self._event(req, "break_glass_request", session.user, "deny", "csrf_failed")
                return self.message(req, 403, "csrf_failed", title=l10n.gettext("Emergency access not opened"),
                                    session=session)
        else:
            ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return self._json(415, {"error": "unsupported_media_type", "message": "send application/json"})
            try:
                data = orjson.loads(body)
                if not isinstance(data, dict):
                    raise TypeError
            except (orjson.JSONDecodeError, TypeError):
                self._event(req, "break_glass_request", session.user, "deny", "invalid_request", "malformed_request")
                return self._json(400, {"error": "invalid_request",
                                        "message": 'expected {"patient","reason","text","totp"}'})
        if source == "cookie" and req.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            self._event(req, "break_glass_request", session.user, "deny", "csrf_origin_mismatch")
            return self._json(403, {"error": "csrf_origin_mismatch"})
        bg_policy = self.policies().breakglass
        outcome = self.breakglass.request(
            bg_policy, user=session.user, roles=session.roles, patient=data.get("patient"), reason=data.get("reason"),
            text=data.get("text"), totp=data.get("totp"), client_ip=req.client_ip, request_id=req.request_id,
            login_step=session.login_step, claim_login_code=lambda: self.sessions.claim_login_code(session),
            second_factor=second_factor)
        self._traced.count += 1  # the emergency-access service traces every request it decides
        headers = [("Retry-After", str(outcome.retry_after))] if outcome.retry_after and outcome.status == 429 else []
        if form:
            if outcome.ok:
                g = outcome.grant
                return self.page(req, "breakglass_granted.html", 201, session, grant=g, until=l10n.clock(g.end),
                                 duration=l10n.duration(g.end - g.start), next=safe_next(data.get("next", "/")),
                                 csrf=session.csrf, reason_label=l10n.gettext(bg_policy.reasons.get(g.reason, g.reason)))
            message, warning = self._breakglass_message(l10n, outcome, bg_policy)
            correctable = outcome.status in (400, 401)
            fields = (self._breakglass_form(l10n, bg_policy, str(data.get("patient", ""))[:64], session.csrf,
                                            data.get("next", "/"), message, str(data.get("reason", "")),
                                            str(data.get("text", ""))[:2000], warning)
                      if correctable else None)  # a request that may be corrected: the form again
            advice = [warning] if warning else []
            advice.append(l10n.gettext("Quote the reference below to the helpdesk. %(helpdesk)s",
                                       helpdesk=self.pages.helpdesk(l10n)))
            return self.page(req, "breakglass_refused.html", outcome.status, session, headers, error=outcome.error,
                             request_id=req.request_id, message=message, breakglass=fields, advice=advice,
                             back=safe_next(data.get("next", "/")))
        if not outcome.ok:
            message, warning = self._breakglass_message(l10n, outcome, bg_policy)
            out = {"error": outcome.error, "message": message, "request_id": req.request_id}
            if outcome.attempts_left is not None:
                out["attempts_left"] = outcome.attempts_left
            if outcome.retry_after:
                out["retry_after"] = outcome.retry_after
            return self._json(outcome.status, out, headers)
        g = outcome.grant
        return self._json(201, {"break_glass_id": g.id, "patient": g.patient, "reason": g.reason,
                                "categories": list(g.categories), "actions": list(g.actions),
                                "start": g.start, "expires_at": g.end, "request_id": req.request_id,
                                "end": "/_dpiguard/breakglass/end"})

    def breakglass_end(self, req: Incoming, query: str, body: bytes, token: str | None) -> Reply:
        """GET: confirm page; POST (CSRF): end one's own emergency access now, on every instance."""
        session = self.sessions.get(token) if token else None
        l10n = self.l10n(req)
        if session is None:
            return self.message(req, 401, "not_authenticated", title=l10n.gettext("Session ended"),
                                links=[("/_dpiguard/login", l10n.gettext("Log in"))])
        if req.method == "GET":
            grant_id = parse_qs(query, max_num_fields=5).get("id", [""])[0][:32]
            return self.page(req, "breakglass_end.html", 200, session, csrf=session.csrf, grant_id=grant_id)
        data = _form(body)
        if not hmac.compare_digest(data.get("csrf", ""), session.csrf):
            self._event(req, "break_glass_end", session.user, "deny", "csrf_failed")
            return self.message(req, 403, "csrf_failed", title=l10n.gettext("Emergency access not ended"),
                                session=session)
        grant = self.breakglass.end(data.get("id", ""), user=session.user, client_ip=req.client_ip,
                                    request_id=req.request_id)
        self._traced.count += 1
        if grant is None:
            return self.message(req, 404, "unknown_grant", title=l10n.gettext("Emergency access not ended"),
                                text=l10n.gettext("This emergency access is not one of yours, or it does not exist."),
                                session=session)
        return self.message(req, 200, "", title=l10n.gettext("Emergency access ended"), error=False,
                            text=l10n.gettext("The emergency access to the record %(patient)s ended at %(time)s.",
                                              patient=grant.patient, time=l10n.clock(time.time())),
                            session=session)

    # -- helpers -----------------------------------------------------------------------------------
    def _cookie(self, name: str, value: str, path: str, max_age: int | None = None) -> str:
        parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Strict"]
        if self.secure:
            parts.append("Secure")
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        return "; ".join(parts)

    def session_cookie(self, token: str) -> str:
        """The Set-Cookie value of a new session (a login by another route: OpenID Connect)."""
        return self._cookie(self.cookie_name, token, path="/")

    def _json(self, status: int, data: dict, headers: list[tuple[str, str]] | None = None) -> Reply:
        return Reply(status, orjson.dumps(data), "application/json", headers or [])

    def event(self, req: Incoming, event: str, user: str | None, outcome: str, reason: str,
              detail: str | None = None, **extra: Any) -> None:
        """Write a trace record about this request (the console's actions use it too)."""
        self._event(req, event, user, outcome, reason, detail, **extra)

    def _event(self, req: Incoming, event: str, user: str | None, outcome: str, reason: str,
               detail: str | None = None, **extra: Any) -> None:
        self._traced.count = getattr(self._traced, "count", 0) + 1
        self.audit.write({
            "event": event, "request_id": req.request_id, "outcome": outcome, "reason": reason,
            "user": user, "method": req.method, "path": req.target.partition("?")[0][:256],
            "client": req.client_ip, "detail": detail, **extra,
        })


def now_s() -> float:
    return time.time()
