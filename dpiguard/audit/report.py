"""Audit reports for people: the self-contained HTML report for DPOs and the patient's "who accessed my record".

The selection and counting are in :mod:`dpiguard.audit.query`; this module computes the charts'
geometry and renders the Jinja2 templates of ``dpiguard/audit/templates/`` (``report.html``,
``who_accessed.html``, and the SVG chart and table macros of ``charts.html``), with autoescaping: every
value from the audit trail (users, patients, reasons, periods...) is escaped for HTML. Texts are in the
reader's language (French by default, :mod:`dpiguard.i18n`), times are local (``ui.timezone``), yes/no
in words; ``labels`` (from the policy files, given by the caller) turn category and role codes into
their descriptions.
"""

from __future__ import annotations

from typing import Any, Mapping

from jinja2 import PackageLoader, pass_context

from dpiguard.audit.query import cell_text
from dpiguard.i18n import Localizer, TemplateSet


def N_(message: str) -> str:
    return message


HEADINGS = {
    "time": N_("Date and time"), "user": N_("Login"), "name": N_("Name"), "outcome": N_("Result"),
    "purpose": N_("Why"), "category": N_("Data"), "action": N_("Action"), "roles": N_("Role(s)"),
    "units": N_("Unit(s)"), "reason": N_("Detail"), "refusals": N_("Refusals"), "patient": N_("Patient"),
    "break_glass_reason": N_("Reason"), "request_id": N_("Reference"), "care_team": N_("Care-team link"),
    "break_glass": N_("Emergency access"), "justification": N_("Justification"), "requests": N_("Requests"),
    "status": N_("Review"), "review_comment": N_("Review comment"),
    "accesses": N_("Allowed accesses"), "explained_rate": N_("Explained"), "care_rate": N_("By care"),
    "care": N_("Care"), "transversal": N_("Transversal unit"), "role_only": N_("Role only"),
    "detector": N_("Detector"), "count": N_("Alerts"),
}
STATUS_TEXT = {"pending": N_("to review"), "justified": N_("justified"), "abusive": N_("abusive")}
PURPOSE_TEXT = {"care_team": N_("care team"), "emergency": N_("emergency access (bris de glace)"),
                "no_care_team_needed": N_("no care team needed"), "refused": N_("refused")}
OUTCOME_TEXT = {"allow": N_("allowed"), "deny": N_("refused"), "alert": N_("alert")}
ACTION_TEXT = {"read": N_("consultation"), "write": N_("change")}
EVENT_TEXT = {"access": N_("decisions on requests"), "fhir_response": N_("FHIR answers checked"),
              "login_success": N_("logins"), "login_failure": N_("failed logins"), "login_locked": N_("locked logins"),
              "logout": N_("logouts"), "break_glass": N_("emergency accesses opened"),
              "break_glass_request": N_("emergency accesses refused"), "mass_access": N_("mass-access alerts"),
              "admin": N_("management commands"), "console": N_("console actions"),
              "privacy_alert": N_("privacy alerts"), "privacy_review": N_("privacy alert reviews")}


@pass_context
def _cell(context, value: Any, column: str = "") -> str:
    """One table cell in the reader's words: local times, yes/no, labels instead of codes."""
    l10n: Localizer = context["L"]
    labels: Mapping[str, str] = context.get("labels") or {}
    if value is None:
        return ""
    if column == "time":
        return l10n.iso(value)
    if isinstance(value, bool):
        return l10n.yes_no(value)
    if column == "purpose" and value in PURPOSE_TEXT:
        return l10n.gettext(PURPOSE_TEXT[value])
    if column == "outcome" and value in OUTCOME_TEXT:
        return l10n.gettext(OUTCOME_TEXT[value])
    if column == "status" and value in STATUS_TEXT:
        return l10n.gettext(STATUS_TEXT[value])
    if column == "action" and value in ACTION_TEXT:
        return l10n.gettext(ACTION_TEXT[value])
    if column in ("category", "roles") and labels:
        items = value if isinstance(value, (list, tuple)) else [value]
        return ", ".join(l10n.gettext(labels[v]).rstrip(".") if v in labels else str(v) for v in items)
    return cell_text(value)


#: The report templates, parsed once per language on first use and kept.
TEMPLATES = TemplateSet(PackageLoader("dpiguard.audit", "templates"), filters={"cell": _cell},
                        keep_trailing_newline=True)


def _context(l10n: Localizer, labels: Mapping[str, str] | None) -> dict[str, Any]:
    return {"labels": labels or {}, "headings": {k: l10n.gettext(v) for k, v in HEADINGS.items()},
            "event_labels": {k: l10n.gettext(v) for k, v in EVENT_TEXT.items()}}


# -- chart geometry (the templates draw it) ---------------------------------------------------------

def _bar_chart_h(items: list[tuple[str, int]]) -> dict[str, Any] | None:
    """Horizontal bars (categories), one per (label, value); None when there is nothing to draw."""
    if not items:
        return None
    width, label_w, bar_h, gap = 640, 190, 20, 6
    peak = max(v for _, v in items) or 1
    bars = []
    for i, (label, value) in enumerate(items):
        y = 5 + i * (bar_h + gap)
        w = max(1, int((width - label_w - 60) * value / peak))
        bars.append({"label": label, "short_label": label[:28], "value": value, "y": y, "text_y": y + 15,
                     "width": w, "value_x": label_w + w + 6})
    return {"width": width, "height": len(items) * (bar_h + gap) + 10, "label_x": label_w - 8, "bar_x": label_w,
            "bar_height": bar_h, "bars": bars}


def _time_chart(series: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Columns per period (allowed + refused stacked); None when there is nothing to draw."""
    if not series:
        return None
    width, height, left, bottom = 720, 260, 50, 60
    n = len(series)
    slot = (width - left - 10) / n
    bar_w = max(2.0, slot * 0.7)
    peak = max(s["accesses"] for s in series) or 1
    scale = (height - bottom - 10) / peak
    every = max(1, n // 12)  # label one period in ``every``
    columns = []
    for i, s in enumerate(series):
        x = left + i * slot + (slot - bar_w) / 2
        allowed = s["accesses"] - s["refused"]
        columns.append({"period": s["period"], "allowed": allowed, "refused": s["refused"], "x": x,
                        "allowed_height": allowed * scale, "refused_height": s["refused"] * scale,
                        "labelled": i % every == 0, "label_x": x + bar_w / 2})
    return {"width": width, "height": height, "left": left, "base": height - bottom, "peak": peak,
            "bar_width": bar_w, "columns": columns}


# -- pages ------------------------------------------------------------------------------------------

def html_report(summary: dict[str, Any], title: str | None = None, l10n: Localizer | None = None,
                labels: Mapping[str, str] | None = None) -> str:
    """The DPO's report of a :func:`dpiguard.audit.query.summarize` result: one self-contained HTML file."""
    s = summary
    l10n = l10n or Localizer()
    return TEMPLATES.render(
        "report.html", l10n, summary=s, title=title or l10n.gettext("dpiguard audit report"),
        **_context(l10n, labels),
        accesses_chart=_time_chart(s["accesses_over_time"]),
        refusals_chart=_bar_chart_h([(r["reason"], r["count"]) for r in s["refusals_by_reason"]]),
        top_users_chart=_bar_chart_h([(r["user"], r["patients"]) for r in s["top_users_by_distinct_patients"]]),
    )


def who_accessed_html(patient: str, rows: list[dict[str, Any]], columns: tuple[str, ...],
                      l10n: Localizer | None = None, labels: Mapping[str, str] | None = None) -> str:
    """The accesses to one patient's record (:func:`dpiguard.audit.query.who_accessed`), for the patient."""
    l10n = l10n or Localizer()
    return TEMPLATES.render("who_accessed.html", l10n, patient=patient, rows=rows, columns=columns,
                            **_context(l10n, labels))
