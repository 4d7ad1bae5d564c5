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

import uuid
from typing import Any, Mapping

import orjson
import redis

from dpiguard.careteam.membership import (
    CareTeamDataError,
    Membership,
    Window,
    compute_membership,
    parse_assignment,
    parse_stay,
    parse_unit_window,
    stay_window,
)
from dpiguard.ids import check_id, check_unit
from dpiguard.storage.bus import format_event
from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys
from dpiguard.times import check_epoch, check_window, epoch_now, fmt_epoch

# --------------------------------------------------------------------------- the store


def release_unit_index(client: Any, keys: Keys, patient: str, units: list[str]) -> None:
    """Remove ``patient`` from the ``unit-patients`` index of ``units`` after its stays were written,
    then re-add it where a stay written meanwhile (another writer) still needs it."""
    if not units:
        return
    for unit in units:
        client.srem(keys.unit_patients(unit), patient)
    try:
        still = {parse_stay(raw, as_text(sid))["unit"] for sid, raw in client.hgetall(keys.stays(patient)).items()}
    except CareTeamDataError:
        still = set(units)  # cannot tell: keep the (possibly stale) entries
    for unit in units:
        if unit in still:
            client.sadd(keys.unit_patients(unit), patient)


class CareTeamStore:
    """Reads and writes care-team data; see the module docstring for the model and key layout."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "dpiguard", grace_seconds: float = 0,
                 transversal: Mapping[str, Any] | None = None):
        if check_epoch(grace_seconds, "grace_seconds", optional=False) < 0:
            raise ValueError("grace_seconds must not be negative")
        self.redis = redis_client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.grace = grace_seconds
        self.transversal = dict(transversal or {})  # unit → TransversalUnit (policies/careteam.yaml)
        self.channel = self.keys.events

    # ----------------------------------------------------------------- keys

    # ----------------------------------------------------------------- writes: memberships

    def add_unit_member(self, login: str, unit: str, start: float | None = None,
                        end: float | None = None) -> None:
        """Make ``login`` a member of ``unit`` (replaces an existing membership window)."""
        login, unit = check_id(login, "login"), check_unit(unit)
        start = check_epoch(start, "start", optional=True)
        end = check_epoch(end, "end", optional=True)
        check_window(start, end)
        self.redis.sadd(self.keys.unit_members(unit), login)  # index first
        self.redis.hset(self.keys.user_units(login), unit, f"{fmt_epoch(start)}|{fmt_epoch(end)}")
        self._publish(("user", login))

    def remove_unit_member(self, login: str, unit: str) -> bool:
        """End ``login``'s membership of ``unit``; returns whether one existed."""
        login, unit = check_id(login, "login"), check_unit(unit)
        removed = self.redis.hdel(self.keys.user_units(login), unit)
        self.redis.srem(self.keys.unit_members(unit), login)  # index last
        self._publish(("user", login))
        return bool(removed)

    # ----------------------------------------------------------------- writes: stays

    def add_stay(self, patient: str, unit: str, start: float, end: float | None = None,
                 stay_id: str | None = None) -> str:
        """Record (or replace, same ``stay_id``) a stay; returns the stay id."""
        patient, unit = check_id(patient, "patient"), check_unit(unit)
        start = check_epoch(start, "start", optional=False)
        end = check_epoch(end, "end", optional=True)
        check_window(start, end)
        stay_id = f"S{uuid.uuid4().hex[:16]}" if stay_id is None else check_id(stay_id, "stay id")
        value = orjson.dumps({"unit": unit, "start": start, "end": end})
        stays_key = self.keys.stays(patient)
        release: list[str] = []

        def write(pipe: redis.client.Pipeline) -> None:
            stays = pipe.hgetall(stays_key)
            release[:] = [u for u in [self.unit_to_release(stays, stay_id, keep_unit=unit)] if u]
            pipe.multi()
            pipe.hset(stays_key, stay_id, value)

        self.redis.sadd(self.keys.unit_patients(unit), patient)  # index first
        self.redis.transaction(write, stays_key)
        self.release_units(patient, release)
        self._publish(("patient", patient))
        return stay_id

    def end_stay(self, patient: str, stay_id: str, end: float) -> None:
        """Set the end of an existing stay (KeyError if there is no such stay)."""
        patient, stay_id = check_id(patient, "patient"), check_id(stay_id, "stay id")
        end = check_epoch(end, "end", optional=False)
        stays_key = self.keys.stays(patient)

        def write(pipe: redis.client.Pipeline) -> None:
            raw = pipe.hget(stays_key, stay_id)
            if raw is None:
                raise KeyError(f"patient {patient} has no stay {stay_id}")
            stay = parse_stay(raw, stay_id)
            check_window(stay["start"], end)
            stay["end"] = end
            pipe.multi()
            pipe.hset(stays_key, stay_id, orjson.dumps(stay))

        self.redis.transaction(write, stays_key)
        self._publish(("patient", patient))

    def remove_stay(self, patient: str, stay_id: str) -> None:
        """Delete a stay (KeyError if there is no such stay)."""
        patient, stay_id = check_id(patient, "patient"), check_id(stay_id, "stay id")
        stays_key = self.keys.stays(patient)

        def write(pipe: redis.client.Pipeline) -> None:
            stays = pipe.hgetall(stays_key)
            if not any(as_text(sid) == stay_id for sid in stays):
                raise KeyError(f"patient {patient} has no stay {stay_id}")
            release[:] = [u for u in [self.unit_to_release(stays, stay_id, keep_unit=None)] if u]
            pipe.multi()
            pipe.hdel(stays_key, stay_id)

        release: list[str] = []
        self.redis.transaction(write, stays_key)
        self.release_units(patient, release)
        self._publish(("patient", patient))

    def release_units(self, patient: str, units: list[str]) -> None:
        """:func:`release_unit_index` with this store's client and keys."""
        release_unit_index(self.redis, self.keys, patient, units)

    @staticmethod
    def unit_to_release(stays: Mapping[Any, Any], stay_id: str, keep_unit: str | None) -> str | None:
        """Unit whose ``unit-patients`` set should lose the patient once ``stay_id`` is replaced
        (by a stay in ``keep_unit``) or removed; None if no other stay keeps it there or if the data
        is too broken to tell (a stale index entry is harmless, a missing one is not)."""
        by_id = {as_text(sid): raw for sid, raw in stays.items()}
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
        login, patient = check_id(login, "login"), check_id(patient, "patient")
        kind = check_id(kind, "assignment kind")
        start = check_epoch(start, "start", optional=True)
        end = check_epoch(end, "end", optional=True)
        check_window(start, end)
        self.redis.sadd(self.keys.user_assignments(login), patient)  # index first
        self.redis.hset(self.keys.assignments(patient), login, orjson.dumps({"kind": kind, "start": start, "end": end}))
        self._publish(("patient", patient), ("user", login))

    def unassign(self, login: str, patient: str) -> bool:
        """Remove an explicit assignment; returns whether one existed."""
        login, patient = check_id(login, "login"), check_id(patient, "patient")
        removed = self.redis.hdel(self.keys.assignments(patient), login)
        self.redis.srem(self.keys.user_assignments(login), patient)  # index last
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
        login, patient = check_id(login, "login"), check_id(patient, "patient")
        now = epoch_now(now)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.user_units(login))
        pipe.hgetall(self.keys.stays(patient))
        pipe.hget(self.keys.assignments(patient), login)
        user_units, stays, assignment = pipe.execute()
        membership = compute_membership(user_units, stays, assignment, now, self.grace, category, self.transversal)
        units = sorted(as_text(u).upper() for u, raw in user_units.items()
                       if parse_unit_window(raw, as_text(u)).contains(now))
        return membership, units

    def user_units(self, login: str, now: float | None = None) -> list[str]:
        """Units ``login`` is a member of at ``now`` (sorted)."""
        login = check_id(login, "login")
        return [u["unit"] for u in self._user_unit_rows(login, epoch_now(now)) if u["active"]]

    def patient_stays(self, patient: str) -> list[dict]:
        """All stays of ``patient``: ``{"id", "unit", "start", "end"}`` sorted by start."""
        raw = self.redis.hgetall(self.keys.stays(check_id(patient, "patient")))
        rows = [{"id": as_text(sid), **parse_stay(value, as_text(sid))} for sid, value in raw.items()]
        return sorted(rows, key=lambda row: (row["start"], row["id"]))

    def explain_patient(self, patient: str, now: float | None = None) -> dict:
        """Stays, assignments and, per stay unit, its members (for ``careteam show``)."""
        patient, now = check_id(patient, "patient"), epoch_now(now)
        stays = [{**stay, "active": stay_window(stay, self.grace).contains(now)}
                 for stay in self.patient_stays(patient)]
        assignments = []
        for login, raw in sorted(self.redis.hgetall(self.keys.assignments(patient)).items()):
            login = as_text(login)
            data = parse_assignment(raw, login)
            active = Window(data["start"], data["end"]).contains(now)
            assignments.append({"login": login, **data, "active": active})
        units = sorted({stay["unit"] for stay in stays})
        transversal = {}
        for unit, rule in sorted(self.transversal.items()):
            windows = [Window(s["start"], s["end"]) if rule.scope == "open_stay_anywhere"
                       else stay_window(s, self.grace) for s in stays]
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
        login, now = check_id(login, "login"), epoch_now(now)
        units = self._user_unit_rows(login, now)
        assigned = sorted(as_text(p) for p in self.redis.smembers(self.keys.user_assignments(login)))
        pipe = self.redis.pipeline(transaction=False)
        for patient in assigned:
            pipe.hget(self.keys.assignments(patient), login)
        assignments = []
        for patient, raw in zip(assigned, pipe.execute()):
            if raw is None:
                continue  # index entry without assignment: not assigned
            data = parse_assignment(raw, login)
            active = Window(data["start"], data["end"]).contains(now)
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
        for unit, raw in self.redis.hgetall(self.keys.user_units(login)).items():
            unit = as_text(unit).upper()
            window = parse_unit_window(raw, unit)
            rows.append({"unit": unit, "start": window.start, "end": window.end,
                         "active": window.contains(now)})
        return sorted(rows, key=lambda row: row["unit"])

    def _unit_member_rows(self, unit: str, now: float) -> list[dict]:
        logins = sorted(as_text(m) for m in self.redis.smembers(self.keys.unit_members(unit)))
        pipe = self.redis.pipeline(transaction=False)
        for login in logins:
            pipe.hget(self.keys.user_units(login), unit)
        rows = []
        for login, raw in zip(logins, pipe.execute()):
            if raw is None:
                continue
            window = parse_unit_window(raw, unit)
            rows.append({"login": login, "start": window.start, "end": window.end,
                         "active": window.contains(now)})
        return rows

    def _patients_staying(self, unit: str, now: float) -> list[str]:
        patients = sorted(as_text(p) for p in self.redis.smembers(self.keys.unit_patients(unit)))
        pipe = self.redis.pipeline(transaction=False)
        for patient in patients:
            pipe.hgetall(self.keys.stays(patient))
        staying = []
        for patient, stays in zip(patients, pipe.execute()):
            for sid, raw in stays.items():
                stay = parse_stay(raw, as_text(sid))
                if stay["unit"] == unit and stay_window(stay, self.grace).contains(now):
                    staying.append(patient)
                    break
        return staying
