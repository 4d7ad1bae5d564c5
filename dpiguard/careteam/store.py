"""Care-team data in Redis: unit stays, unit memberships, explicit assignments (v1).

French law restricts a patient record to the patient's *équipe de soins*. dpiguard models it as:

- a **stay** of a patient in a care unit (``start`` .. ``end``, ``end`` None while still there);
  the team stays entitled for ``grace_seconds`` after the stay ends (discharge letters, results);
- a **membership** of a user (login) in a unit, optionally bounded in time;
- an explicit **assignment** of a user to a patient (referring physician, consultant...), optionally
  bounded in time.

A user is in the patient's care team at ``now`` when an assignment is valid at ``now``, or when the
patient has a stay in unit X with ``start <= now <= end + grace`` and the user is a member of X at
``now``. All windows are inclusive; times are epoch seconds; None bounds are open.

Key layout (``P`` = prefix, ids in literal braces as Redis Cluster hash tags), see
docs/architecture.md:

- ``P:ct:user-units:{LOGIN}``  hash unit → ``FROM|TO`` (empty = open)
- ``P:ct:unit-members:UNIT``   set of logins
- ``P:ct:stays:{PATIENT}``     hash stay id → orjson ``{"unit","start","end"}``
- ``P:ct:unit-patients:UNIT``  set of patients with a stay in the unit
- ``P:ct:assign:{PATIENT}``    hash login → orjson ``{"kind","start","end"}``
- ``P:ct:user-assign:{LOGIN}`` set of patients assigned to the user

Unit names are case-insensitive: they are normalised to upper case on every write and read.

Writes touch the authoritative key of one user or one patient (``{LOGIN}``/``{PATIENT}`` hash tag)
in one command or one WATCH/MULTI/EXEC transaction, so they work unchanged on Redis Cluster. The
unit and user indexes (``unit-members``, ``unit-patients``, ``user-assign``) live in other slots
and are written in separate commands in a safe order: added *before* the authoritative write,
removed *after* it (and re-checked), so an index may hold a stale entry (harmless: every reader
checks the authoritative key) but never misses a live one. Decisions read only authoritative keys.
Each write *then* publishes its invalidation on the bus channel (``patient:P`` for stays; ``user:U`` for memberships; both for
assignments, as the architecture table says). :meth:`CareTeamStore.membership` reads with one
pipelined round trip and decides in the pure function :func:`compute_membership`. Malformed data
raises :class:`CareTeamDataError`; it is never read as "member" (callers fail closed).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

import orjson
import redis

from dpiguard.storage.bus import events_channel, format_event

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


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
class _Window:
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


# --------------------------------------------------------------------------- validation helpers


def _check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}: expected 1-64 characters among A-Z a-z 0-9 . _ -")
    return value


def _check_unit(value: Any) -> str:
    return _check_id(value, "unit").upper()


def _check_time(value: Any, what: str, *, optional: bool) -> float | None:
    if value is None:
        if optional:
            return None
        raise ValueError(f"{what} is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"invalid {what} {value!r}: expected epoch seconds")
    return value


def _check_window(start: float | None, end: float | None) -> None:
    if start is not None and end is not None and start > end:
        raise ValueError(f"start ({start}) is after end ({end})")


def _now(now: float | None) -> float:
    """``now`` validated, or the current epoch time when None."""
    return time.time() if now is None else _check_time(now, "now", optional=False)


def _fmt_time(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- parsing stored data


def _parse_time(raw: Any, what: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise CareTeamDataError(f"{what}: bad time {raw!r}")
    return raw


def parse_unit_window(raw: Any, unit: str = "?") -> _Window:
    """Parse a ``FROM|TO`` membership value (empty = open)."""
    text = _text(raw)
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
    return _Window(bounds[0], bounds[1])


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
    if not isinstance(unit, str) or not _ID_RE.fullmatch(unit):
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
    if not isinstance(kind, str) or not _ID_RE.fullmatch(kind):
        raise CareTeamDataError(f"{what}: bad kind {kind!r}")
    return {"kind": kind, "start": _parse_time(data.get("start"), what),
            "end": _parse_time(data.get("end"), what)}


def _stay_window(stay: dict, grace: float) -> _Window:
    end = stay["end"]
    return _Window(stay["start"], None if end is None else end + grace)


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
    units = {_text(u).upper(): parse_unit_window(v, _text(u)) for u, v in user_units.items()}
    parsed_stays = sorted(
        ((_text(sid), parse_stay(raw, _text(sid))) for sid, raw in stays.items()),
        key=lambda item: (item[1]["start"], item[0]),
    )
    parsed_assignment = None if assignment is None else parse_assignment(assignment)

    boundaries: list[float] = []
    source = None
    if parsed_assignment is not None:
        window = _Window(parsed_assignment["start"], parsed_assignment["end"])
        boundaries += window.changes(now)
        if window.contains(now):
            source = f"assignment:{parsed_assignment['kind']}"
    for stay_id, stay in parsed_stays:
        unit_window = units.get(stay["unit"])
        if unit_window is None:
            continue  # only a write (membership) could make this stay count
        stay_window = _stay_window(stay, grace)
        boundaries += stay_window.changes(now) + unit_window.changes(now)
        if source is None and stay_window.contains(now) and unit_window.contains(now):
            source = f"unit:{stay['unit']} stay:{stay_id}"

    if transversal and category is not None:
        for unit, unit_window in sorted(units.items()):
            rule = transversal.get(unit)
            if rule is None or category not in rule.categories:
                continue
            boundaries += unit_window.changes(now)
            in_scope = rule.scope == "any_patient"
            for stay_id, stay in parsed_stays:
                window = _Window(stay["start"], stay["end"]) if rule.scope == "open_stay_anywhere" \
                    else _stay_window(stay, grace)
                if rule.scope != "any_patient":
                    boundaries += window.changes(now)
                    in_scope = in_scope or window.contains(now)
            if source is None and in_scope and unit_window.contains(now):
                source = f"transversal:{unit} {rule.scope}"

    valid_until = min(boundaries) if boundaries else None
    if source is None:
        return Membership(False, "none", valid_until)
    return Membership(True, source, valid_until)


# --------------------------------------------------------------------------- the store


class CareTeamStore:
    """Reads and writes care-team data; see the module docstring for the model and key layout."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "dpiguard", grace_seconds: float = 0,
                 transversal: Mapping[str, Any] | None = None):
        if _check_time(grace_seconds, "grace_seconds", optional=False) < 0:
            raise ValueError("grace_seconds must not be negative")
        self.redis = redis_client
        self.prefix = prefix
        self.grace = grace_seconds
        self.transversal = dict(transversal or {})  # unit → TransversalUnit (policies/careteam.yaml)
        self.channel = events_channel(prefix)

    # ----------------------------------------------------------------- keys

    def key_user_units(self, login: str) -> str:
        return f"{self.prefix}:ct:user-units:{{{login}}}"

    def key_unit_members(self, unit: str) -> str:
        return f"{self.prefix}:ct:unit-members:{unit}"

    def key_stays(self, patient: str) -> str:
        return f"{self.prefix}:ct:stays:{{{patient}}}"

    def key_unit_patients(self, unit: str) -> str:
        return f"{self.prefix}:ct:unit-patients:{unit}"

    def key_assign(self, patient: str) -> str:
        return f"{self.prefix}:ct:assign:{{{patient}}}"

    def key_user_assign(self, login: str) -> str:
        return f"{self.prefix}:ct:user-assign:{{{login}}}"

    # ----------------------------------------------------------------- writes: memberships

    def add_unit_member(self, login: str, unit: str, start: float | None = None,
                        end: float | None = None) -> None:
        """Make ``login`` a member of ``unit`` (replaces an existing membership window)."""
        login, unit = _check_id(login, "login"), _check_unit(unit)
        start = _check_time(start, "start", optional=True)
        end = _check_time(end, "end", optional=True)
        _check_window(start, end)
        self.redis.sadd(self.key_unit_members(unit), login)  # index first
        self.redis.hset(self.key_user_units(login), unit, f"{_fmt_time(start)}|{_fmt_time(end)}")
        self._publish(("user", login))

    def remove_unit_member(self, login: str, unit: str) -> bool:
        """End ``login``'s membership of ``unit``; returns whether one existed."""
        login, unit = _check_id(login, "login"), _check_unit(unit)
        removed = self.redis.hdel(self.key_user_units(login), unit)
        self.redis.srem(self.key_unit_members(unit), login)  # index last
        self._publish(("user", login))
        return bool(removed)

    # ----------------------------------------------------------------- writes: stays

    def add_stay(self, patient: str, unit: str, start: float, end: float | None = None,
                 stay_id: str | None = None) -> str:
        """Record (or replace, same ``stay_id``) a stay; returns the stay id."""
        patient, unit = _check_id(patient, "patient"), _check_unit(unit)
        start = _check_time(start, "start", optional=False)
        end = _check_time(end, "end", optional=True)
        _check_window(start, end)
        stay_id = f"S{uuid.uuid4().hex[:16]}" if stay_id is None else _check_id(stay_id, "stay id")
        value = orjson.dumps({"unit": unit, "start": start, "end": end})
        stays_key = self.key_stays(patient)
        release: list[str] = []

        def write(pipe: redis.client.Pipeline) -> None:
            stays = pipe.hgetall(stays_key)
            release[:] = [u for u in [self._unit_to_release(stays, stay_id, keep_unit=unit)] if u]
            pipe.multi()
            pipe.hset(stays_key, stay_id, value)

        self.redis.sadd(self.key_unit_patients(unit), patient)  # index first
        self.redis.transaction(write, stays_key)
        self._release_units(patient, release)
        self._publish(("patient", patient))
        return stay_id

    def end_stay(self, patient: str, stay_id: str, end: float) -> None:
        """Set the end of an existing stay (KeyError if there is no such stay)."""
        patient, stay_id = _check_id(patient, "patient"), _check_id(stay_id, "stay id")
        end = _check_time(end, "end", optional=False)
        stays_key = self.key_stays(patient)

        def write(pipe: redis.client.Pipeline) -> None:
            raw = pipe.hget(stays_key, stay_id)
            if raw is None:
                raise KeyError(f"patient {patient} has no stay {stay_id}")
            stay = parse_stay(raw, stay_id)
            _check_window(stay["start"], end)
            stay["end"] = end
            pipe.multi()
            pipe.hset(stays_key, stay_id, orjson.dumps(stay))

        self.redis.transaction(write, stays_key)
        self._publish(("patient", patient))

    def remove_stay(self, patient: str, stay_id: str) -> None:
        """Delete a stay (KeyError if there is no such stay)."""
        patient, stay_id = _check_id(patient, "patient"), _check_id(stay_id, "stay id")
        stays_key = self.key_stays(patient)

        def write(pipe: redis.client.Pipeline) -> None:
            stays = pipe.hgetall(stays_key)
            if not any(_text(sid) == stay_id for sid in stays):
                raise KeyError(f"patient {patient} has no stay {stay_id}")
            release[:] = [u for u in [self._unit_to_release(stays, stay_id, keep_unit=None)] if u]
            pipe.multi()
            pipe.hdel(stays_key, stay_id)

        release: list[str] = []
        self.redis.transaction(write, stays_key)
        self._release_units(patient, release)
        self._publish(("patient", patient))

    def _release_units(self, patient: str, units: list[str]) -> None:
        """Remove ``patient`` from the ``unit-patients`` index of ``units`` after the stays were
        written, then re-add it where a stay written meanwhile (another writer) still needs it."""
        if not units:
            return
        for unit in units:
            self.redis.srem(self.key_unit_patients(unit), patient)
        try:
            still = {parse_stay(raw, _text(sid))["unit"]
                     for sid, raw in self.redis.hgetall(self.key_stays(patient)).items()}
        except CareTeamDataError:
            still = set(units)  # cannot tell: keep the (possibly stale) entries
        for unit in units:
            if unit in still:
                self.redis.sadd(self.key_unit_patients(unit), patient)

    @staticmethod
    def _unit_to_release(stays: Mapping[Any, Any], stay_id: str, keep_unit: str | None) -> str | None:
        """Unit whose ``unit-patients`` set should lose the patient once ``stay_id`` is replaced
        (by a stay in ``keep_unit``) or removed; None if no other stay keeps it there or if the data
        is too broken to tell (a stale index entry is harmless, a missing one is not)."""
        by_id = {_text(sid): raw for sid, raw in stays.items()}
        if stay_id not in by_id:
            return None
        try:
            old_unit = parse_stay(by_id[stay_id], stay_id)["unit"]
            other_units = {parse_stay(raw, sid)["unit"] for sid, raw in by_id.items() if sid != stay_id}
        except CareTeamDataError:
            return None
        if old_unit == keep_unit or old_unit in other_units:
            return None
        return old_unit

    # ----------------------------------------------------------------- writes: assignments

    def assign(self, login: str, patient: str, kind: str = "assigned", start: float | None = None,
               end: float | None = None) -> None:
        """Explicitly put ``login`` in ``patient``'s care team (replaces an existing assignment)."""
        login, patient = _check_id(login, "login"), _check_id(patient, "patient")
        kind = _check_id(kind, "assignment kind")
        start = _check_time(start, "start", optional=True)
        end = _check_time(end, "end", optional=True)
        _check_window(start, end)
        self.redis.sadd(self.key_user_assign(login), patient)  # index first
        self.redis.hset(self.key_assign(patient), login, orjson.dumps({"kind": kind, "start": start, "end": end}))
        self._publish(("patient", patient), ("user", login))

    def unassign(self, login: str, patient: str) -> bool:
        """Remove an explicit assignment; returns whether one existed."""
        login, patient = _check_id(login, "login"), _check_id(patient, "patient")
        removed = self.redis.hdel(self.key_assign(patient), login)
        self.redis.srem(self.key_user_assign(login), patient)  # index last
        self._publish(("patient", patient), ("user", login))
        return bool(removed)

    def _publish(self, *events: tuple[str, str]) -> None:
        """Publish invalidations after the write committed (errors propagate to the caller).
        One PUBLISH per event: Redis Cluster refuses PUBLISH inside a pipeline."""
        for kind, ident in [(k, i) for k, i in events if format_event(k, i)]:
            self.redis.publish(self.channel, format_event(kind, ident))

    # ----------------------------------------------------------------- reads

    def membership(self, login: str, patient: str, now: float | None = None,
                   category: str | None = None) -> Membership:
        """Is ``login`` in ``patient``'s care team at ``now`` (for data of ``category``, which
        matters for transversal units)? One pipelined round trip."""
        return self.membership_and_units(login, patient, now, category)[0]

    def membership_and_units(self, login: str, patient: str, now: float | None = None,
                             category: str | None = None) -> tuple[Membership, list[str]]:
        """:meth:`membership`, and the units ``login`` is a member of at ``now`` (as :meth:`user_units`),
        from the same round trip: the user's units hash is read for the decision anyway. On Redis
        Cluster, one round trip per node holding the keys (a non-transactional pipeline, reads only)."""
        login, patient = _check_id(login, "login"), _check_id(patient, "patient")
        now = _now(now)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.key_user_units(login))
        pipe.hgetall(self.key_stays(patient))
        pipe.hget(self.key_assign(patient), login)
        user_units, stays, assignment = pipe.execute()
        membership = compute_membership(user_units, stays, assignment, now, self.grace, category, self.transversal)
        units = sorted(_text(u).upper() for u, raw in user_units.items()
                       if parse_unit_window(raw, _text(u)).contains(now))
        return membership, units

    def user_units(self, login: str, now: float | None = None) -> list[str]:
        """Units ``login`` is a member of at ``now`` (sorted)."""
        login = _check_id(login, "login")
        return [u["unit"] for u in self._user_unit_rows(login, _now(now)) if u["active"]]

    def patient_stays(self, patient: str) -> list[dict]:
        """All stays of ``patient``: ``{"id", "unit", "start", "end"}`` sorted by start."""
        raw = self.redis.hgetall(self.key_stays(_check_id(patient, "patient")))
        rows = [{"id": _text(sid), **parse_stay(value, _text(sid))} for sid, value in raw.items()]
        return sorted(rows, key=lambda row: (row["start"], row["id"]))

    def explain_patient(self, patient: str, now: float | None = None) -> dict:
        """Stays, assignments and, per stay unit, its members (for ``careteam show``)."""
        patient, now = _check_id(patient, "patient"), _now(now)
        stays = [{**stay, "active": _stay_window(stay, self.grace).contains(now)}
                 for stay in self.patient_stays(patient)]
        assignments = []
        for login, raw in sorted(self.redis.hgetall(self.key_assign(patient)).items()):
            login = _text(login)
            data = parse_assignment(raw, login)
            active = _Window(data["start"], data["end"]).contains(now)
            assignments.append({"login": login, **data, "active": active})
        units = sorted({stay["unit"] for stay in stays})
        transversal = {}
        for unit, rule in sorted(self.transversal.items()):
            windows = [_Window(s["start"], s["end"]) if rule.scope == "open_stay_anywhere"
                       else _stay_window(s, self.grace) for s in stays]
            if rule.scope == "any_patient" or any(w.contains(now) for w in windows):
                transversal[unit] = {"categories": sorted(rule.categories), "patients": rule.scope,
                                     "members": self._unit_member_rows(unit, now)}
        return {
            "patient": patient,
            "now": now,
            "grace_seconds": self.grace,
            "stays": stays,
            "assignments": assignments,
            "unit_members": {unit: self._unit_member_rows(unit, now) for unit in units},
            "transversal_units": transversal,
        }

    def explain_user(self, login: str, now: float | None = None) -> dict:
        """Units, assigned patients and patients currently staying in the user's units."""
        login, now = _check_id(login, "login"), _now(now)
        units = self._user_unit_rows(login, now)
        assigned = sorted(_text(p) for p in self.redis.smembers(self.key_user_assign(login)))
        pipe = self.redis.pipeline(transaction=False)
        for patient in assigned:
            pipe.hget(self.key_assign(patient), login)
        assignments = []
        for patient, raw in zip(assigned, pipe.execute()):
            if raw is None:
                continue  # index entry without assignment: not assigned
            data = parse_assignment(raw, login)
            active = _Window(data["start"], data["end"]).contains(now)
            assignments.append({"patient": patient, **data, "active": active})
        current = {row["unit"]: self._patients_staying(row["unit"], now) for row in units if row["active"]}
        transversal = {row["unit"]: {"categories": sorted(self.transversal[row["unit"]].categories),
                                     "patients": self.transversal[row["unit"]].scope}
                       for row in units if row["active"] and row["unit"] in self.transversal}
        return {
            "login": login,
            "now": now,
            "units": units,
            "assignments": assignments,
            "patients_in_units": current,
            "transversal_units": transversal,
        }

    def _user_unit_rows(self, login: str, now: float) -> list[dict]:
        rows = []
        for unit, raw in self.redis.hgetall(self.key_user_units(login)).items():
            unit = _text(unit).upper()
            window = parse_unit_window(raw, unit)
            rows.append({"unit": unit, "start": window.start, "end": window.end,
                         "active": window.contains(now)})
        return sorted(rows, key=lambda row: row["unit"])

    def _unit_member_rows(self, unit: str, now: float) -> list[dict]:
        logins = sorted(_text(m) for m in self.redis.smembers(self.key_unit_members(unit)))
        pipe = self.redis.pipeline(transaction=False)
        for login in logins:
            pipe.hget(self.key_user_units(login), unit)
        rows = []
        for login, raw in zip(logins, pipe.execute()):
            if raw is None:
                continue
            window = parse_unit_window(raw, unit)
            rows.append({"login": login, "start": window.start, "end": window.end,
                         "active": window.contains(now)})
        return rows

    def _patients_staying(self, unit: str, now: float) -> list[str]:
        patients = sorted(_text(p) for p in self.redis.smembers(self.key_unit_patients(unit)))
        pipe = self.redis.pipeline(transaction=False)
        for patient in patients:
            pipe.hgetall(self.key_stays(patient))
        staying = []
        for patient, stays in zip(patients, pipe.execute()):
            for sid, raw in stays.items():
                stay = parse_stay(raw, _text(sid))
                if stay["unit"] == unit and _stay_window(stay, self.grace).contains(now):
                    staying.append(patient)
                    break
        return staying
