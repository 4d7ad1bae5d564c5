"""Asking for emergency access ("bris de glace"): validate, check a fresh second factor, grant.

When a request is refused with ``not_in_care_team``, a clinician whose roles allow it may ask for
emergency access to that patient (refusal page form, or ``POST /_dpiguard/api/breakglass``): a reason
from ``policies/breakglass.yaml``, a free-text justification of a minimum length, and a TOTP code
(single use, same anti-replay as the login, except that the code the session was opened with is
accepted once more in that session, so nobody waits for the next code in an emergency; a wrong code
counts as a login failure and three lock the account; a correct code that already served is refused
but never counted). The grant opens the configured categories of that patient to that user for
``duration_seconds`` (default 4 h), on every instance; the user may end it early (:meth:`end`).

Alerting: each grant writes an ``event: break_glass`` trace record with ``alert: true`` and a WARNING
log line; each request made under it carries ``break_glass: true`` in its trace record and the
``X-DPIGuard-Break-Glass: ID`` header upstream.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable

from dpiguard.careteam.breakglass import MAX_TEXT, BreakGlassStore, Grant
from dpiguard.ids import ID_RE
from dpiguard.policy.breakglass import BreakGlassPolicy

log = logging.getLogger("dpiguard")


# ------------------------------------------------------------------------------------ the request

@dataclass
class RequestOutcome:
    ok: bool
    status: int
    error: str = ""
    message: str = ""
    grant: Grant | None = None
    retry_after: int = 0
    attempts_left: int | None = None  # invalid_totp: failed codes still possible before the lock
    field: str = ""  # invalid_request: what to correct (patient, reason, text_short, text_invalid)


class BreakGlassService:
    """Decides and records a request for emergency access (used by the portal, in a worker thread).

    The rules (``p``) come from the caller's policy set (``policies.breakglass``) at each call."""

    def __init__(self, *, store: BreakGlassStore, objections, careteam, authenticator, audit, on_grant=None):
        # Called with (user, patient) after a grant is stored: drops this instance's cached decisions at
        # once (its own bus message may arrive after the client's next request).
        self.on_grant = on_grant
        self.store = store
        self.objections = objections
        self.careteam = careteam
        self.authenticator = authenticator
        self.audit = audit
        self.grants_issued = 0  # emergency accesses opened by this instance (metrics)

    @staticmethod
    def offer(p: BreakGlassPolicy, reason: str, roles: Iterable[str], patient: str | None, category: str | None,
              action: str | None) -> bool:
        """Should a refusal offer emergency access to this user?"""
        if not patient or not p.reachable(category, action) or not p.roles_allowed(roles):
            return False
        return reason in ("not_in_care_team", "privacy_break_glass_required") or (
            reason == "patient_objection" and p.override_patient_objection)

    def request(self, p: BreakGlassPolicy, *, user: str, roles: Iterable[str], patient: Any, reason: Any, text: Any,
                totp: Any, client_ip: str, request_id: str, now: float | None = None,
                login_step: int | None = None, claim_login_code=None, second_factor=None) -> RequestOutcome:
        """Validate, check the TOTP code, check objections, then grant. Every outcome is traced.
        ``login_step``/``claim_login_code``: the session's login code, accepted once more (step-up).
        ``second_factor``: instead of the code, a callable returning the LoginResult of another second
        factor (a security key's assertion, edge/enrol.py), called at the point the code would be checked."""
        now = time.time() if now is None else now
        roles = tuple(roles)
        patient = patient.strip() if isinstance(patient, str) else ""
        reason = reason.strip() if isinstance(reason, str) else ""
        text = text.strip() if isinstance(text, str) else ""
        base = {"request_id": request_id, "user": user, "roles": list(roles), "patient": patient[:64] or None,
                "client": client_ip, "break_glass_reason": reason[:64] or None}

        def refuse(status: int, error: str, message: str, detail: str | None = None, retry_after: int = 0,
                   attempts_left: int | None = None, field: str = ""):
            self.audit.write({"event": "break_glass_request", "outcome": "deny", "reason": error, **base,
                              "detail": detail or field or None})
            return RequestOutcome(False, status, error, message, retry_after=retry_after,
                                  attempts_left=attempts_left, field=field)

        if not p.enabled:
            return refuse(404, "break_glass_disabled", "Emergency access is not enabled here.")
        if not p.roles_allowed(roles):
            return refuse(403, "break_glass_forbidden", "Your role may not use emergency access.")
        if not ID_RE.fullmatch(patient):
            return refuse(400, "invalid_request", "Unknown or missing patient id.", field="patient")
        if reason not in p.reasons:
            return refuse(400, "invalid_request", "Choose a reason from the list: " + ", ".join(p.reasons),
                          field="reason")
        if len(text) < p.justification_min_length:
            return refuse(400, "invalid_request",
                          f"The justification needs at least {p.justification_min_length} characters.",
                          field="text_short")
        if len(text) > MAX_TEXT or any(not c.isprintable() for c in text):
            return refuse(400, "invalid_request",
                          f"The justification must be plain text of at most {MAX_TEXT} characters.",
                          field="text_invalid")
        # Objection before the code: a request that cannot succeed does not burn the user's code.
        units = self.careteam.user_units(user, now)
        objection = self.objections.find(patient, user, units)
        if objection is not None and not p.override_patient_objection:
            return refuse(403, "patient_objection",
                          "The patient has objected to your access; emergency access cannot override it.",
                          f"objection:{objection.field}")
        code = totp.strip() if isinstance(totp, str) else ""
        result = second_factor() if second_factor is not None else self.authenticator.reauthenticate(
            user, code, client_ip, now=now, login_step=login_step, claim_login_code=claim_login_code)
        if not result.ok:
            if result.retry_after:
                return refuse(429, result.reason, "Too many failed attempts; try again later.",
                              result.detail, result.retry_after)
            if result.reason == "totp_reused":
                wait = 30 - int(now) % 30
                return refuse(401, "totp_reused", "This code was already used; the next one comes in "
                              f"{wait} s. This is not counted as a failed attempt.", result.detail, wait)
            return refuse(401, "invalid_totp", "The authenticator code is incorrect.", result.detail,
                          attempts_left=result.attempts_left)
        grant = Grant(self.store.new_id(), user, patient, reason, text, tuple(sorted(p.categories)),
                      tuple(sorted(p.actions)), now, now + p.duration_seconds)
        # Trace first: an emergency access may never exist without its alert line.
        self.audit.write({"event": "break_glass", "outcome": "allow", "reason": reason, "alert": True, **base,
                          "break_glass_id": grant.id, "break_glass_text": text, "step_up": result.detail,
                          "break_glass_label": p.reasons[reason], "categories": list(grant.categories),
                          "expires": grant.end,
                          "objection_overridden": objection.field if objection is not None else None})
        self.store.create(grant)
        self.grants_issued += 1
        if self.on_grant is not None:
            self.on_grant(user, patient)
        log.warning("dpiguard: EMERGENCY ACCESS (bris de glace) %s: user %s opened patient %s for %d s, "
                    "reason %s: %s", grant.id, user, patient, int(p.duration_seconds), reason, text[:200])
        return RequestOutcome(True, 201, grant=grant)

    def end(self, grant_id: Any, *, user: str, client_ip: str, request_id: str,
            now: float | None = None) -> Grant | None:
        """The user ends their own emergency access early, on every instance. Traced. None (and a
        refusal record) when the id is not one of the user's grants."""
        base = {"request_id": request_id, "user": user, "client": client_ip}
        try:
            record = self.store.get(grant_id if isinstance(grant_id, str) else "")
        except KeyError:
            record = None
        grant = record["grant"] if record else None
        if grant is None or grant.user != user:
            self.audit.write({"event": "break_glass_end", "outcome": "deny", "reason": "unknown_grant", **base,
                              "break_glass_id": str(grant_id)[:32] if grant_id else None})
            return None
        self.audit.write({"event": "break_glass_end", "outcome": "allow", "reason": "ended_by_user", **base,
                          "break_glass_id": grant.id, "patient": grant.patient})
        self.store.revoke(grant.id, by=user, now=now)
        if self.on_grant is not None:
            self.on_grant(user, grant.patient)
        return grant
