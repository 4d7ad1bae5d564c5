"""The web console for DPOs, RSSIs and the helpdesk: ``/_dpiguard/console`` (docs/console.md).

Who: accounts whose roles are **all** administrative roles of ``console.roles`` (``dpo``, ``rssi``,
``helpdesk`` by default), logged in like everyone (password + TOTP, same lockout). Care accounts cannot
enter; administrative accounts open no patient record (they have no permission in ``policy.csv``, and
an account mixing both kinds is refused at login). What each role may do is a list of capabilities:

- ``traces``: search the trace (user, patient, unit, reason, outcome, period), export it as CSV;
- ``timeline``: a patient's "who opened my record" (``audit.query.who_accessed``), with refusals and
  emergency accesses labelled as what they were; ``names``: staff names in it (the DPO's, CJEU C-579/21);
- ``breakglass``: the emergency-access review queue (justification, requests made under it), mark
  justified or abusive with a comment, revoke;
- ``alerts``: mass-access alerts and throttled users; the privacy alerts of :mod:`dpiguard.privacy`
  (review queue: mark justified or abusive with a comment, per-detector figures); ``stats``: refusals without the login redirects;
- ``explain``: "why was this refused?": the trace record of a request decided again by the policy
  simulator (``policy/sim.py``) with the policy in service and the care team in Redis;
- ``helpdesk``: unlock an account, reset its TOTP factor (new QR code), end its sessions, lift a
  mass-access throttle; never on administrative accounts (the operators' CLI does those).

Every console request is a trace record (``event: console``, the page or action, what was asked);
forms are POSTs with the session's CSRF token and a same-origin check; answers are ``no-store`` like every
dpiguard page. The selection and counting are :mod:`dpiguard.audit.query`'s, the review store
:mod:`dpiguard.careteam.breakglass`'s, the accounts :mod:`dpiguard.auth`'s: this module is only the pages.
"""

from __future__ import annotations

import base64
import hmac
import time
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, quote, urlencode
from zoneinfo import ZoneInfo

from dpiguard.audit.query import (
    LOGIN_REDIRECT_REASONS,
    QUERY_COLUMNS,
    WHO_COLUMNS,
    WHO_COLUMNS_NAMED,
    Filter,
    find_request,
    iter_store,
    refusal_stats,
    render,
    select,
    who_accessed,
)
from dpiguard.audit.report import who_accessed_html
from dpiguard.auth.qr import qr_png_bytes
from dpiguard.decision.verdict import Incoming
from dpiguard.edge.pages import ACTION_TEXT, N_, REASON_TEXT, reason_text, safe_next
from dpiguard.edge.portal import Reply
from dpiguard.ids import ID_RE
from dpiguard.policy.sim import decide_request, explain_lines, live_careteam
from dpiguard.privacy.rules import LABELS, REVIEW_STATUSES, STATUS_LABELS
from dpiguard.times import iso_ms, parse_iso_ms, parse_time

PREFIX = "/_dpiguard/console"
CSV_COLUMNS = QUERY_COLUMNS[:7] + ("units",) + QUERY_COLUMNS[7:]

#: page → (capability needed, title msgid)
PAGES = {
    "": ("", N_("Console")),
    "traces": ("traces", N_("Trace search")),
    "patient": ("timeline", N_("Who opened a record")),
    "breakglass": ("breakglass", N_("Emergency accesses to review")),
    "alerts": ("alerts", N_("Mass-access alerts")),
    "privacy": ("alerts", N_("Privacy alerts")),
    "stats": ("stats", N_("Refusal statistics")),
    "explain": ("explain", N_("Why was this refused?")),
    "helpdesk": ("helpdesk", N_("Helpdesk")),
}
NAV = ("traces", "patient", "breakglass", "alerts", "privacy", "stats", "explain", "helpdesk")


class ConsoleError(ValueError):
    """A filter or form value the console cannot use (shown to the person, traced)."""


class Console:
    def __init__(self, *, roles: Mapping[str, tuple[str, ...]], audit_source: Path, users, authenticator, sessions,
                 grants, careteam, unthrottle: Callable[[str], bool], throttled: Callable[[], dict[str, float]],
                 max_rows: int = 500, privacy_alerts=None,
                 on_revoke: Callable[[str, str], Any] | None = None):
        self.roles = {r: frozenset(c) for r, c in roles.items()}
        self.audit_source = Path(audit_source)
        self.users = users
        self.authenticator = authenticator
        self.sessions = sessions
        self.grants = grants  # careteam.breakglass.BreakGlassStore
        self.careteam = careteam
        self.unthrottle = unthrottle
        self.throttled = throttled
        self.max_rows = max_rows
        self.privacy_alerts = privacy_alerts  # privacy.alerts.AlertQueue (Redis), or None
        # (user, patient) of a revoked grant: this instance's cached decisions go at once; the others
        # hear it from the invalidation bus
        self.on_revoke = on_revoke

    def capabilities(self, roles) -> frozenset[str] | None:
        """The capabilities of an account whose roles are all administrative; None for any other."""
        roles = tuple(roles)
        if not roles or any(r not in self.roles for r in roles):
            return None
        return frozenset().union(*(self.roles[r] for r in roles))

    # -- dispatch ----------------------------------------------------------------------------------
    def handle(self, portal, req: Incoming, path: str, query: str, body: bytes, token: str | None):
        session = portal.sessions.get(token) if token else None
        l10n = portal.l10n(req)
        page = path[len(PREFIX):].strip("/")
        if session is None:
            target = safe_next(req.target, portal_pages=True) if req.method == "GET" else PREFIX
            return Reply(303, b"", "text/plain", [("Location", "/_dpiguard/login?next=" + quote(target, safe=""))])
        caps = self.capabilities(session.roles)
        needed, title = PAGES.get(page, (None, ""))
        if caps is None or needed is None or (needed and needed not in caps):
            code = "console_forbidden" if needed is not None else "not_found"
            portal.event(req, "console", session.user, "deny", code, page[:64] or "home")
            return portal.message(req, 403 if needed is not None else 404, code, session=session,
                                  title=l10n.gettext(PAGES[""][1]) if needed is not None
                                  else l10n.gettext("Page not found"))
        params = {k: v[0].strip() for k, v in parse_qs(query, max_num_fields=20).items()}
        form: dict[str, str] = {}
        if req.method == "POST":
            form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=20).items()}
            same_site = req.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")
            if not same_site or not hmac.compare_digest(form.get("csrf", ""), session.csrf):
                portal.event(req, "console", session.user, "deny", "csrf_failed", page or "home")
                return portal.message(req, 403, "csrf_failed", title=l10n.gettext(title), session=session)
        elif req.method != "GET":
            return portal.message(req, 405, "method_not_allowed", title=l10n.gettext(title), session=session)
        ctx = Ctx(portal, req, session, l10n, caps, page, title, params, form)
        try:
            return getattr(self, f"page_{page or 'home'}")(ctx)
        except ConsoleError as exc:
            ctx.trace("deny", "invalid_request", str(exc)[:200])
            return ctx.render("console_message.html", 400, text=str(exc))

    # -- pages -------------------------------------------------------------------------------------
    def page_home(self, c: "Ctx"):
        pending = len(self.grants.review_queue(pending_only=True)) if "breakglass" in c.caps else None
        throttled = len(self.throttled()) if {"alerts", "helpdesk"} & c.caps else None
        privacy_new = (len(self.privacy_alerts.list(status="new", limit=10000))
                       if "alerts" in c.caps and self.privacy_alerts is not None else None)
        c.trace("allow", "ok")
        return c.render("console_home.html", pending=pending, throttled=throttled, privacy_new=privacy_new)

    def _filter(self, c: "Ctx", default_days: float | None = None) -> Filter:
        p = c.params
        since = self._time(c, p.get("from"), "from")
        until = self._time(c, p.get("to"), "to")
        if since is None and default_days is not None:
            since = iso_ms(time.time() - default_days * 86400)
        for key in ("user", "patient", "unit", "reason"):
            value = p.get(key, "")
            if value and (len(value) > 64 or not ID_RE.fullmatch(value.replace(".", "-").replace("_", "-"))):
                raise ConsoleError(c.l10n.gettext("Not a valid value for %(field)s: %(value)s",
                                                  field=key, value=value[:64]))
        outcome = p.get("outcome") or None
        if outcome not in (None, "allow", "deny"):
            raise ConsoleError(c.l10n.gettext("Not a valid value for %(field)s: %(value)s", field="outcome",
                                              value=outcome[:16]))
        return Filter(patient=p.get("patient") or None, user=(p.get("user") or "").lower() or None,
                      unit=(p.get("unit") or "").upper() or None, reason=p.get("reason") or None,
                      outcome=outcome, since=since, until=until,
                      event=p.get("event") or None)

    @staticmethod
    def _time(c: "Ctx", value: str | None, field: str) -> str | None:
        if not value:
            return None
        try:
            return iso_ms(parse_time(value, tz=ZoneInfo(c.l10n.tz_name)))
        except (ValueError, OverflowError):
            raise ConsoleError(c.l10n.gettext("Not a date and time: %(value)s (for example 2026-03-01T08:00)",
                                              value=value[:40])) from None

    def page_traces(self, c: "Ctx"):
        flt = self._filter(c)
        if c.params.get("event") and not ID_RE.fullmatch(c.params["event"].replace("_", "-")):
            raise ConsoleError(c.l10n.gettext("Not a valid value for %(field)s: %(value)s", field="event",
                                              value=c.params["event"][:32]))
        searched = any(c.params.get(k) for k in ("user", "patient", "unit", "reason", "outcome", "from", "to", "event"))
        rows = select(iter_store(self.audit_source), flt) if searched else []
        rows = [r for r in rows if r.get("event") != "checkpoint"]
        detail = urlencode({k: v for k, v in c.params.items() if k != "format"})[:300]
        if c.params.get("format") == "csv":
            c.trace("allow", "ok", detail, action="traces_csv", rows=len(rows))
            return Reply(200, ("\ufeff" + render(rows, CSV_COLUMNS, "csv")).encode(), "text/csv; charset=utf-8",
                         [("Content-Disposition", 'attachment; filename="dpiguard-traces.csv"')])
        c.trace("allow", "ok", detail, rows=len(rows))
        shown = rows[::-1][: self.max_rows]  # newest first
        csv_link = PREFIX + "/traces?" + urlencode({**{k: v for k, v in c.params.items() if v}, "format": "csv"})
        return c.render("console_traces.html", rows=shown, total=len(rows), searched=searched, csv_link=csv_link,
                        reasons=sorted(REASON_TEXT))

    def page_patient(self, c: "Ctx"):
        patient = c.params.get("patient", "")
        rows: list[dict[str, Any]] = []
        with_names = "names" in c.caps
        if patient:
            if not ID_RE.fullmatch(patient):
                raise ConsoleError(c.l10n.gettext("Not a valid value for %(field)s: %(value)s", field="patient",
                                                  value=patient[:64]))
            flt = self._filter(c)
            names = {u.login: u.display_name for u in self.users.list()} if with_names else None
            rows = who_accessed(iter_store(self.audit_source), patient, flt.since, flt.until, names,
                                with_names=with_names)
        if patient and c.params.get("format") == "html":  # for the patient: e-mailable, never with names
            rows = [{k: v for k, v in r.items() if k not in ("user", "name", "request_id")} for r in rows]
            c.trace("allow", "ok", f"patient={patient}", action="console_patient_letter", patient=patient)
            policies = c.portal.policies()
            labels = {**dict(policies.roles), **{n: cat.description for n, cat in policies.categories.items()}}
            page = who_accessed_html(patient, rows, WHO_COLUMNS, c.l10n, labels)
            return Reply(200, page.encode(), "text/html; charset=utf-8",
                         [("Content-Disposition", f'attachment; filename="acces-{patient}.html"')])
        c.trace("allow", "ok", f"patient={patient}" if patient else None, patient=patient or None,
                names_shown=with_names if patient else None)
        reasons = c.portal.policies().breakglass.reasons
        return c.render("console_patient.html", patient=patient, rows=rows[::-1],
                        columns=WHO_COLUMNS_NAMED if with_names else WHO_COLUMNS, with_names=with_names,
                        bg_reasons={k: c.l10n.gettext(v) for k, v in reasons.items()})

    def page_breakglass(self, c: "Ctx"):
        done = ""
        if c.form:
            grant_id = c.form.get("id", "")
            try:
                record = self.grants.get(grant_id)
            except KeyError:
                raise ConsoleError(c.l10n.gettext("No emergency access %(id)s.", id=grant_id[:32])) from None
            grant = record["grant"]
            action = c.form.get("action")
            if action == "revoke":
                self.grants.revoke(grant_id, by=c.session.user)
                if self.on_revoke is not None:
                    self.on_revoke(grant.user, grant.patient)
                c.trace("allow", "ok", grant_id, action="break_glass_revoke", break_glass_id=grant_id,
                        target_user=grant.user, patient=grant.patient)
                done = c.l10n.gettext("Emergency access %(id)s revoked on every instance.", id=grant_id)
            elif action in ("justified", "abusive"):
                comment = c.form.get("comment", "").strip()
                if not comment:
                    raise ConsoleError(c.l10n.gettext("A review needs a comment."))
                try:
                    self.grants.mark(grant_id, action, comment, by=c.session.user)
                except ValueError as exc:
                    raise ConsoleError(str(exc)) from None
                c.trace("allow", "ok", grant_id, action="break_glass_review", break_glass_id=grant_id,
                        review=action, comment=comment[:2000], target_user=grant.user, patient=grant.patient)
                done = c.l10n.gettext("Emergency access %(id)s marked %(status)s.", id=grant_id,
                                      status=c.l10n.gettext(STATUS_TEXT[action]))
            else:
                raise ConsoleError(c.l10n.gettext("Unknown action."))
        pending_only = c.params.get("all") != "1"
        records = self.grants.review_queue(pending_only=pending_only)
        counts: dict[str, int] = {}
        if records:
            ids = {r["grant"].id for r in records}
            for rec in iter_store(self.audit_source):
                gid = rec.get("break_glass_id")
                if gid in ids and rec.get("event") in ("access", "fhir_response"):
                    counts[gid] = counts.get(gid, 0) + 1
        if not c.form:
            c.trace("allow", "ok", "all" if not pending_only else "pending")
        now = time.time()
        items = [{"rec": r, "grant": r["grant"], "requests": counts.get(r["grant"].id, 0),
                  "active": r["grant"].start <= now < r["grant"].end and not r.get("revoked_at")}
                 for r in reversed(records)]
        labels = c.portal.policies().breakglass.reasons
        return c.render("console_breakglass.html", items=items, done=done, pending_only=pending_only,
                        reason_labels={k: c.l10n.gettext(v) for k, v in labels.items()},
                        status_text={k: c.l10n.gettext(v) for k, v in STATUS_TEXT.items()})

    def page_alerts(self, c: "Ctx"):
        flt = self._filter(c, default_days=7)
        flt.event = "mass_access"
        alerts = select(iter_store(self.audit_source), flt)[::-1][: self.max_rows]
        throttled = sorted(self.throttled().items())
        c.trace("allow", "ok")
        return c.render("console_alerts.html", alerts=alerts, throttled=throttled,
                        helpdesk="helpdesk" in c.caps)

    def page_privacy(self, c: "Ctx"):
        """The privacy alerts of the detectors (docs/privacy.md): filter, review with a comment, figures."""
        if self.privacy_alerts is None:
            raise ConsoleError(c.l10n.gettext("Privacy alerts are not available on this instance."))
        done = ""
        if c.form:
            alert_id = c.form.get("id", "")
            status = c.form.get("action", "")
            if not (0 < len(alert_id) <= 64 and alert_id.isalnum()):
                raise ConsoleError(c.l10n.gettext("Not a valid value for %(field)s: %(value)s", field="id",
                                                  value=alert_id[:32]))
            if status not in REVIEW_STATUSES:
                raise ConsoleError(c.l10n.gettext("Unknown action."))
            comment = c.form.get("comment", "").strip()
            if not comment:
                raise ConsoleError(c.l10n.gettext("A review needs a comment."))
            try:
                alert = self.privacy_alerts.mark(alert_id, status, comment, c.session.user)
            except KeyError:
                raise ConsoleError(c.l10n.gettext("No privacy alert %(id)s.", id=alert_id)) from None
            except ValueError as exc:
                raise ConsoleError(str(exc)) from None
            # The same record as `dpiguard privacy alerts mark` (the console's session and request id too).
            c.portal.event(c.req, "privacy_review", alert.user, "allow", status, comment[:500], alert_id=alert_id,
                           detector=alert.detector, patient=alert.patient, operator=c.session.user)
            done = c.l10n.gettext("Privacy alert %(id)s marked %(status)s.", id=alert_id,
                                  status=STATUS_LABELS.get(status, status))
        status = c.params.get("status", "new")
        if status not in ("new", "all") + REVIEW_STATUSES:
            raise ConsoleError(c.l10n.gettext("Not a valid value for %(field)s: %(value)s", field="status",
                                              value=status[:32]))
        detector = c.params.get("detector") or None
        if detector is not None and detector not in LABELS:
            raise ConsoleError(c.l10n.gettext("Not a valid value for %(field)s: %(value)s", field="detector",
                                              value=detector[:32]))
        user = (c.params.get("user") or "").lower() or None
        alerts = self.privacy_alerts.list(status=None if status == "all" else status, detector=detector, user=user,
                                          limit=self.max_rows)
        figures = self.privacy_alerts.figures(self.privacy_alerts.list(limit=100000))
        if not c.form:
            c.trace("allow", "ok", status)
        return c.render("console_privacy.html", alerts=alerts, figures=figures, done=done, review_status=status,
                        detector=detector or "", user=user or "", detectors=sorted(LABELS.items(), key=lambda i: i[1]),
                        statuses=STATUS_LABELS, timeline="timeline" in c.caps)

    def page_stats(self, c: "Ctx"):
        flt = self._filter(c, default_days=7)
        stats = refusal_stats(iter_store(self.audit_source), flt)
        c.trace("allow", "ok")
        peak = max([row["count"] for row in stats["by_reason"]] or [1])
        return c.render("console_stats.html", stats=stats, peak=peak, since=flt.since,
                        login_reasons=LOGIN_REDIRECT_REASONS)

    def page_explain(self, c: "Ctx"):
        request_id = c.params.get("request_id", "")
        record = decision = None
        lines: list[str] = []
        if request_id:
            if len(request_id) > 32 or not request_id.isalnum():
                raise ConsoleError(c.l10n.gettext("Not a valid value for %(field)s: %(value)s", field="request_id",
                                                  value=request_id[:32]))
            record = find_request(iter_store(self.audit_source), request_id)
        if record is not None:
            policies = c.portal.policies()
            when = parse_iso_ms(record.get("time")) or time.time()
            target = record.get("target") or record.get("path") or "/"
            decision = decide_request(policies, record.get("roles") or [], record.get("method") or "GET", target,
                                      user=record.get("user") or "?", units=tuple(record.get("units") or ()),
                                      careteam=live_careteam(self.careteam), now=when)
            lines = explain_lines(policies, decision)
        c.trace("allow" if record is not None or not request_id else "deny", "ok" if record is not None or not request_id
                else "not_found", request_id or None)
        return c.render("console_explain.html", request_id=request_id, record=record, decision=decision,
                        lines=lines, found=record is not None)

    def page_helpdesk(self, c: "Ctx"):
        login = (c.form.get("login") or c.params.get("login") or "").strip().lower()
        done, qr, uri = "", "", ""
        user = None
        if login:
            user = self.users.get(login)
            if user is None:
                raise ConsoleError(c.l10n.gettext("No account %(login)s.", login=login[:64]))
            if self.capabilities(user.roles) is not None or any(r in self.roles for r in user.roles):
                raise ConsoleError(c.l10n.gettext("Administrative accounts are managed by the operators "
                                                  "(dpiguard users ...), not from the console."))
        if c.form:
            action = c.form.get("action")
            if user is None:
                raise ConsoleError(c.l10n.gettext("Give the account's login."))
            if action == "unlock":
                self.authenticator.unlock(user.login)
                done = c.l10n.gettext("The account %(login)s is unlocked.", login=user.login)
            elif action == "reset_totp":
                uri = self.users.reset_totp(user.login)
                self.sessions.revoke_user(user.login)
                qr = "data:image/png;base64," + base64.b64encode(qr_png_bytes(uri)).decode()
                done = c.l10n.gettext("New authenticator code for %(login)s: have them scan this QR code now. Their "
                                      "sessions are ended; the old codes no longer work.", login=user.login)
            elif action == "end_sessions":
                count = self.sessions.revoke_user(user.login)
                done = c.l10n.ngettext("%(num)d session of %(login)s ended, on every instance.",
                                       "%(num)d sessions of %(login)s ended, on every instance.", count,
                                       login=user.login)
            elif action == "unthrottle":
                lifted = self.unthrottle(user.login)
                done = (c.l10n.gettext("The mass-access pause of %(login)s is lifted.", login=user.login) if lifted
                        else c.l10n.gettext("%(login)s was not paused; the counters are reset.", login=user.login))
            else:
                raise ConsoleError(c.l10n.gettext("Unknown action."))
            c.trace("allow", "ok", user.login, action=f"helpdesk_{action}", target_user=user.login)
        else:
            c.trace("allow", "ok", login or None)
        state = None
        if user is not None:
            state = {"locked_for": self.authenticator.locked_for(user.login),
                      "throttled": user.login in self.throttled(), "disabled": user.disabled}
        return c.render("console_helpdesk.html", login=login, account=user, state=state, done=done, qr=qr, uri=uri)


STATUS_TEXT = {"pending": N_("to review"), "justified": N_("justified"), "abusive": N_("abusive")}


class Ctx:
    """One console request: who, what they may do, what they asked."""

    def __init__(self, portal, req, session, l10n, caps, page, title, params, form):
        self.portal, self.req, self.session, self.l10n = portal, req, session, l10n
        self.caps, self.page, self.title, self.params, self.form = caps, page, title, params, form

    def trace(self, outcome: str, reason: str, detail: str | None = None, action: str | None = None, **extra) -> None:
        self.portal.event(self.req, "console", self.session.user, outcome, reason, detail,
                          action=action or ("console_" + (self.page or "home")), **extra)

    def render(self, template: str, status: int = 200, **context):
        nav = [(p, PREFIX + "/" + p, self.l10n.gettext(PAGES[p][1])) for p in NAV if PAGES[p][0] in self.caps]
        return self.portal.page(self.req, template, status, self.session, title=self.l10n.gettext(self.title),
                                nav=nav, current=self.page, caps=self.caps, params=self.params,
                                csrf=self.session.csrf, reason_label=lambda code: reason_text(self.l10n, code),
                                now=time.time(), category_label=self.category_label, **context)

    def category_label(self, category: str | None, action: str | None = None) -> str:
        text = self.portal.pages.category_label(self.l10n, category)
        if action in ACTION_TEXT:
            text += f" ({self.l10n.gettext(ACTION_TEXT[action])})"
        return text
