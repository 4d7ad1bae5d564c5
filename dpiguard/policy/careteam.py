"""``policies/careteam.yaml``: transversal units and the grace period, written by the RSSI.

A *transversal* unit (emergency, radiology, laboratory, pharmacy...) serves patients who stay in
other units. Its members do not get the whole record of those patients: only the data categories the
file lists, and only for the patients of the configured scope:

- ``open_stay_anywhere``   the patient has a stay going on now, in any unit (grace not counted);
- ``recent_stay_anywhere`` the patient has a stay going on now or ended less than the grace period ago;
- ``any_patient``          every patient (use with care: this is the a-posteriori model).

The file is optional (no file: no transversal unit, grace from ``careteam.grace_seconds``). It is
validated at load like the other policy files: any mistake is a PolicyError naming file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

from dpiguard.ids import ID_RE
from dpiguard.policy.files import LineDict, LineList, PolicyError, load_yaml, read_policy_file

CARETEAM_FILE = "careteam.yaml"
SCOPES = ("open_stay_anywhere", "recent_stay_anywhere", "any_patient")


@dataclass(frozen=True)
class TransversalUnit:
    unit: str
    description: str
    categories: frozenset[str]
    scope: str


@dataclass(frozen=True)
class CareTeamPolicy:
    """Transversal units by (upper-case) unit name, and the grace period if the file sets one."""

    units: Mapping[str, TransversalUnit] = field(default_factory=lambda: MappingProxyType({}))
    grace_seconds: int | None = None

    @classmethod
    def load(cls, path: str | Path, categories: Iterable[str] | None = None) -> "CareTeamPolicy":
        """Read and validate ``path``; an absent file gives an empty policy.

        ``categories``: the declared data categories (categories.yaml), to catch typos."""
        path = Path(path)
        if not path.exists():
            return cls()
        _, text = read_policy_file(path)
        return cls.from_text(text, str(path), categories)

    @classmethod
    def from_text(cls, text: str, label: str, categories: Iterable[str] | None = None) -> "CareTeamPolicy":
        """Validate the text of a careteam.yaml (``label`` names it in errors)."""
        data = load_yaml(text, label)
        known = set(categories) if categories is not None else None
        for key in data:
            if key not in ("grace_seconds", "transversal_units"):
                raise PolicyError(label, data.line_of(key), f"unknown section {key!r} "
                                                            "(expected 'grace_seconds' and 'transversal_units')")
        grace = data.get("grace_seconds")
        if grace is not None and (isinstance(grace, bool) or not isinstance(grace, int) or grace < 0):
            raise PolicyError(label, data.line_of("grace_seconds"),
                              "'grace_seconds' must be a whole number of seconds (0 or more), or null")
        units: dict[str, TransversalUnit] = {}
        section = data.get("transversal_units")
        if section is None:
            section = LineDict()
        if not isinstance(section, LineDict):
            raise PolicyError(label, data.line_of("transversal_units"),
                              "'transversal_units' must map unit names to their settings")
        for name, value in section.items():
            line = section.line_of(name)
            if not isinstance(name, str) or not ID_RE.fullmatch(name):
                raise PolicyError(label, line, f"unit name {name!r}: 1-64 characters among A-Z a-z 0-9 . _ -")
            what = f"transversal unit {name!r}"
            if not isinstance(value, LineDict):
                raise PolicyError(label, line, f"{what}: expected 'description', 'categories' and 'patients' below")
            for key in value:
                if key not in ("description", "categories", "patients"):
                    raise PolicyError(label, value.line_of(key), f"{what}: unknown setting {key!r} "
                                                                 "(allowed: categories, description, patients)")
            description = value.get("description")
            if not isinstance(description, str) or not description.strip():
                raise PolicyError(label, value.line, f"{what} needs a 'description' text")
            cats = value.get("categories")
            if not isinstance(cats, LineList) or not cats or not all(isinstance(c, str) for c in cats):
                raise PolicyError(label, value.line_of("categories"),
                                  f"{what}: 'categories' must be a non-empty list of category names")
            for c in cats:
                if known is not None and c not in known:
                    raise PolicyError(label, value.line_of("categories"), f"{what}: unknown category {c!r} "
                                                                          "(categories are declared in categories.yaml)")
            scope = value.get("patients", "open_stay_anywhere")
            if scope not in SCOPES:
                raise PolicyError(label, value.line_of("patients"),
                                  f"{what}: 'patients' must be one of {', '.join(SCOPES)}, not {scope!r}")
            unit = name.upper()
            if unit in units:
                raise PolicyError(label, line, f"{what}: listed twice (unit names ignore case)")
            units[unit] = TransversalUnit(unit, description.strip(), frozenset(cats), scope)
        return cls(MappingProxyType(units), grace)
