"""The explanation rate: the share of accesses to patient data explained by a care relationship.

Read from the trace alone: every allowed access record says why the care-team check passed
(``care_team``): a stay of the patient in one of the user's units or an assignment (``unit:…``,
``assignment:…``: a care relationship), a transversal unit's rule (``transversal:…``), an emergency
access (``break_glass``), or nothing (data the role may see without care-team requirement, such as the
administrative file, for a patient the user has no relationship with). Reported per unit (the user's
units at the time; ``-`` for users without a unit) and per role, by ``dpiguard audit summary`` and
``dpiguard audit report`` (docs/privacy.md).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

KINDS = ("care", "transversal", "break_glass", "role_only")


def kind_of(record: dict[str, Any]) -> str:
    source = record.get("care_team") or ""
    if record.get("break_glass") or source.startswith("break_glass:"):
        return "break_glass"
    if source.startswith(("unit:", "assignment:")):
        return "care"
    if source.startswith("transversal:"):
        return "transversal"
    return "role_only"


class ExplanationRates:
    """Accumulates allowed patient accesses (``add`` each record) and gives the rates per unit and role."""

    def __init__(self):
        self.by: dict[str, dict[str, dict[str, int]]] = {"unit": defaultdict(lambda: dict.fromkeys(KINDS, 0)),
                                                          "role": defaultdict(lambda: dict.fromkeys(KINDS, 0))}
        self.total = dict.fromkeys(KINDS, 0)

    def add(self, r: dict[str, Any]) -> None:
        if r.get("event") != "access" or r.get("outcome") != "allow" or not r.get("patient"):
            return
        kind = kind_of(r)
        self.total[kind] += 1
        for unit in r.get("units") or ["-"]:
            self.by["unit"][unit][kind] += 1
        for role in r.get("roles") or ["-"]:
            self.by["role"][role][kind] += 1

    @staticmethod
    def _row(name: str, counts: dict[str, int]) -> dict[str, Any]:
        n = sum(counts.values())
        return {"name": name, "accesses": n, "explained_rate": round((counts["care"] + counts["transversal"]) / n, 4)
                if n else None, "care_rate": round(counts["care"] / n, 4) if n else None,
                **{k: counts[k] for k in KINDS}}

    def result(self) -> dict[str, Any]:
        return {"overall": self._row("*", self.total),
                "by_unit": [self._row(k, v) for k, v in sorted(self.by["unit"].items())],
                "by_role": [self._row(k, v) for k, v in sorted(self.by["role"].items())]}


EXPLANATION_COLUMNS = ("name", "accesses", "explained_rate", "care_rate") + KINDS
