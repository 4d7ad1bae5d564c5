"""dpiguard's own pages under the reserved prefix ``/_dpiguard/`` (never forwarded upstream).

- ``GET  /_dpiguard/login``        login form (user name, password and TOTP code on one form, so a
                                    failure never tells which factor was wrong)
- ``POST /_dpiguard/login``        form login; CSRF: double-submit cookie + SameSite=Strict
- ``POST /_dpiguard/api/login``    JSON login for scripts: ``{"username","password","totp"}``
- ``POST /_dpiguard/logout``       form logout (CSRF token of the session)
- ``POST /_dpiguard/api/logout``   JSON logout (bearer token or cookie)
- ``GET  /_dpiguard/api/session``  who am I, session expiry
- ``GET  /_dpiguard/health``       liveness/readiness summary
- ``POST /_dpiguard/breakglass``   emergency access form (from the refusal page; CSRF = session token)
- ``POST /_dpiguard/api/breakglass`` emergency access for scripts: ``{"patient","reason","text","totp"}``
  (see dpiguard/decision/breakglass.py and docs/breakglass.md)

Also renders refusals: HTML for browsers, JSON for API clients, FHIR OperationOutcome for FHIR paths.

The HTML pages are Jinja2 templates in ``dpiguard/edge/templates/`` (``base.html`` is the layout the
others extend), rendered with autoescaping: every value put into a page is escaped for HTML.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, quote, urlsplit

import orjson
from jinja2 import Environment, PackageLoader, StrictUndefined

from dpiguard import metrics
from dpiguard.audit.chain import AuditError, AuditLog
from dpiguard.auth.login import Authenticator, LoginResult
from dpiguard.auth.sessions import SessionStore, cookie_value, presented_token
from dpiguard.decision.verdict import Incoming, Verdict
from dpiguard.policy.snapshot import PolicySet

PREFIX = "/_dpiguard/"
MAX_BODY = 16 * 1024
REASON_SYSTEM = "urn:dpiguard:reason"

SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy",
     "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
)

FHIR_ISSUE_CODE = {
    400: "invalid", 401: "login", 403: "forbidden", 405: "not-supported", 414: "too-long",
    429: "throttled", 431: "too-long", 503: "exception",
}

REASON_TEXT = {
    "not_authenticated": "Please log in.",
    "session_expired": "Your session has ended (inactivity or maximum duration). Please log in again.",
    "not_in_care_team": "You are not in this patient's care team.",
    "category_not_permitted": "Your role does not give access to this kind of data.",
    "no_route": "This address is not open through dpiguard.",
    "hostile_path": "The request address is malformed and was refused.",
    "ambiguous_patient": "The request names more than one patient and was refused.",
    "forged_identity_header": "The request carried an identity header that only dpiguard may set.",
    "csrf_origin_mismatch": "Cross-site request refused.",
    "header_too_large": "The request headers are too large.",
    "internal_error": "dpiguard could not take a safe decision; access refused. Contact IT support.",
    "mass_access": "you opened many different patients' records in a short time; access is paused. Contact your supervisor.",
    "audit_unavailable": "the access trace could not be written, so no patient data is served. Contact IT support.",
    "tls_required": "This service is only served over HTTPS.",
    "method_not_allowed": "This HTTP method is not allowed.",
    "patient_objection": "The patient has objected to your access to their record.",
}


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str
    headers: list[tuple[str, str]] = field(default_factory=list)


def wants_html(headers: Mapping[str, str], method: str) -> bool:
    return method in ("GET", "HEAD") and "text/html" in headers.get("accept", "")


def is_fhir(target: str, headers: Mapping[str, str]) -> bool:
    return target.startswith("/fhir/") or "fhir+json" in headers.get("accept", "")


#: The portal's templates, parsed once on first use and kept (no reload: they ship with the package).
_TEMPLATES = Environment(loader=PackageLoader("dpiguard.edge", "templates"), autoescape=True,
                         undefined=StrictUndefined, auto_reload=False)


def _page(template: str, **context: Any) -> bytes:
    """A page of ``templates/``; every value of ``context`` is escaped where the template puts it."""
    return _TEMPLATES.get_template(template).render(context).encode()


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
            if route == ("GET", "/_dpiguard/login"):
                return self.login_form(req, query)
            if route == ("POST", "/_dpiguard/login"):
                return self.login_submit(req, body)
            if route == ("POST", "/_dpiguard/api/login"):
                return self.api_login(req, body)
            if route == ("POST", "/_dpiguard/logout"):
                return self.logout(req, body, session_token, form=True)
            if route == ("POST", "/_dpiguard/api/logout"):
                return self.logout(req, body, session_token, form=False)
            if route == ("GET", "/_dpiguard/api/session"):
                return self.whoami(req, session_token)
            if route == ("POST", "/_dpiguard/breakglass") and self.breakglass is not None:
                return self.breakglass_request(req, body, session_token, form=True)
            if route == ("POST", "/_dpiguard/api/breakglass") and self.breakglass is not None:
                return self.breakglass_request(req, body, session_token, form=False)
            if route == ("GET", "/_dpiguard/health"):
                info = self.health()
                return self._json(200 if info.get("ready") else 503, info)
            return self._json(404, {"error": "not_found", "request_id": req.request_id})
        except AuditError:
            return self._json(503, {"error": "audit_unavailable", "message": "the access trace could not be written",
                                    "request_id": req.request_id})
        except Exception as exc:  # fail closed, and say so
            try:
                self._event(req, "portal_error", None, "deny", "internal_error", f"{type(exc).__name__}: {exc}"[:300])
            except AuditError:
                pass
            return self._json(503, {"error": "internal_error", "request_id": req.request_id})

    # -- login -------------------------------------------------------------------------------------
    def login_form(self, req: Incoming, query: str, error: str = "", status: int = 200,
                   next_target: str | None = None) -> Reply:
        params = parse_qs(query, max_num_fields=10)
        next_target = safe_next(next_target if next_target is not None else params.get("next", ["/"])[0])
        csrf = secrets.token_urlsafe(24)
        body = _page("login.html", error=error, reason=params.get("reason", [""])[0],
                     session_expired=REASON_TEXT["session_expired"], csrf=csrf, next=next_target)
        return Reply(status, body, "text/html; charset=utf-8",
                     [("Set-Cookie", self._cookie(self.csrf_cookie, csrf, path="/"))])

    def login_submit(self, req: Incoming, body: bytes) -> Reply:
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=10).items()}
        sent = form.get("csrf", "")
        cookie = cookie_value(req.headers.get("cookie", ""), self.csrf_cookie)
        if not sent or not cookie or not hmac.compare_digest(sent, cookie):
            self._event(req, "login_failure", form.get("username", "")[:64] or None, "deny", "csrf_failed")
            return self.login_form(req, "", "Your form expired; please try again.", 400, form.get("next", "/"))
        result = self._login(req, form.get("username", ""), form.get("password", ""), form.get("totp", ""))
        if not result.ok:
            return self.login_form(req, "", _login_error(result), 429 if result.retry_after else 401,
                                   form.get("next", "/"))
        token, session = self._open_session(req, result)
        headers = [("Location", safe_next(form.get("next", "/"))),
                   ("Set-Cookie", self._cookie(self.cookie_name, token, path="/")),
                   ("Set-Cookie", self._cookie(self.csrf_cookie, "", path="/", max_age=0))]
        return Reply(303, b"", "text/plain", headers)

    def api_login(self, req: Incoming, body: bytes) -> Reply:
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
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
            return self._json(429 if result.retry_after else 401,
                              {"error": result.reason, "message": _login_error(result)}, headers)
        token, session = self._open_session(req, result)
        return self._json(200, {
            "token": token, "token_type": "Bearer", "user": session.user, "roles": list(session.roles),
            "expires_at": int(session.abs_expiry), "idle_timeout": self.sessions.idle_timeout,
        }, [("Set-Cookie", self._cookie(self.cookie_name, token, path="/"))])

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
            self._event(req, "login_success", login, "allow", "ok")
        else:
            event = {"locked": "login_locked", "throttled": "login_throttled"}.get(result.reason, "login_failure")
            self._event(req, event, login, "deny", result.reason, getattr(result, "detail", None))
        return result

    def _open_session(self, req: Incoming, result: LoginResult):
        old, _ = presented_token(req.headers, self.cookie_name)
        if old:
            self.sessions.destroy(old)  # the id is rotated at login
        token, session = self.sessions.create(result.user.login, result.user.roles)
        return token, session

    # -- logout / whoami ---------------------------------------------------------------------------
    def logout(self, req: Incoming, body: bytes, token: str | None, form: bool) -> Reply:
        session = self.sessions.get(token) if token else None
        if session is not None:
            if form:
                sent = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=5).items()}
                if not hmac.compare_digest(sent.get("csrf", ""), session.csrf):
                    self._event(req, "logout", session.user, "deny", "csrf_failed")
                    return self._json(403, {"error": "csrf_failed"})
            self.sessions.destroy(token)
            self._event(req, "logout", session.user, "allow", "ok")
        clear = ("Set-Cookie", self._cookie(self.cookie_name, "", path="/", max_age=0))
        if form:
            return Reply(303, b"", "text/plain", [("Location", "/_dpiguard/login?reason=logged_out"), clear])
        return self._json(200, {"logged_out": session is not None}, [clear])

    def whoami(self, req: Incoming, token: str | None) -> Reply:
        session = self.sessions.get(token) if token else None
        if session is None:
            return self._json(401, {"error": "not_authenticated"})
        return self._json(200, {
            "user": session.user, "roles": list(session.roles), "units": self.units_of(session.user),
            "expires_at": int(session.abs_expiry), "idle_timeout": self.sessions.idle_timeout,
            "csrf": session.csrf,
        })

    # -- refusals ----------------------------------------------------------------------------------
    def refusal(self, req: Incoming, v: Verdict) -> Reply:
        text = v.message or REASON_TEXT.get(v.reason, v.reason)
        if v.status == 401 and wants_html(req.headers, req.method) and not is_fhir(req.target, req.headers):
            location = "/_dpiguard/login?next=" + quote(safe_next(req.target), safe="")
            if v.reason == "session_expired":
                location += "&reason=session_expired"
            return Reply(302, b"", "text/plain", [("Location", location)])
        extra = [("WWW-Authenticate", 'Bearer realm="dpiguard"')] if v.status == 401 else []
        if v.retry_after:
            extra.append(("Retry-After", str(v.retry_after)))
        if v.fhir or is_fhir(req.target, req.headers):
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{
                    "severity": "error",
                    "code": v.fhir_issue or FHIR_ISSUE_CODE.get(v.status, "forbidden"),
                    "details": {"coding": [{"system": REASON_SYSTEM, "code": v.reason}], "text": text},
                    "diagnostics": f"dpiguard refused the request ({v.reason}); request id {req.request_id}",
                }],
            }
            return Reply(v.status, orjson.dumps(outcome), "application/fhir+json", extra)
        bg_policy = (v.policies or self.policies()).breakglass
        offer = self.breakglass is not None and self.breakglass.offer(bg_policy, v.reason, v.roles, v.patient,
                                                                      v.category, v.action)
        if wants_html(req.headers, req.method):
            fields = (self._breakglass_form(bg_policy, v.patient, v.session.csrf, req.target)
                      if offer and v.session else None)
            body = _page("refusal.html", text=REASON_TEXT.get(v.reason, text), reason=v.reason,
                         request_id=req.request_id, breakglass=fields)
            return Reply(v.status, body, "text/html; charset=utf-8", extra)
        data = {"error": v.reason, "message": text, "request_id": req.request_id}
        if offer:
            data["break_glass"] = "/_dpiguard/api/breakglass"
        return self._json(v.status, data, extra)

    # -- emergency access (bris de glace) ----------------------------------------------------------
    @staticmethod
    def _breakglass_form(policy, patient: str, csrf: str, next_target: str, error: str = "",
                         reason: str = "", text: str = "") -> dict[str, Any]:
        """The fields of the emergency-access form (templates/breakglass_form.html)."""
        return {"policy": policy, "patient": patient, "csrf": csrf, "next": safe_next(next_target),
                "error": error, "reason": reason, "text": text}

    def breakglass_request(self, req: Incoming, body: bytes, token: str | None, form: bool) -> Reply:
        session = self.sessions.get(token) if token else None
        if session is None:
            self._event(req, "break_glass_request", None, "deny", "not_authenticated")
            return self._json(401, {"error": "not_authenticated", "message": "please log in"},
                              [("WWW-Authenticate", 'Bearer realm="dpiguard"')])
        _, source = presented_token(req.headers, self.cookie_name)
        if form:
            data = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=10).items()}
            if not hmac.compare_digest(data.get("csrf", ""), session.csrf):
                self._event(req, "break_glass_request", session.user, "deny", "csrf_failed")
                return self._json(403, {"error": "csrf_failed"})
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
            text=data.get("text"), totp=data.get("totp"), client_ip=req.client_ip, request_id=req.request_id)
        self._traced.count += 1  # the emergency-access service traces every request it decides
        headers = [("Retry-After", str(outcome.retry_after))] if outcome.retry_after else []
        if form:
            if outcome.ok:
                return Reply(303, b"", "text/plain", [("Location", safe_next(data.get("next", "/")))])
            fields = (self._breakglass_form(bg_policy, str(data.get("patient", ""))[:64], session.csrf,
                                            data.get("next", "/"), outcome.message, str(data.get("reason", "")),
                                            str(data.get("text", ""))[:2000])
                      if outcome.status in (400, 401) else None)  # a request that may be corrected: the form again
            page = _page("breakglass_refused.html", error=outcome.error, request_id=req.request_id,
                         message=outcome.message, breakglass=fields)
            return Reply(outcome.status, page, "text/html; charset=utf-8", headers)
        if not outcome.ok:
            return self._json(outcome.status, {"error": outcome.error, "message": outcome.message,
                                               "request_id": req.request_id}, headers)
        g = outcome.grant
        return self._json(201, {"break_glass_id": g.id, "patient": g.patient, "reason": g.reason,
                                "categories": list(g.categories), "actions": list(g.actions),
                                "start": g.start, "expires_at": g.end, "request_id": req.request_id})

    # -- helpers -----------------------------------------------------------------------------------
    def _cookie(self, name: str, value: str, path: str, max_age: int | None = None) -> str:
        parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Strict"]
        if self.secure:
            parts.append("Secure")
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        return "; ".join(parts)

    def _json(self, status: int, data: dict, headers: list[tuple[str, str]] | None = None) -> Reply:
        return Reply(status, orjson.dumps(data), "application/json", headers or [])

    def _event(self, req: Incoming, event: str, user: str | None, outcome: str, reason: str,
               detail: str | None = None) -> None:
        self._traced.count = getattr(self._traced, "count", 0) + 1
        self.audit.write({
            "event": event, "request_id": req.request_id, "outcome": outcome, "reason": reason,
            "user": user, "method": req.method, "path": req.target.partition("?")[0][:256],
            "client": req.client_ip, "detail": detail,
        })


def _login_error(result: LoginResult) -> str:
    if result.reason in ("locked", "throttled"):
        minutes = max(1, (result.retry_after + 59) // 60)
        return f"Too many failed attempts. Try again in {minutes} minute(s)."
    return "Login failed: user name, password or authenticator code is incorrect."


def safe_next(target: str) -> str:
    """Only a local path may be a post-login redirect (no open redirect, no portal loop)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(c) < 0x20 for c in target) or target.startswith(PREFIX) or len(target) > 2048:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def now_s() -> float:
    return time.time()
