"""What every page of dpiguard shares: templates per language, the page chrome, reasons as sentences.

The pages are the Jinja2 templates of ``dpiguard/edge/templates/`` (``base.html`` is the layout the
others extend), rendered with autoescaping (every value put into a page is escaped for HTML) and the
gettext catalogues of :mod:`dpiguard.i18n` (French by default, English on request). The portal
(``portal.py``), the console (``console.py``) and the bar put into the DPI's pages (``banner.py``) render
through :class:`Pages`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import quote, urlsplit

from jinja2 import PackageLoader

from dpiguard.i18n import LANGUAGE_NAMES, Localizer, TemplateSet, negotiate

PREFIX = "/_dpiguard/"
#: dpiguard's own pages a person may be sent back to (after login, after a language switch).
RETURN_PAGES = ("/_dpiguard/login", "/_dpiguard/logout", "/_dpiguard/console")


def N_(message: str) -> str:
    """Marks a text for the catalogue (extracted by Babel); translated where it is shown."""
    return message


#: Why a request was refused, as a sentence for the person who asked (msgids; see dpiguard/locale).
REASON_TEXT = {
    "not_authenticated": N_("Please log in."),
    "session_expired": N_("Your session has ended (inactivity or maximum duration). Please log in again."),
    "not_in_care_team": N_("You are not in this patient's care team: the patient does not stay in one of "
                           "your units and is not assigned to you."),
    "category_not_permitted": N_("Your role does not give access to this kind of data."),
    "no_route": N_("This address of the patient record is not open through dpiguard."),
    "hostile_path": N_("The address of the request is malformed, so it was refused."),
    "ambiguous_patient": N_("The request names more than one patient, so it was refused."),
    "forged_identity_header": N_("The request carried an identity header that only dpiguard may set."),
    "csrf_origin_mismatch": N_("The request came from another site, so it was refused."),
    "csrf_failed": N_("The form has expired or did not come from this page. Please try again."),
    "header_too_large": N_("The request headers are too large."),
    "body_too_large": N_("The request is too large for dpiguard's pages."),
    "internal_error": N_("dpiguard could not take a safe decision, so access is refused. Contact IT support."),
    "mass_access": N_("You opened many different patients' records in a short time, so access is paused. "
                      "Contact your supervisor."),
    "audit_unavailable": N_("The access trace could not be written, so no patient data is served. "
                            "Contact IT support."),
    "tls_required": N_("This service is only served over HTTPS."),
    "method_not_allowed": N_("This HTTP method is not allowed."),
    "patient_objection": N_("The patient has objected to your access to their record."),
    "admin_account": N_("Administrative accounts (DPO, security officer, helpdesk) do not open patient "
                        "records: use the dpiguard console."),
    "console_forbidden": N_("This page is for administrative accounts (DPO, security officer, helpdesk) "
                            "with the right to use it."),
    "fhir_forbidden_parameter": N_("This FHIR search parameter could reveal other patients' data, so it is "
                                   "refused."),
    "fhir_search_not_scoped": N_("This FHIR search must name the patient."),
    "fhir_type_not_mapped": N_("This kind of FHIR resource is not open through dpiguard."),
    "fhir_operation_not_allowed": N_("This FHIR operation is not allowed."),
    "fhir_not_supported": N_("dpiguard does not open this kind of FHIR request."),
    "fhir_invalid_request": N_("The FHIR request is malformed."),
    "fhir_no_patient": N_("This FHIR resource names no patient dpiguard can check, so it is refused."),
    "not_found": N_("This page does not exist."),
    "fhir_not_found": N_("This FHIR resource does not exist, or it is not one you may see."),
    "fhir_upstream_error": N_("The patient record application could not answer this FHIR request."),
    "fhir_search_too_broad": N_("This FHIR search matches too many entries: narrow it (for example, name "
                                "the patient)."),
    "fhir_invalid_cursor": N_("This FHIR page link is not valid for you, or it has expired: run the "
                              "search again."),
    "fhir_conditional_reference": N_("A conditional reference (a search in place of a resource id) cannot "
                                     "be checked, so it is refused: name the resource by its id."),
    "routing_header": N_("The request carried a header that would change its address, so it was refused."),
    "malformed_header": N_("A header of the request is malformed, so it was refused."),
    "absolute_target_refused": N_("The request names another server, so it was refused."),
    "http_protocol_error": N_("The request does not follow the HTTP protocol, so it was refused."),
}

#: The descriptions and labels of the shipped policy files (policies/categories.yaml, breakglass.yaml),
#: so that the catalogue translates them; an RSSI's own text is shown as written.
POLICY_TEXTS = (
    N_("Physician in charge of patients (senior or resident)."),
    N_("Nurse caring for patients in a unit."),
    N_("Medical secretary (letters, reports, administrative file)."),
    N_("Hospital pharmacist validating and dispensing prescriptions."),
    N_("Admissions desk agent registering patients."),
    N_("Patient identity, address, insurance and admission data."),
    N_("Medical and nursing notes, consultation and discharge reports."),
    N_("Laboratory (biology) results."),
    N_("Vital signs (pulse, temperature, blood pressure, oxygen saturation)."),
    N_("Medication prescriptions and their administration."),
    N_("Imaging studies and radiology reports."),
    N_("Home page and patient list of the record application (no medical data)."),
    N_("Life-threatening emergency (urgence vitale)"),
    N_("Patient unconscious or unable to consent (patient inconscient)"),
    N_("Continuity of care - the usual team is unavailable (continuité des soins)"),
    N_("On-call duty (garde / astreinte)"),
    N_("Urgent transfer from another unit or hospital (transfert urgent)"),
)

#: What an action means for people.
ACTION_TEXT = {"read": N_("consultation"), "write": N_("change")}


def reason_text(l10n: Localizer, reason: str, fallback: str = "") -> str:
    text = REASON_TEXT.get(reason)
    return l10n.gettext(text) if text else (fallback or reason)


def safe_next(target: str, portal_pages: bool = False) -> str:
    """Only a local path may be a redirect target (no open redirect, no portal loop). With
    ``portal_pages``, dpiguard's own pages of :data:`RETURN_PAGES` are allowed too."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target) or len(target) > 2048:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    if target.startswith(PREFIX):
        path = parts.path
        if not portal_pages or not any(path == p or path.startswith(p + "/") for p in RETURN_PAGES):
            return "/"
    return target


def same_origin_path(headers: Mapping[str, str]) -> str:
    """The path of the Referer as a local address ("" if none): the way back. Only its path is kept
    (the Host header is the DPI's in reverse mode), so it can never lead off this site."""
    referer = headers.get("referer", "")
    if not referer or headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return ""
    parts = urlsplit(referer)
    path = parts.path + ("?" + parts.query if parts.query else "")
    back = safe_next(path, portal_pages=True)
    return back if back != "/" or path == "/" else ""


@dataclass
class Chrome:
    """The parts of the layout every page has: language links, who is logged in, the helpdesk line."""

    languages: list[dict[str, str]] = field(default_factory=list)
    user: str = ""
    user_label: str = ""
    helpdesk: str = ""


@dataclass(frozen=True)
class PageSettings:
    languages: tuple[str, ...] = ("fr", "en")
    language: str = "fr"
    timezone: str = "Europe/Paris"
    helpdesk: str | None = None


class Pages:
    """Templates per language, and the chrome of a page for one request."""

    def __init__(self, settings: PageSettings, policies=None):
        self.settings = settings
        self.templates = TemplateSet(PackageLoader("dpiguard.edge", "templates"))
        self.policies = policies  # callable → PolicySet (role and category descriptions), or None

    def localizer(self, headers: Mapping[str, str]) -> Localizer:
        s = self.settings
        return Localizer(negotiate(headers, s.languages, s.language), s.timezone)

    def helpdesk(self, l10n: Localizer) -> str:
        if self.settings.helpdesk:
            return self.settings.helpdesk
        return l10n.gettext("For help, contact your IT support (helpdesk).")

    def user_label(self, l10n: Localizer, user: str, display_name: str = "", roles=()) -> str:
        who = f"{display_name} ({user})" if display_name and display_name != user else user
        labels = [self.role_label(l10n, r) for r in roles]
        return f"{who}, {', '.join(labels)}" if labels else who

    def role_label(self, l10n: Localizer, role: str) -> str:
        description = None
        if self.policies is not None:
            try:
                description = self.policies().roles.get(role)
            except Exception:
                description = None
        return l10n.gettext(description).rstrip(".") if description else role

    def category_label(self, l10n: Localizer, category: str | None) -> str:
        if not category:
            return ""
        description = None
        if self.policies is not None:
            try:
                cat = self.policies().categories.get(category)
                description = cat.description if cat is not None else None
            except Exception:
                description = None
        return l10n.gettext(description).rstrip(".") if description else category

    def chrome(self, l10n: Localizer, target: str, user: str = "", display_name: str = "", roles=()) -> Chrome:
        here = safe_next(target, portal_pages=True)
        links = [{"code": code, "name": LANGUAGE_NAMES.get(code, code),
                  "href": f"/_dpiguard/lang?to={code}&next={quote(here, safe='')}"}
                 for code in self.settings.languages if code != l10n.lang]
        label = self.user_label(l10n, user, display_name, roles) if user else ""
        return Chrome(links, user, label, self.helpdesk(l10n))

    def render(self, template: str, l10n: Localizer, chrome: Chrome, **context: Any) -> bytes:
        """A page of ``templates/``; every value of ``context`` is escaped where the template puts it."""
        return self.templates.render(template, l10n, chrome=chrome, **context).encode()

    def render_text(self, template: str, l10n: Localizer, **context: Any) -> str:
        return self.templates.render(template, l10n, **context)
