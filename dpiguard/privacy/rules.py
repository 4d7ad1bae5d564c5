"""The detectors: names, what each setting means, defaults and bounds, and the texts for people.

``policies/privacy.yaml`` (read by :mod:`dpiguard.policy.privacy`) enables and tunes them; this module
only describes them, so the policy reader, the monitor, the documentation and the review queue agree.
Texts for the RSSI/DPO are in French and all here (``LABELS``, ``WHY``, ``STATUS_LABELS``), in one place
for translation.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIONS = ("alert", "require_break_glass", "refuse")
#: Detectors whose facts are static (known when the request arrives): they may act at decision time.
DECISION_TIME = ("self_access", "family_name", "same_address", "staff_patient", "vip")


@dataclass(frozen=True)
class Setting:
    default: float | int | bool | tuple[str, ...]  # a tuple: a list of names in the file
    low: float | None = None
    high: float | None = None
    help: str = ""


SETTINGS: dict[str, dict[str, Setting]] = {
    "self_access": {},
    "family_name": {
        "common_name_share": Setting(0.0002, 0.0, 1.0, "share of patients above which a family name is common"),
    },
    "same_address": {
        "street": Setting(True, help="also same street and postal code (neighbours), when no care event explains it"),
    },
    "staff_patient": {
        "desk_roles": Setting(("reception",), help="roles of the admission desk: an admission or a discharge of the "
                                                   "patient close to the access explains it (their work)"),
        "desk_event_hours": Setting(2.0, 0.25, 24, "hours before or after the access in which an admission or a "
                                                   "discharge explains a desk agent's access"),
    },
    "coworker": {},
    "vip": {
        "every_access": Setting(False, help="alert on every access, even by the care team"),
    },
    "late_access": {
        "after_days": Setting(30, 1, 3650, "days after the end of the stay or assignment"),
    },
    "broad_rule": {},
    "volume": {
        "min_patients": Setting(25, 1, 100000, "distinct patients in a day below which nothing is said"),
        "own_factor": Setting(3.0, 1.0, 100.0, "times the user's own usual day"),
        "role_factor": Setting(3.0, 1.0, 100.0, "times the usual day of the role"),
    },
    "unusual_hours": {
        "min_patients": Setting(3, 1, 1000, "distinct patients opened in unusual hours"),
        "own_share": Setting(0.05, 0.0, 1.0, "an hour is unusual for the user below this share of their days"),
        "role_share": Setting(0.02, 0.0, 1.0, "and unusual for the role below this share of its accesses"),
    },
    "break_glass_unused": {
        "window_hours": Setting(72, 1, 24 * 30, "hours after the emergency access to see a care event"),
    },
}
DETECTORS = tuple(SETTINGS)

#: General settings of the file (name → Setting).
GENERAL: dict[str, Setting] = {
    "realert_days": Setting(30, 1, 3650, "at most one alert per detector, user and patient in this period"),
    "care_event_hours": Setting(24, 1, 24 * 30, "hours before and after an access in which a care event explains it"),
    "history_days": Setting(28, 7, 365, "days of history for the volume and hours baselines"),
    "min_history_days": Setting(5, 1, 365, "active days needed before a user's own baseline is used"),
}

LABELS = {
    "self_access": "Accès à son propre dossier",
    "family_name": "Même nom de famille que le patient",
    "same_address": "Même adresse (ou même rue) que le patient",
    "staff_patient": "Patient membre du personnel",
    "coworker": "Patient collègue du même service",
    "vip": "Patient confidentiel / personnalité",
    "late_access": "Accès longtemps après la fin de la prise en charge",
    "broad_rule": "Accès par une règle large sans événement de soins",
    "volume": "Volume d'accès inhabituel",
    "unusual_hours": "Accès à des heures inhabituelles",
    "break_glass_unused": "Bris de glace sans prise en charge ensuite",
}

#: Why an alert fired, for people (``{...}`` filled from the alert's evidence; no name, no address).
WHY = {
    "self_access": "L'utilisateur a ouvert un dossier patient qui est le sien.",
    "family_name": "Le patient porte le même nom de famille que l'utilisateur ; {reason}.",
    "same_address": "Le patient habite {where} que l'utilisateur ; {reason}.",
    "staff_patient": "Le patient est un membre du personnel et aucune prise en charge directe n'explique l'accès "
                     "(ni séjour dans un service de l'utilisateur, ni affectation, ni écriture de l'utilisateur ou "
                     "de son service{around}{desk}) ; {reason}.",
    "coworker": "Le patient est un collègue qui travaille dans le même service que l'utilisateur ({units}) ; "
                "{reason}.",
    "vip": "Le patient est signalé {level} ; {reason}.",
    "late_access": "Le dernier lien de soins de l'utilisateur avec ce patient a pris fin il y a {days} jours.",
    "broad_rule": "Aucun séjour, affectation ni écriture de soins dans les {hours} heures autour de l'accès ; "
                  "{reason}.",
    "volume": "{patients} patients distincts ouverts le {day}, pour {own} d'habitude (rôle : {role}).",
    "unusual_hours": "{patients} patients ouverts le {day} à des heures où l'utilisateur et son rôle ne "
                     "travaillent presque jamais ({hours}).",
    "break_glass_unused": "Bris de glace le {day} sans séjour dans un service de l'utilisateur, affectation ou "
                          "écriture de sa part dans les {hours} heures qui ont suivi.",
}

EXPLANATIONS = {
    "direct": "accès expliqué par un séjour dans un service de l'utilisateur ou une affectation",
    "transversal": "accès permis par un service transversal",
    "role_only": "accès permis par le seul rôle (données sans exigence d'équipe de soins)",
    "break_glass": "accès sous bris de glace",
}

STATUS_LABELS = {"new": "à revoir", "justified": "justifié", "abusive": "abusif"}
REVIEW_STATUSES = ("justified", "abusive")

SEVERITY = {"self_access": "high", "family_name": "high", "same_address": "high", "coworker": "high",
            "vip": "high", "staff_patient": "medium", "late_access": "medium", "broad_rule": "medium",
            "volume": "medium", "unusual_hours": "low", "break_glass_unused": "medium"}


def why(detector: str, evidence: dict) -> str:
    """The plain-French sentence of an alert (missing fields shown as '?')."""

    class _Missing(dict):
        def __missing__(self, key):
            return "?"

    values = _Missing({k: v for k, v in evidence.items() if isinstance(v, (str, int, float))})
    if "explanation" in evidence:
        values["reason"] = EXPLANATIONS.get(evidence["explanation"], evidence["explanation"])
    if detector == "staff_patient":  # alerts raised before these fields existed read without them
        hours, desk = evidence.get("hours"), evidence.get("desk_hours")
        values["around"] = f" dans les {hours} heures autour de l'accès" if isinstance(hours, int) else ""
        values["desk"] = (f", ni pour l'accueil une arrivée ou une sortie du patient dans les {desk:g} heures"
                          if isinstance(desk, (int, float)) and not isinstance(desk, bool) else "")
    return WHY[detector].format_map(values)
