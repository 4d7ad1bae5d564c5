"""``policies/breakglass.yaml``: who may open a record in an emergency, why, for how long, and to what.

The RSSI sets the reasons offered, the minimum length of the written justification, the duration of a
grant, the categories and actions it opens, the roles that may never use it, and whether a grant
overrides a patient objection. No file: emergency access is off. Any mistake is a ``PolicyError``
naming the file and line (see docs/breakglass.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from dpiguard.policy.files import LineDict, PolicyError, load_yaml, read_policy_file
from dpiguard.policy.routes import ACTIONS
from dpiguard.policy.table import NAME_RE

FILE_NAME = "breakglass.yaml"
MAX_DURATION = 7 * 86400


# ------------------------------------------------------------------------------------ the policy file

@dataclass(frozen=True)
class BreakGlassPolicy:
    enabled: bool = False
    reasons: Mapping[str, str] = field(default_factory=dict)  # code → label, in file order
    justification_min_length: int = 20
    duration_seconds: float = 14400
    categories: frozenset[str] = frozenset()
    actions: frozenset[str] = frozenset({"read"})
    never_roles: frozenset[str] = frozenset()
    override_patient_objection: bool = False
    source: str = ""  # file it came from ("" = no file: emergency access off)

    @classmethod
    def disabled(cls) -> "BreakGlassPolicy":
        return cls()

    def roles_allowed(self, roles: Iterable[str]) -> bool:
        """True unless one of ``roles`` may never use emergency access."""
        roles = tuple(roles)
        return bool(roles) and not any(r in self.never_roles for r in roles)

    def reachable(self, category: str | None, action: str | None) -> bool:
        return self.enabled and category in self.categories and action in self.actions

    @classmethod
    def load(cls, directory: str | Path, roles: Iterable[str], categories: Iterable[str]) -> "BreakGlassPolicy":
        """Read ``directory/breakglass.yaml``; no file = emergency access off. PolicyError (file, line)
        on any mistake, including a role or category not declared in categories.yaml."""
        path = Path(directory) / FILE_NAME
        if not path.exists():
            return cls.disabled()
        _, text = read_policy_file(path)
        return cls.from_text(text, str(path), roles, categories)

    @classmethod
    def from_text(cls, text: str, label: str, roles: Iterable[str], categories: Iterable[str]) -> "BreakGlassPolicy":
        """Validate the text of a breakglass.yaml (``label`` names it in errors)."""
        data = load_yaml(text, label)
        known = {"enabled", "reasons", "justification_min_length", "duration_seconds", "categories",
                 "actions", "never_roles", "override_patient_objection"}
        for key in data:
            if key not in known:
                raise PolicyError(label, data.line_of(key), f"unknown setting {key!r} (known: {', '.join(sorted(known))})")
        for key in known:
            if key not in data:
                raise PolicyError(label, None, f"the setting {key!r} is missing")

        def boolean(key: str) -> bool:
            if not isinstance(data[key], bool):
                raise PolicyError(label, data.line_of(key), f"'{key}' must be true or false")
            return data[key]

        def number(key: str, low: float, high: float) -> int:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise PolicyError(label, data.line_of(key), f"'{key}' must be a whole number from {low} to {high}")
            return value

        def names(key: str, allowed: Iterable[str], what: str, empty_ok: bool) -> frozenset[str]:
            value = data[key]
            if value is None and empty_ok:
                return frozenset()
            if not isinstance(value, list) or (not value and not empty_ok):
                raise PolicyError(label, data.line_of(key), f"'{key}' must be a list of {what}s (one '- name' per line)")
            allowed = set(allowed)
            lines = getattr(value, "item_lines", None) or [data.line_of(key)] * len(value)
            out = set()
            for item, line in zip(value, lines):
                if not isinstance(item, str) or item not in allowed:
                    raise PolicyError(label, line, f"'{key}': unknown {what} {item!r} "
                                                   f"(known: {', '.join(sorted(allowed))})")
                if item in out:
                    raise PolicyError(label, line, f"'{key}': {item!r} is written twice")
                out.add(item)
            return frozenset(out)

        enabled = boolean("enabled")
        reasons_raw = data["reasons"]
        if not isinstance(reasons_raw, LineDict) or not reasons_raw:
            raise PolicyError(label, data.line_of("reasons"), "'reasons' must list at least one 'code: label' line")
        reasons: dict[str, str] = {}
        for code, text_label in reasons_raw.items():
            line = reasons_raw.line_of(code)
            if not isinstance(code, str) or not NAME_RE.match(code):
                raise PolicyError(label, line, f"reason code {code!r} must be lowercase letters, digits or '_'")
            if not isinstance(text_label, str) or not text_label.strip() or len(text_label) > 200:
                raise PolicyError(label, line, f"reason {code!r} needs a label text (at most 200 characters)")
            reasons[code] = text_label.strip()
        min_length = number("justification_min_length", 1, 1000)
        duration = number("duration_seconds", 1, MAX_DURATION)
        cats = names("categories", categories, "category", empty_ok=False)
        actions = names("actions", ACTIONS, "action", empty_ok=False)
        never = names("never_roles", roles, "role", empty_ok=True)
        override = boolean("override_patient_objection")
        return cls(enabled, reasons, min_length, float(duration), cats, actions, never, override, label)
