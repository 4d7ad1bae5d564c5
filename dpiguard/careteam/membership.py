"""The care-team rule, as a pure function of what the store holds.

A user is in the patient's care team at ``now`` when an assignment is valid at ``now``, or when the
patient has a stay in unit X with ``start <= now <= end + grace`` and the user is a member of X at
``now``; a member of a transversal unit (policies/careteam.yaml) also reaches the patients of the
unit's scope for the unit's categories. All windows are inclusive; times are epoch seconds; None
bounds are open. Malformed stored data raises :class:`CareTeamDataError`: it is never read as
"member" (callers fail closed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import orjson

from dpiguard.ids import ID_RE
from dpiguard.storage.clients import as_text


class CareTeamDataError(ValueError):
    """Care-team data stored in Redis is malformed (callers must refuse, not allow)."""


@dataclass(frozen=True)
class Membership:
    """Answer to "is this user in this patient's care team now?".

    ``source`` says why (``assignment:KIND``, ``unit:UNIT stay:ID``, or ``none``). ``valid_until``
    is the earliest future time at which the answer could change by the clock alone, None if never;
    use it to bound cache lifetime."""

    member: bool
    source: str
    valid_until: float | None


@dataclass(frozen=True)
class Window:
    start: float | None
    end: float | None

    def contains(self, now: float) -> bool:
        return (self.start is None or self.start <= now) and (self.end is None or now <= self.end)

    def changes(self, now: float) -> list[float]:
        """Times at or after ``now`` where ``contains`` may flip: a future start, or an end not yet
        passed (inclusive end: still inside at ``end``, outside just after)."""
        times = []
        if self.start is not None and self.start > now:
            times.append(self.start)
        if self.end is not None and self.end >= now:
            times.append(self.end)
        return times



# --------------------------------------------------------------------------- parsing stored data


def _parse_time(raw: Any, what: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise CareTeamDataError(f"{what}: bad time {raw!r}")
    return raw


def parse_unit_window(raw: Any, unit: str = "?") -> Window:
    """Parse a ``FROM|TO`` membership value (empty = open)."""
    text = as_text(raw)
    parts = text.split("|") if isinstance(text, str) else []
    if len(parts) != 2:
        raise CareTeamDataError(f"membership of unit {unit}: malformed value {raw!r}")
    bounds = []
    for part in parts:
        if part == "":
            bounds.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise CareTeamDataError(f"membership of unit {unit}: malformed value {raw!r}") from None
        if not math.isfinite(value):
            raise CareTeamDataError(f"membership of unit {unit}: malformed value {raw!r}")
        bounds.append(value)
    return Window(bounds[0], bounds[1])


def _parse_json_object(raw: Any, what: str) -> dict:
    try:
        data = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise CareTeamDataError(f"{what}: invalid JSON") from exc
    if not isinstance(data, dict):
        raise CareTeamDataError(f"{what}: expected a JSON object")
    return data


def parse_stay(raw: Any, stay_id: str = "?") -> dict:
    """Parse a stored stay into ``{"unit", "start", "end"}`` (unit upper-cased)."""
    what = f"stay {stay_id}"
    data = _parse_json_object(raw, what)
    unit = data.get("unit")
    if not isinstance(unit, str) or not ID_RE.fullmatch(unit):
        raise CareTeamDataError(f"{what}: bad unit {unit!r}")
    start = _parse_time(data.get("start"), what)
    if start is None:
        raise CareTeamDataError(f"{what}: missing start")
    return {"unit": unit.upper(), "start": start, "end": _parse_time(data.get("end"), what)}


def parse_assignment(raw: Any, login: str = "?") -> dict:
    """Parse a stored assignment into ``{"kind", "start", "end"}``."""
    what = f"assignment of {login}"
    data = _parse_json_object(raw, what)
    kind = data.get("kind")
    if not isinstance(kind, str) or not ID_RE.fullmatch(kind):
        raise CareTeamDataError(f"{what}: bad kind {kind!r}")
    return {"kind": kind, "start": _parse_time(data.get("start"), what),
            "end": _parse_time(data.get("end"), what)}


def stay_window(stay: dict, grace: float) -> Window:
    end = stay["end"]
    return Window(stay["start"], None if end is None else end + grace)


# --------------------------------------------------------------------------- the decision


def compute_membership(
    user_units: Mapping[Any, Any],
    stays: Mapping[Any, Any],
    assignment: Any | None,
    now: float,
    grace: float = 0,
    category: str | None = None,
    transversal: Mapping[str, Any] | None = None,
) -> Membership:
    """Pure care-team decision from raw Redis replies.

    ``user_units``: HGETALL of the user's units; ``stays``: HGETALL of the patient's stays;
    ``assignment``: HGET of the user's assignment to the patient (None if absent). Raises
    CareTeamDataError on any malformed value, even one that would not matter for the answer.

    ``transversal``: unit → :class:`dpiguard.transversal.TransversalUnit` (policies/careteam.yaml).
    A member of a transversal unit also reaches the patient for the unit's ``categories`` (only when
    ``category`` is given and listed) if the patient is in the unit's scope (see transversal.py)."""
    units = {as_text(u).upper(): parse_unit_window(v, as_text(u)) for u, v in user_units.items()}
    parsed_stays = sorted(
        ((as_text(sid), parse_stay(raw, as_text(sid))) for sid, raw in stays.items()),
        key=lambda item: (item[1]["start"], item[0]),
    )
    parsed_assignment = None if assignment is None else parse_assignment(assignment)

    boundaries: list[float] = []
    source = None
    if parsed_assignment is not None:
        window = Window(parsed_assignment["start"], parsed_assignment["end"])
        boundaries += window.changes(now)
        if window.contains(now):
            source = f"assignment:{parsed_assignment['kind']}"
    for stay_id, stay in parsed_stays:
        unit_window = units.get(stay["unit"])
        if unit_window is None:
            continue  # only a write (membership) could make this stay count
        window = stay_window(stay, grace)
        boundaries += window.changes(now) + unit_window.changes(now)
        if source is None and window.contains(now) and unit_window.contains(now):
            source = f"unit:{stay['unit']} stay:{stay_id}"

    if transversal and category is not None:
        for unit, unit_window in sorted(units.items()):
            rule = transversal.get(unit)
            if rule is None or category not in rule.categories:
                continue
            boundaries += unit_window.changes(now)
            in_scope = rule.scope == "any_patient"
            for stay_id, stay in parsed_stays:
                window = Window(stay["start"], stay["end"]) if rule.scope == "open_stay_anywhere" \
                    else stay_window(stay, grace)
                if rule.scope != "any_patient":
                    boundaries += window.changes(now)
                    in_scope = in_scope or window.contains(now)
            if source is None and in_scope and unit_window.contains(now):
                source = f"transversal:{unit} {rule.scope}"

    valid_until = min(boundaries) if boundaries else None
    if source is None:
        return Membership(False, "none", valid_until)
    return Membership(True, source, valid_until)
