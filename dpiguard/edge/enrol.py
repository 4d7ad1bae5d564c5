"""Self-service enrolment and the security-key login step, under ``/_dpiguard/`` (never forwarded).

- ``GET  /_dpiguard/enrol?t=TOKEN``   step 1: choose a password (the rule is shown and enforced)
- ``POST /_dpiguard/enrol``           the password; a valid one uses up the link (once, any instance) and
                                      opens an enrolment session (cookie ``dpiguard_enrol``, 30 minutes,
                                      Path=/_dpiguard/enrol, HttpOnly, SameSite=Strict)
- ``GET  /_dpiguard/enrol/factor``    step 2: TOTP (QR code in the page) or a security key
- ``POST /_dpiguard/enrol/totp``      a code of the new secret: only then is the secret installed
- ``POST /_dpiguard/enrol/key``       the browser's registration answer (``webauthn.js``)
- ``GET  /_dpiguard/enrol/codes``     step 3: recovery codes, shown once; the enrolment session ends
- ``POST /_dpiguard/login/key``       login with a security key: user name and password first ...
- ``POST /_dpiguard/login/key/finish`` ... then the key's assertion (``webauthn.js``)
- ``POST /_dpiguard/breakglass/key``, ``/breakglass/key/finish``: emergency access with the key as the
                                      re-asked second factor (the form's fields go through the key page)
- ``GET  /_dpiguard/account``         the logged-in user's keys (list, add, remove) and recovery codes
- ``POST /_dpiguard/account/key``, ``/account/key/remove``, ``/account/codes`` (session CSRF token)

Every step writes a trace record (``enrol_*``, ``login_*``); a refused key assertion counts as a failed
login (lockout, address throttling), and a counter that went back is traced as ``security_key_clone``.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from urllib.parse import parse_qs

import pyotp

from dpiguard.auth.enrolment import (
    CNIL_MIN_BITS,
    CONTAINS_LOGIN,
    MISMATCH,
    PASSWORD_MIN_LENGTH,
    TOO_LONG,
    EnrolmentLinks,
    RecoveryCodes,
    password_problems,
)
from dpiguard.auth.login import DIRECTORY_UNAVAILABLE
from dpiguard.auth.qr import qr_png_bytes
from dpiguard.auth.sessions import cookie_value, sid_hash
from dpiguard.auth.users import UserDirectory
from dpiguard.auth.webauthn import KEY_CLONED, SecurityKeys
from dpiguard.decision.verdict import Incoming
from dpiguard.edge.pages import safe_next
from dpiguard.edge.portal import SCRIPT_CSP, Reply
from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys

ENROL_COOKIE = "dpiguard_enrol"
ENROL_SESSION_SECONDS = 1800
MAX_CREDENTIAL = 12 * 1024

STAGE_FACTOR = "factor"
STAGE_CODES = "codes"


def _form(body: bytes, fields: int = 12) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=fields).items()}


class Enrolment:
    def __init__(self, *, redis_client, prefix: str, users: UserDirectory, links: EnrolmentLinks,
                 recovery: RecoveryCodes, keys: SecurityKeys | None, secure_cookies: bool):
        self.redis = redis_client
        self.k = Keys(prefix)
        self.users = users
        self.links = links
        self.recovery = recovery
        self.keys = keys
        self.secure = secure_cookies
        self.cookie = ("__Host-" if secure_cookies else "") + ENROL_COOKIE

    def handle(self, portal, req: Incoming, path: str, query: str, body: bytes,
               session_token: str | None = None) -> Reply | None:
        route = (req.method, path)
        if path.startswith("/_dpiguard/breakglass/key") and (self.keys is None or portal.breakglass is None):
            return None
        if route == ("POST", "/_dpiguard/breakglass/key"):
            return self.breakglass_key_start(portal, req, body, session_token)
        if route == ("POST", "/_dpiguard/breakglass/key/finish"):
            return self.breakglass_key_finish(portal, req, body, session_token)
        if path == "/_dpiguard/account" or path.startswith("/_dpiguard/account/"):
            return self.account(portal, req, route, body, session_token)
        if route == ("GET", "/_dpiguard/enrol"):
            return self.password_page(portal, req, parse_qs(query, max_num_fields=5).get("t", [""])[0])
        if route == ("POST", "/_dpiguard/enrol"):
            return self.password_submit(portal, req, body)
        if route == ("GET", "/_dpiguard/enrol/factor"):
            return self.factor_page(portal, req)
        if route == ("POST", "/_dpiguard/enrol/totp"):
            return self.totp_submit(portal, req, body)
        if route == ("POST", "/_dpiguard/enrol/key") and self.keys is not None:
            return self.key_submit(portal, req, body)
        if route == ("GET", "/_dpiguard/enrol/codes"):
            return self.codes_page(portal, req)
        if route == ("POST", "/_dpiguard/login/key") and self.keys is not None:
            return self.key_login_start(portal, req, body)
        if route == ("POST", "/_dpiguard/login/key/finish") and self.keys is not None:
            return self.key_login_finish(portal, req, body)
        return None

    # -- step 1: the link and the password ---------------------------------------------------------
    def _link_refused(self, portal, req: Incoming) -> Reply:
        l10n = portal.l10n(req)
        portal.event(req, "enrol_link", None, "deny", "link_invalid")
        return portal.message(req, 410, "link_invalid", title=l10n.gettext("Link not valid"),
                              text=l10n.gettext("This activation link has expired or was already used. Ask the "
                                                "helpdesk for a new one."))

    def password_page(self, portal, req: Incoming, token: str, problems: list[str] | None = None,
                      status: int = 200) -> Reply:
        login = self.links.peek(token)
        if login is None:
            return self._link_refused(portal, req)
        if problems is None:
            portal.event(req, "enrol_link", login, "allow", "opened")
        user = self.users.get(login)
        return portal.page(req, "enrol_password.html", status, token=token, login=login,
                           display_name=user.display_name if user else "", problems=problems or [],
                           min_length=PASSWORD_MIN_LENGTH, bits=CNIL_MIN_BITS,
                           directory=bool(user is not None and user.external))

    def _problem_text(self, l10n, code: str) -> str:
        return {TOO_LONG: l10n.gettext("The password is too long (1024 characters at most)."),
                CONTAINS_LOGIN: l10n.gettext("The password must not contain your user name."),
                MISMATCH: l10n.gettext("The two passwords differ."),
                }.get(code, l10n.gettext("The password is too weak: make it longer, or mix lowercase letters, "
                                         "uppercase letters, digits and other characters."))

    def password_submit(self, portal, req: Incoming, body: bytes) -> Reply:
        form = _form(body)
        token = form.get("t", "")
        login = self.links.peek(token)
        if login is None:
            return self._link_refused(portal, req)
        password = form.get("password", "")
        user = self.users.get(login)
        if user is not None and user.external:
            return self._directory_confirm(portal, req, token, user, password)
        problems = password_problems(password, login, form.get("password2", ""))
        if problems:
            portal.event(req, "enrol_password", login, "deny", "password_rule", ",".join(problems))
            l10n = portal.l10n(req)
            return self.password_page(portal, req, token, [self._problem_text(l10n, p) for p in problems], 400)
        if self.links.take(token) != login:  # used meanwhile (another tab, another instance)
            return self._link_refused(portal, req)
        self.users.store_password(login, password)
        portal.event(req, "enrol_password", login, "allow", "ok")
        return self._to_factor_step(login)

    def _to_factor_step(self, login: str) -> Reply:
        sid = secrets.token_urlsafe(32)
        key = self.k.enrol_session(sid_hash(sid))
        self.redis.hset(key, mapping={"login": login, "stage": STAGE_FACTOR, "csrf": secrets.token_urlsafe(24)})
        self.redis.expire(key, ENROL_SESSION_SECONDS)
        return Reply(303, b"", "text/plain", [("Location", "/_dpiguard/enrol/factor"),
                                              ("Set-Cookie", self._cookie(sid, ENROL_SESSION_SECONDS))])

    def _directory_confirm(self, portal, req: Incoming, token: str, user, password: str) -> Reply:
        """Step 1 for a directory account (LDAP / AD): its password stays the directory's and is never
        stored; the person proves who they are by typing it (a bind as them), besides holding the link.
        A wrong password counts as a failed login (account lock, address slowdown), as at the login form."""
        l10n = portal.l10n(req)
        result = portal.authenticator.confirm_directory_password(user.login, password, req.client_ip)
        if not result.ok:
            portal.event(req, "enrol_password", user.login, "deny", result.reason, result.detail)
            if result.reason in ("locked", "throttled"):
                text, status = portal.login_error(l10n, result)[0], 429
            elif result.reason == DIRECTORY_UNAVAILABLE:
                text, status = l10n.gettext("The hospital's user directory cannot be reached, so your password "
                                            "cannot be checked now. Try again in a few minutes."), 503
            else:
                text, status = l10n.gettext("This is not the password of your account in the hospital's "
                                            "directory."), 400
            return self.password_page(portal, req, token, [text], status)
        if self.links.take(token) != user.login:  # used meanwhile (another tab, another instance)
            return self._link_refused(portal, req)
        portal.event(req, "enrol_password", user.login, "allow", "directory_password_confirmed")
        return self._to_factor_step(user.login)

    def _cookie(self, value: str, max_age: int) -> str:
        parts = [f"{self.cookie}={value}", "Path=/_dpiguard/enrol", "HttpOnly", "SameSite=Strict",
                 f"Max-Age={max_age}"]
        if self.secure:
            parts[1] = "Path=/"  # a __Host- cookie must have Path=/
            parts.append("Secure")
        return "; ".join(parts)

    def _enrol_session(self, req: Incoming) -> tuple[str, dict[str, str]] | None:
        sid = cookie_value(req.headers.get("cookie", ""), self.cookie)
        if not sid or len(sid) > 64:
            return None
        key = self.k.enrol_session(sid_hash(sid))
        fields = {as_text(k): as_text(v) for k, v in self.redis.hgetall(key).items()}
        return (key, fields) if fields.get("login") else None

    def _session_ended(self, portal, req: Incoming) -> Reply:
        l10n = portal.l10n(req)
        portal.event(req, "enrol_step", None, "deny", "enrol_session_ended")
        return portal.message(req, 401, "enrol_session_ended", title=l10n.gettext("Activation interrupted"),
                              text=l10n.gettext("The activation took too long or was finished already. Log in, "
                                                "or ask the helpdesk for a new activation link."),
                              links=[("/_dpiguard/login", l10n.gettext("Log in"))])

    # -- step 2: the second factor -----------------------------------------------------------------
    def factor_page(self, portal, req: Incoming, error: str = "", status: int = 200) -> Reply:
        found = self._enrol_session(req)
        if found is None or found[1].get("stage") != STAGE_FACTOR:
            return self._session_ended(portal, req)
        key, s = found
        login = s["login"]
        if not s.get("totp"):
            s["totp"] = self.users.box.encrypt(pyotp.random_base32(), aad="enrol:" + login)
            self.redis.hset(key, "totp", s["totp"])
        secret = self.users.box.decrypt(s["totp"], aad="enrol:" + login)
        uri = self.users.provisioning_uri(login, secret)
        qr = "data:image/png;base64," + base64.b64encode(qr_png_bytes(uri)).decode()
        ceremony = None
        if self.keys is not None:
            user = self.users.get(login)
            ceremony = self.keys.begin_registration(login, user.display_name if user else "")
        return portal.page(req, "enrol_factor.html", status, headers=[SCRIPT_CSP], qr=qr, secret=" ".join(
            secret[i:i + 4] for i in range(0, len(secret), 4)), csrf=s["csrf"], error=error, key=ceremony)

    def _checked(self, portal, req: Incoming, form: dict[str, str]):
        found = self._enrol_session(req)
        if found is None or found[1].get("stage") != STAGE_FACTOR:
            return None, self._session_ended(portal, req)
        if not hmac.compare_digest(form.get("csrf", ""), found[1].get("csrf", "")):
            portal.event(req, "enrol_step", found[1]["login"], "deny", "csrf_failed")
            l10n = portal.l10n(req)
            return None, portal.message(req, 403, "csrf_failed", title=l10n.gettext("Activation interrupted"))
        return found, None

    def totp_submit(self, portal, req: Incoming, body: bytes) -> Reply:
        form = _form(body)
        found, refused = self._checked(portal, req, form)
        if refused is not None:
            return refused
        key, s = found
        login = s["login"]
        secret = self.users.box.decrypt(s.get("totp", ""), aad="enrol:" + login) if s.get("totp") else ""
        step = self.users.totp_step_of(secret, form.get("code", "").strip()) if secret else None
        l10n = portal.l10n(req)
        if step is None:
            portal.event(req, "enrol_totp", login, "deny", "bad_totp")
            return self.factor_page(portal, req, l10n.gettext(
                "This code is not the one of the QR code above. Check the phone's time and type the code "
                "shown now."), 400)
        self.users.set_totp_secret(login, secret, last_step=step)  # this code cannot serve to log in
        self.redis.hset(key, mapping={"stage": STAGE_CODES, "totp": ""})
        portal.event(req, "enrol_totp", login, "allow", "ok")
        return Reply(303, b"", "text/plain", [("Location", "/_dpiguard/enrol/codes")])

    def key_submit(self, portal, req: Incoming, body: bytes) -> Reply:
        form = _form(body)
        found, refused = self._checked(portal, req, form)
        if refused is not None:
            return refused
        key, s = found
        login = s["login"]
        credential = form.get("credential", "")
        try:
            if not credential or len(credential) > MAX_CREDENTIAL:
                raise ValueError("no answer from the security key")
            registered = self.keys.finish_registration(form.get("ceremony", ""), login, credential,
                                                       form.get("name", ""))
        except ValueError as exc:
            portal.event(req, "enrol_key", login, "deny", "key_refused", str(exc)[:300])
            l10n = portal.l10n(req)
            return self.factor_page(portal, req, l10n.gettext(
                "The security key could not be registered. Try again, or use the authenticator application."), 400)
        self.redis.hset(key, "stage", STAGE_CODES)
        portal.event(req, "enrol_key", login, "allow", "ok", f"key {registered.id[:32]} {registered.name}"[:200])
        return Reply(303, b"", "text/plain", [("Location", "/_dpiguard/enrol/codes")])

    # -- step 3: recovery codes --------------------------------------------------------------------
    def codes_page(self, portal, req: Incoming) -> Reply:
        found = self._enrol_session(req)
        if found is None or found[1].get("stage") != STAGE_CODES:
            return self._session_ended(portal, req)
        key, s = found
        if not self.redis.delete(key):  # shown once: a reload, or a second instance, gets nothing
            return self._session_ended(portal, req)
        codes = self.recovery.generate(s["login"])
        portal.event(req, "enrol_complete", s["login"], "allow", "ok", f"{len(codes)} recovery codes")
        return portal.page(req, "enrol_codes.html", 200, codes=codes, done=True,
                           headers=[("Set-Cookie", self._cookie("", 0))])

    # -- login with a security key -----------------------------------------------------------------
    def _csrf_ok(self, portal, req: Incoming, form: dict[str, str]) -> bool:
        sent = form.get("csrf", "")
        cookie = cookie_value(req.headers.get("cookie", ""), portal.csrf_cookie)
        return bool(sent and cookie and hmac.compare_digest(sent, cookie))

    def _login_refused(self, portal, req: Incoming, result, form: dict[str, str]) -> Reply:
        l10n = portal.l10n(req)
        error, warning = portal.login_error(l10n, result)
        return portal.login_form(req, "", error, 429 if result.retry_after else 401, form.get("next", "/"),
                                 warning=warning)

    def _trace_failure(self, portal, req: Incoming, login: str, result) -> None:
        event = {"locked": "login_locked", "throttled": "login_throttled"}.get(result.reason, "login_failure")
        portal.event(req, event, login or None, "deny", result.reason, result.detail)

    def key_login_start(self, portal, req: Incoming, body: bytes) -> Reply:
        form = _form(body)
        l10n = portal.l10n(req)
        username = form.get("username", "")[:64]
        if not self._csrf_ok(portal, req, form):
            portal.event(req, "login_failure", username.strip().lower() or None, "deny", "csrf_failed")
            return portal.login_form(req, "", l10n.gettext("Your form expired; please try again."), 400,
                                     form.get("next", "/"))
        auth = portal.authenticator
        result = auth.first_factor(username, form.get("password", "")[:1024], req.client_ip)
        login = result.user.login if result.user else username.strip().lower()
        ceremony = self.keys.begin_authentication(login) if result.ok else None
        if result.ok and ceremony is None:  # the right password, but no key: a failed login all the same
            result = auth.second_factor(login, req.client_ip, False, "no_security_key")
        if not result.ok:
            self._trace_failure(portal, req, login, result)
            return self._login_refused(portal, req, result, form)
        portal.event(req, "login_key_asked", login, "allow", "password_ok")
        return portal.page(req, "login_key.html", 200, headers=[SCRIPT_CSP], username=login, next=safe_next(form.get("next", "/"),
                           portal_pages=True), csrf=form["csrf"], ceremony=ceremony, error="")

    def key_login_finish(self, portal, req: Incoming, body: bytes) -> Reply:
        form = _form(body)
        l10n = portal.l10n(req)
        login = form.get("username", "").strip().lower()[:64]
        if not self._csrf_ok(portal, req, form):
            portal.event(req, "login_failure", login or None, "deny", "csrf_failed")
            return portal.login_form(req, "", l10n.gettext("Your form expired; please try again."), 400,
                                     form.get("next", "/"))
        credential = form.get("credential", "")
        if not credential or len(credential) > MAX_CREDENTIAL:
            outcome_ok, detail, key_detail = False, "bad_key_assertion", "no answer"
            cloned = False
        else:
            outcome = self.keys.finish_authentication(form.get("ceremony", ""), login, credential)
            outcome_ok, detail, key_detail = outcome.ok, outcome.reason, f"{outcome.key_id} {outcome.detail}".strip()
            cloned = outcome.reason == KEY_CLONED
        if cloned:
            portal.event(req, "security_key_clone", login, "deny", KEY_CLONED, key_detail[:300])
        result = portal.authenticator.second_factor(login, req.client_ip, outcome_ok, detail)
        if not result.ok:
            self._trace_failure(portal, req, login, result)
            return self._login_refused(portal, req, result, form)
        portal.event(req, "login_success", login, "allow", "ok", "security_key " + key_detail[:100])
        return portal.complete_login(req, result, form.get("next", "/"))

    # -- the user's own page -----------------------------------------------------------------------
    def account(self, portal, req: Incoming, route: tuple[str, str], body: bytes, token: str | None) -> Reply:
        session = portal.sessions.get(token) if token else None
        l10n = portal.l10n(req)
        if session is None:
            return Reply(303, b"", "text/plain", [("Location", "/_dpiguard/login?next=/_dpiguard/account")])
        login = session.user
        if route == ("GET", "/_dpiguard/account"):
            return self._account_page(portal, req, session)
        if req.method != "POST" or route[1] not in ("/_dpiguard/account/key", "/_dpiguard/account/key/remove",
                                                     "/_dpiguard/account/codes"):
            return portal.message(req, 404, "not_found", title=l10n.gettext("Page not found"), session=session)
        form = _form(body)
        same_site = req.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
        if not same_site or not hmac.compare_digest(form.get("csrf", ""), session.csrf):
            portal.event(req, "account_change", login, "deny", "csrf_failed")
            return portal.message(req, 403, "csrf_failed", title=l10n.gettext("Not changed"), session=session)
        if route[1] in ("/_dpiguard/account/codes", "/_dpiguard/account/key"):
            # A new way in (codes, a key) asks the password again: an unattended session is not enough.
            check = portal.authenticator.first_factor(login, form.get("password", "")[:1024], req.client_ip)
            if not check.ok:
                portal.event(req, "account_change", login, "deny", check.reason, check.detail)
                error, warning = portal.login_error(l10n, check)
                if check.reason == "invalid_credentials":
                    error = l10n.gettext("The password is incorrect.")
                return self._account_page(portal, req, session, status=401, error=" ".join((error, warning)).strip())
        if route[1] == "/_dpiguard/account/codes":
            codes = self.recovery.generate(login)
            portal.event(req, "recovery_codes_regenerated", login, "allow", "ok", f"{len(codes)} codes")
            return portal.page(req, "enrol_codes.html", 200, session, codes=codes, done=False)
        if self.keys is None:
            return portal.message(req, 404, "not_found", title=l10n.gettext("Page not found"), session=session)
        if route[1] == "/_dpiguard/account/key/remove":
            removed = self.keys.remove(login, form.get("id", "")[:1400])
            portal.event(req, "security_key_removed", login, "allow" if removed else "deny",
                         "ok" if removed else "unknown_key", form.get("id", "")[:64])
            return self._account_page(portal, req, session, done=l10n.gettext("The security key was removed.")
                                      if removed else "", error="" if removed else l10n.gettext("Unknown key."))
        credential = form.get("credential", "")
        try:
            if not credential or len(credential) > MAX_CREDENTIAL:
                raise ValueError("no answer from the security key")
            added = self.keys.finish_registration(form.get("ceremony", ""), login, credential, form.get("name", ""))
        except ValueError as exc:
            portal.event(req, "security_key_added", login, "deny", "key_refused", str(exc)[:300])
            return self._account_page(portal, req, session, status=400, error=l10n.gettext(
                "The security key could not be registered. Try again, or use the authenticator application."))
        portal.event(req, "security_key_added", login, "allow", "ok", f"key {added.id[:32]} {added.name}"[:200])
        return self._account_page(portal, req, session, done=l10n.gettext("The security key was registered."))

    def _account_page(self, portal, req: Incoming, session, done: str = "", error: str = "",
                      status: int = 200) -> Reply:
        login = session.user
        keys = self.keys.list(login) if self.keys is not None else []
        ceremony = None
        if self.keys is not None and len(keys) < 10:
            ceremony = self.keys.begin_registration(login, getattr(session, "display_name", "") or "")
        return portal.page(req, "account.html", status, session, headers=[SCRIPT_CSP], keys=keys,
                           remaining=self.recovery.remaining(login), csrf=session.csrf, ceremony=ceremony,
                           done=done, error=error)

    # -- emergency access with the key as second factor --------------------------------------------
    def breakglass_key_start(self, portal, req: Incoming, body: bytes, token: str | None) -> Reply:
        session = portal.sessions.get(token) if token else None
        l10n = portal.l10n(req)
        form = _form(body)
        if session is None or not hmac.compare_digest(form.get("csrf", ""), session.csrf) \
                or req.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            portal.event(req, "break_glass_request", session.user if session else None, "deny",
                         "not_authenticated" if session is None else "csrf_failed", "security_key")
            return portal.message(req, 403 if session else 401, "csrf_failed" if session else "session_expired",
                                  title=l10n.gettext("Emergency access not opened"), session=session)
        ceremony = self.keys.begin_authentication(session.user)
        if ceremony is None:
            portal.event(req, "break_glass_request", session.user, "deny", "no_security_key")
            return portal.message(req, 400, "no_security_key", title=l10n.gettext("Emergency access not opened"),
                                  text=l10n.gettext("No security key is registered for your account: go back "
                                                    "and type your authenticator code."),
                                  links=[(safe_next(form.get("next", "/")), l10n.gettext("Back"))], session=session)
        return portal.page(req, "breakglass_key.html", 200, session, headers=[SCRIPT_CSP], ceremony=ceremony,
                           csrf=session.csrf, patient=form.get("patient", "")[:64], reason=form.get("reason", "")[:64],
                           text=form.get("text", "")[:2000], next=safe_next(form.get("next", "/")))

    def breakglass_key_finish(self, portal, req: Incoming, body: bytes, token: str | None) -> Reply:
        session = portal.sessions.get(token) if token else None
        if session is None:
            return portal.breakglass_request(req, body, token, form=True)  # refused there, and traced
        form = _form(body)
        credential = form.get("credential", "")

        def key_checked():
            if not credential or len(credential) > MAX_CREDENTIAL:
                ok, detail = False, "bad_key_assertion"
            else:
                outcome = self.keys.finish_authentication(form.get("ceremony", ""), session.user, credential)
                ok, detail = outcome.ok, outcome.reason
                if outcome.reason == KEY_CLONED:
                    portal.event(req, "security_key_clone", session.user, "deny", KEY_CLONED, outcome.detail[:300])
            return portal.authenticator.key_step_up(session.user, req.client_ip, ok, detail)

        return portal.breakglass_request(req, body, token, form=True, second_factor=key_checked)
