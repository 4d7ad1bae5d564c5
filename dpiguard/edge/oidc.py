"""The OpenID Connect pages under ``/_dpiguard/oidc/`` (served by the portal, in its worker threads).

- ``GET  /_dpiguard/oidc/login?next=/…``   start a login at the IdP (state, nonce, PKCE S256; a
  browser-binding cookie, SameSite=Lax so that it comes back with the IdP's redirect)
- ``GET  /_dpiguard/oidc/callback``         the IdP's answer: state (once), code exchanged, id_token
  verified, roles from ``policies/oidc.yaml``; the session opens, or a dpiguard TOTP code is asked
  when the IdP did not vouch for a second factor
- ``POST /_dpiguard/oidc/totp``             that TOTP code (lockout and address slowdown apply)
- ``POST /_dpiguard/oidc/backchannel-logout``  the IdP's logout token: ends the matching sessions on
  every instance

The protocol and the checks are in :mod:`dpiguard.auth.oidc`. Every refusal is traced
(``login_failure`` with the reason, ``oidc_logout``), with ``idp`` and, when known, ``rpps``.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from typing import Any
from urllib.parse import parse_qs

import orjson

from dpiguard.auth.login import INVALID_CREDENTIALS, LOCKED, THROTTLED
from dpiguard.auth.oidc import Identity, OidcError, RelyingParty
from dpiguard.auth.sessions import cookie_value, presented_token
from dpiguard.auth.users import UserDirectory
from dpiguard.decision.verdict import Incoming
from dpiguard.edge.pages import safe_next
from dpiguard.edge.portal import Reply

log = logging.getLogger("dpiguard")
BINDING_COOKIE = "dpiguard_oidc"
PATH = "/_dpiguard/oidc/"


class OidcPages:
    def __init__(self, rp: RelyingParty, users: UserDirectory, *, label: str | None = None):
        self.rp = rp
        self.users = users
        self.source = rp.s.source
        self.label = label

    # -- what the portal asks --------------------------------------------------------------------------
    def button(self, l10n) -> str:
        if self.label:
            return self.label
        return (l10n.gettext("Log in with Pro Santé Connect") if self.source == "psc"
                else l10n.gettext("Log in with the hospital's account"))

    def idp_name(self, l10n) -> str:
        return "Pro Santé Connect" if self.source == "psc" else l10n.gettext("The hospital's identity provider")

    def logout_target(self, session) -> str | None:
        """Where the browser goes to end the IdP session too (RP-initiated logout), or None."""
        if session.source not in ("oidc", "psc"):
            return None
        link = self.rp.session_link(session.sid_hash)
        self.rp.unlink_session(session.sid_hash)
        if not link:
            return None
        return self.rp.end_session_url(link.get("id_token", ""))

    # -- dispatch ------------------------------------------------------------------------------------
    def serve(self, portal, req: Incoming, path: str, query: str, body: bytes, token: str | None):
        route = (req.method, path)
        if route == ("GET", PATH + "login"):
            return self.start(portal, req, query)
        if route == ("GET", PATH + "callback"):
            return self.callback(portal, req, query)
        if route == ("POST", PATH + "totp"):
            return self.totp(portal, req, body)
        if route == ("POST", PATH + "backchannel-logout"):
            return self.backchannel_logout(portal, req, body)
        return None

    # -- helpers ---------------------------------------------------------------------------------------
    def _cookie(self, portal, name: str, value: str, path: str, max_age: int, same_site: str = "Lax") -> str:
        parts = [f"{name}={value}", f"Path={path}", "HttpOnly", f"SameSite={same_site}", f"Max-Age={max_age}"]
        if portal.secure:
            parts.append("Secure")
        return "; ".join(parts)

    def _trace(self, portal, req, event: str, user, outcome: str, reason: str, detail: str | None = None,
               rpps: str = "") -> None:
        portal.event(req, event, user, outcome, reason, (detail or "")[:300] or None, idp=self.source,
                     rpps=rpps or None)

    def _refuse(self, portal, req, status: int, code: str, text: str, user=None, detail: str = "", rpps: str = ""):
        self._trace(portal, req, "login_failure", user, "deny", code, detail, rpps)
        l10n = portal.l10n(req)
        return portal.message(req, status, code, title=l10n.gettext("Login refused"), text=text,
                              links=[("/_dpiguard/login", l10n.gettext("Log in"))])

    def _error_text(self, l10n, exc: OidcError) -> tuple[int, str]:
        idp = self.idp_name(l10n)
        if exc.code in ("idp_unreachable", "idp_error"):
            return 503, l10n.gettext("%(idp)s does not answer correctly right now. Try again in a moment, or "
                                     "log in with your dpiguard account; if it lasts, call the helpdesk.", idp=idp)
        if exc.code == "acr_too_low":
            return 403, l10n.gettext("Your login at %(idp)s was not strong enough for the patient record: "
                                     "log in again with your CPS card or the e-CPS application.", idp=idp)
        if exc.code == "wrong_state":
            return 400, l10n.gettext("This login link has expired or was already used. Start again from the "
                                     "login page.")
        if exc.code in ("no_login", "no_rpps"):
            return 403, l10n.gettext("%(idp)s did not say who you are (no identifier or RPPS number). Call the "
                                     "helpdesk.", idp=idp)
        return 401, l10n.gettext("The answer of %(idp)s could not be verified, so you are not logged in. Start "
                                 "again from the login page; if it happens again, call the helpdesk.", idp=idp)

    # -- the flow ------------------------------------------------------------------------------------
    def start(self, portal, req: Incoming, query: str):
        params = parse_qs(query, max_num_fields=5)
        next_target = safe_next(params.get("next", ["/"])[0], portal_pages=True)
        try:
            url, binding = self.rp.begin(next_target)
        except OidcError as exc:
            status, text = self._error_text(portal.l10n(req), exc)
            return self._refuse(portal, req, status, exc.code, text, detail=str(exc))
        cookie = self._cookie(portal, BINDING_COOKIE, binding, PATH, self.rp.s.flow_seconds)
        return Reply(303, b"", "text/plain", [("Location", url), ("Set-Cookie", cookie)])

    def callback(self, portal, req: Incoming, query: str):
        params = {k: v[0] for k, v in parse_qs(query, max_num_fields=10).items()}
        l10n = portal.l10n(req)
        binding = cookie_value(req.headers.get("cookie", ""), BINDING_COOKIE)
        try:
            flow = self.rp.take_flow(params.get("state", ""), binding)
            if "iss" in params and params["iss"] != self.rp.s.issuer:  # RFC 9207: an answer of another IdP
                raise OidcError("invalid_token", f"authorization response from issuer {params['iss'][:200]!r}")
            if "error" in params:
                raise OidcError("idp_refused", f"{params['error'][:64]}: {params.get('error_description', '')[:200]}")
            identity = self.rp.finish(flow, params.get("code", ""))
        except OidcError as exc:
            if exc.code == "idp_refused":
                return self._refuse(portal, req, 401, "idp_refused", l10n.gettext(
                    "%(idp)s did not log you in. Start again from the login page.", idp=self.idp_name(l10n)),
                    detail=str(exc))
            status, text = self._error_text(l10n, exc)
            return self._refuse(portal, req, status, exc.code, text, detail=str(exc))
        roles = portal.policies().oidc.roles_for(identity.claims, identity.exercises)
        if not roles:
            return self._refuse(portal, req, 403, "no_role", l10n.gettext(
                "You are identified, but no role of the patient record is given to your profile. Ask the security "
                "officer (RSSI) to add it to the role mapping."), identity.login,
                f"sub={identity.sub[:64]} exercises={orjson.dumps(list(identity.exercises)).decode()[:200]}",
                identity.rpps)
        admin = portal.admin_roles
        if admin and not admin.isdisjoint(roles) and not all(r in admin for r in roles):
            return self._refuse(portal, req, 403, "mixed_account", l10n.gettext(
                "This account mixes care roles and administrative roles (DPO, security officer, helpdesk). Such "
                "accounts are refused: ask the security officer to split it."), identity.login, ",".join(roles),
                identity.rpps)
        locked = portal.authenticator.locked_for(identity.login)  # dpiguard's lock holds whatever the source
        if locked:
            return self._refuse(portal, req, 429, LOCKED, l10n.gettext(
                "Too many failed attempts: the account is locked until %(time)s (%(wait)s).",
                time=l10n.clock(time.time() + locked), wait=l10n.duration(locked)), identity.login, "",
                identity.rpps)
        if identity.second_factor:
            return self._open(portal, req, identity, roles, flow.next, None,
                              f"acr={identity.acr} amr={','.join(identity.amr)}")
        # The IdP did not vouch for a second factor: dpiguard's TOTP of the account with the same login.
        if not self.users.has_totp(identity.login):
            return self._refuse(portal, req, 403, "no_second_factor", l10n.gettext(
                "%(idp)s identified you without a second factor, and you have no dpiguard authenticator code to "
                "add one. Log in there again with a second factor, or ask the helpdesk to enrol an authenticator "
                "application.", idp=self.idp_name(l10n)), identity.login,
                f"acr={identity.acr} amr={','.join(identity.amr)}", identity.rpps)
        pending = self.rp.keep_pending({
            "login": identity.login, "name": identity.display_name, "roles": list(roles), "rpps": identity.rpps,
            "sub": identity.sub, "sid": identity.sid, "id_token": identity.id_token, "next": flow.next,
            "acr": identity.acr, "amr": list(identity.amr)})
        self._trace(portal, req, "login_second_factor", identity.login, "allow", "totp_required",
                    f"acr={identity.acr} amr={','.join(identity.amr)}", identity.rpps)
        return self._totp_form(portal, req, pending)

    def _totp_form(self, portal, req, pending: str, error: str = "", warning: str = "", status: int = 200):
        csrf = secrets.token_urlsafe(24)
        reply = portal.page(req, "oidc_totp.html", status, None, pending=pending, csrf=csrf, error=error,
                            warning=warning, idp=self.idp_name(portal.l10n(req)))
        reply.headers.append(("Set-Cookie", self._cookie(portal, portal.csrf_cookie, csrf, "/", self.rp.s.flow_seconds,
                                                         "Strict")))
        return reply

    def totp(self, portal, req: Incoming, body: bytes):
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=5).items()}
        l10n = portal.l10n(req)
        pending_id = form.get("pending", "")
        data = self.rp.pending(pending_id)
        if data is None:
            return self._refuse(portal, req, 400, "wrong_state", l10n.gettext(
                "This login link has expired or was already used. Start again from the login page."))
        sent, cookie = form.get("csrf", ""), cookie_value(req.headers.get("cookie", ""), portal.csrf_cookie)
        if not sent or not cookie or not hmac.compare_digest(sent, cookie):
            self._trace(portal, req, "login_failure", data["login"], "deny", "csrf_failed", rpps=data["rpps"])
            return self._totp_form(portal, req, pending_id, l10n.gettext("Your form expired; please try again."),
                                   status=400)
        result = portal.authenticator.reauthenticate(data["login"], form.get("totp", "")[:16], req.client_ip)
        if not result.ok:
            event = {LOCKED: "login_locked", THROTTLED: "login_throttled"}.get(result.reason, "login_failure")
            self._trace(portal, req, event, data["login"], "deny", result.reason, result.detail, data["rpps"])
            if result.reason == LOCKED:
                self.rp.drop_pending(pending_id)
                wait = result.retry_after
                return portal.message(req, 429, LOCKED, title=l10n.gettext("Login refused"), text=l10n.gettext(
                    "Too many failed attempts: the account is locked until %(time)s (%(wait)s).",
                    time=l10n.clock(time.time() + wait), wait=l10n.duration(wait)))
            if result.reason == THROTTLED:
                error = l10n.ngettext("Too many attempts from this network address: wait %(num)d second.",
                                      "Too many attempts from this network address: wait %(num)d seconds.",
                                      max(1, result.retry_after))
                return self._totp_form(portal, req, pending_id, error, status=429)
            warning = ""
            if result.reason == INVALID_CREDENTIALS and result.attempts_left:
                warning = l10n.ngettext("%(num)d attempt left before the account is locked.",
                                        "%(num)d attempts left before the account is locked.", result.attempts_left)
            return self._totp_form(portal, req, pending_id, l10n.gettext("The authenticator code is incorrect."),
                                   warning, status=401)
        if not self.rp.drop_pending(pending_id):  # another request used it meanwhile
            return self._refuse(portal, req, 400, "wrong_state", l10n.gettext(
                "This login link has expired or was already used. Start again from the login page."), data["login"])
        identity = Identity(login=data["login"], display_name=data["name"], sub=data["sub"], sid=data["sid"],
                            claims={}, exercises=(), rpps=data["rpps"], acr=data["acr"], amr=tuple(data["amr"]),
                            id_token=data["id_token"], second_factor=False)
        return self._open(portal, req, identity, tuple(data["roles"]), data["next"], result.totp_step,
                          f"acr={identity.acr} amr={','.join(identity.amr)} + dpiguard totp")

    def _open(self, portal, req, identity: Identity, roles, next_target: str, step: int | None, detail: str):

        old, _ = presented_token(req.headers, portal.cookie_name)
        if old:
            portal.sessions.destroy(old)  # the id is rotated at login
        token, session = portal.sessions.create(identity.login, roles, login_step=step,
                                                display_name=identity.display_name, source=self.source,
                                                rpps=identity.rpps)
        self.rp.link_session(session.sid_hash, identity.sub, identity.sid, identity.id_token,
                             portal.sessions.absolute_lifetime)
        self._trace(portal, req, "login_success", identity.login, "allow", "ok", detail, identity.rpps)
        l10n = portal.l10n(req)
        target = safe_next(next_target, portal_pages=True)
        admin = portal.admin_roles
        if admin and not admin.isdisjoint(roles) and target == "/":
            target = "/_dpiguard/console"
        reply = portal.page(req, "oidc_continue.html", 200, session, title=l10n.gettext("You are logged in"),
                            text=l10n.gettext("Opening the page you asked for…"), target=target,
                            label=l10n.gettext("Continue"))
        reply.headers += [("Set-Cookie", portal.session_cookie(token)),
                          ("Set-Cookie", self._cookie(portal, BINDING_COOKIE, "", PATH, 0))]
        return reply

    # -- back-channel logout -------------------------------------------------------------------------
    def backchannel_logout(self, portal, req: Incoming, body: bytes):
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=5).items()}
        token = form.get("logout_token", "")
        headers = [("Cache-Control", "no-store")]
        if ctype != "application/x-www-form-urlencoded" or not token:
            self._trace(portal, req, "oidc_logout", None, "deny", "invalid_request", "no logout_token")
            return Reply(400, orjson.dumps({"error": "invalid_request"}), "application/json", headers)
        try:
            sub, sid = self.rp.verify_logout_token(token)
        except OidcError as exc:
            self._trace(portal, req, "oidc_logout", None, "deny", exc.code, str(exc))
            return Reply(400, orjson.dumps({"error": "invalid_request", "error_description": exc.code}),
                         "application/json", headers)
        ended: list[Any] = []
        for h in sorted(self.rp.sessions_of(sub, sid)):
            user = portal.sessions.owner_hint(h)
            if portal.sessions.destroy_hash(h):
                ended.append(user)
            self.rp.unlink_session(h)
        self._trace(portal, req, "oidc_logout", ",".join(sorted({u for u in ended if u}))[:200] or None, "allow",
                    "ok", f"sessions ended: {len(ended)} (sid={'yes' if sid else 'no'}, sub={'yes' if sub else 'no'})")
        return Reply(200, b"", "text/plain", headers)
