"""Applying patient movements (dpiguard/adt.py) to the care team in Redis: atomic, idempotent,
protected against messages that arrive out of order, journaled so the state can be rebuilt.

Model (see docs/careteam.md). A *visit* (venue, PV1-19) is a sequence of *segments*, one per unit the
patient went through; each segment is an ordinary care-team stay (``P:ct:stays:{PATIENT}``, stay id
``VISIT.N``), so the request path (careteam.compute_membership) needs nothing new:

- A01/A04 admit: segment 1 in the unit, open; A05 pre-admission: the visit exists, no segment (no
  access before the patient arrives);
- A02 transfer at T: the current segment ends at T (the old unit keeps access for the grace period
  after T), a new segment starts at T in the new unit (access at once). A transfer inside the same
  unit (bed change) changes nothing;
- A03 discharge at T: the current segment ends at T (grace period after T);
- A11 cancels the visit (its segments are deleted: an admission entered by mistake gives no grace),
  A12 deletes the last transfer's segment and reopens the previous one, A13 reopens the last segment;
- A21/A22 leave of absence: recorded on the visit, access unchanged (the patient keeps a bed);
- A08 update: a different PV1-3 on an open visit corrects the unit of the current segment;
- A40 merge: the visits and stays of MRG-1 move to PID-3.

Visit states live in ``P:ct:visits:{PATIENT}`` (hash visit id → orjson state; field ``!latest`` =
the visit used by messages without PV1-19).

Guarantees (on every Redis topology, Cluster included: each transaction stays in one patient's slot):

- **all or nothing**: one WATCH/MULTI transaction per message, on the keys of its patient
  (``{PATIENT}`` hash tag), writes the stays, the visit state, the duplicate marker and an *outbox*
  entry (``P:ct:outbox:{PATIENT}``); a concurrent change of the same patient retries the whole
  computation. What lives in other slots is done around it in the safe order: the unit index entries
  the movement needs are added *before* the transaction; *after* it, :meth:`MovementStore.finish_pending`
  finishes the outbox entry: an A40's merged-patient side, the unit index entries no longer needed
  (removed, then re-checked), the journal entry, ``patient:P`` on the bus. Every step is idempotent;
  if the process dies in between, the next message of that patient (or ``adt replay``) finishes it
  first, in order. Decisions read only the patient's stays, which the transaction wrote whole;
- **duplicates**: the control id (per sender) of an applied message is kept ``dedup_ttl`` seconds
  (``P:adt:seen:{PATIENT}:HASH``; the older ``P:adt:seen:HASH`` markers are still read until they
  expire); a repeat gets the first answer and changes nothing;
- **out of order**: a transfer or discharge older than the start of the visit's current segment is
  refused (AE), it never ends the current stay; an admission of a visit that exists is refused;
- **journal**: every applied movement is appended to the stream ``P:ct:journal`` (at least once, with
  an ``id``: a repeat is skipped when the journal is read);
  :meth:`MovementStore.replay` rebuilds every visit and its stays from it.

The decision itself is the pure function :func:`plan`.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import orjson
import redis

from dpiguard.careteam.adt import ERR_DUPLICATE_KEY, ERR_INTERNAL, ERR_UNKNOWN_KEY, AdtError, Movement
from dpiguard.careteam.membership import CareTeamDataError, parse_stay
from dpiguard.careteam.store import release_unit_index
from dpiguard.storage.batch import publish_each
from dpiguard.storage.bus import format_event
from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys

LATEST = "!latest"
ERR_STALE = "100"  # segment sequence error: the closest HL7 0357 code for "out of order"


def _refuse(code: str, message: str) -> AdtError:
    return AdtError("AE", code, message)



@dataclass
class Plan:
    """What one movement changes for one patient (``None`` values delete)."""

    patient: str
    visit: str
    summary: str
    stays: dict[str, dict | None] = field(default_factory=dict)
    visits: dict[str, dict | None] = field(default_factory=dict)
    latest: str | None = None
    # A40: the merged patient's changes (stays and visits to delete there).
    other_patient: str | None = None
    other_stays: dict[str, None] = field(default_factory=dict)
    other_visits: dict[str, None] = field(default_factory=dict)


def _fmt(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parse_visits(raw: Mapping[Any, Any]) -> tuple[dict[str, dict], str | None]:
    """HGETALL of the visits hash → ({visit id: state}, latest visit id)."""
    visits, latest = {}, None
    for k, v in raw.items():
        k = as_text(k)
        if k == LATEST:
            latest = as_text(v)
            continue
        try:
            state = orjson.loads(v)
        except orjson.JSONDecodeError:
            raise CareTeamDataError(f"visit {k}: invalid JSON") from None
        if not isinstance(state, dict) or "status" not in state or not isinstance(state.get("segments"), list):
            raise CareTeamDataError(f"visit {k}: malformed state")
        visits[k] = state
    return visits, latest


def parse_stays(raw: Mapping[Any, Any]) -> dict[str, dict]:
    return {as_text(k): parse_stay(v, as_text(k)) for k, v in raw.items()}


def plan(mv: Movement, visits: Mapping[str, dict], stays: Mapping[str, dict], latest: str | None,
         other: tuple[dict, dict] | None = None) -> Plan:
    """Pure: what ``mv`` changes, given the patient's visits and stays. Raises AdtError (AE) when
    the movement does not fit the current state (unknown visit, stale event, ...).

    ``other``: for A40, the (visits, stays) of the merged patient ``mv.prior_patient``."""
    t = mv.time
    if mv.trigger == "A40":
        return _plan_merge(mv, visits, stays, other or ({}, {}))
    creating = mv.trigger in ("A01", "A04", "A05")
    visit_id = mv.visit
    if visit_id is None:
        if creating:
            visit_id = f"X{int(t)}"  # no visit number: one per admission time (deterministic for replay)
        elif latest is None or latest not in visits:
            raise _refuse(ERR_UNKNOWN_KEY, f"patient {mv.patient} has no visit (and PV1-19 is empty)")
        else:
            visit_id = latest
    state = visits.get(visit_id)
    out = Plan(mv.patient, visit_id, "")

    def current_segment() -> tuple[str, dict]:
        sid = state["segments"][-1]
        stay = stays.get(sid)
        if stay is None:
            raise _refuse(ERR_INTERNAL, f"visit {visit_id}: segment {sid} has no stay (data damaged)")
        return sid, stay

    def put(new_state: dict) -> None:
        new_state["last"] = max(t, (state or {}).get("last", t))
        out.visits[visit_id] = new_state

    if creating:
        if state is not None and state["status"] not in ("cancelled",) and not (
                state["status"] == "preadmitted" and mv.trigger != "A05"):
            raise _refuse(ERR_DUPLICATE_KEY, f"visit {visit_id} of {mv.patient} already exists "
                                             f"({state['status']}); cancel it first")
        seq = (state or {}).get("seq", 0)
        new = {"status": "preadmitted", "class": mv.patient_class, "segments": [], "seq": seq,
               "transfers": [], "leave": False}
        if mv.trigger == "A05":
            new["expected"] = t
            out.summary = f"pre-admission of visit {visit_id}"
        else:
            sid = f"{visit_id}.{seq + 1}"
            new.update(status="open", segments=[sid], seq=seq + 1, admitted=t)
            out.stays[sid] = {"unit": mv.unit, "start": t, "end": None}
            out.summary = f"admitted to {mv.unit} at {_fmt(t)} (visit {visit_id})"
        put(new)
        out.latest = visit_id
        return out

    if state is None or state["status"] == "cancelled":
        raise _refuse(ERR_UNKNOWN_KEY, f"patient {mv.patient} has no visit {visit_id}")
    status = state["status"]
    new = {**state, "segments": list(state["segments"]), "transfers": list(state.get("transfers", []))}

    if mv.trigger == "A02":
        if status != "open":
            raise _refuse(ERR_STALE, f"visit {visit_id} is {status}: no transfer possible")
        sid, stay = current_segment()
        if t < stay["start"]:
            raise _refuse(ERR_STALE, f"out of order: transfer at {_fmt(t)} is older than the current "
                                     f"stay in {stay['unit']} (since {_fmt(stay['start'])})")
        if mv.unit == stay["unit"]:
            new["transfers"].append({"t": t, "segment": None})
            out.summary = f"moved inside {stay['unit']} (no care-team change)"
        else:
            new_sid = f"{visit_id}.{state['seq'] + 1}"
            new["seq"] = state["seq"] + 1
            new["segments"].append(new_sid)
            new["transfers"].append({"t": t, "segment": new_sid})
            out.stays[sid] = {**stay, "end": t}
            out.stays[new_sid] = {"unit": mv.unit, "start": t, "end": None}
            out.summary = f"transferred from {stay['unit']} to {mv.unit} at {_fmt(t)}"
    elif mv.trigger == "A03":
        if status != "open":
            raise _refuse(ERR_STALE, f"visit {visit_id} is {status}: cannot discharge")
        sid, stay = current_segment()
        if t < stay["start"]:
            raise _refuse(ERR_STALE, f"out of order: discharge at {_fmt(t)} is older than the current "
                                     f"stay in {stay['unit']} (since {_fmt(stay['start'])}); not applied")
        out.stays[sid] = {**stay, "end": t}
        new.update(status="discharged", discharged=t)
        out.summary = f"discharged from {stay['unit']} at {_fmt(t)}"
    elif mv.trigger == "A11":
        if status not in ("open", "preadmitted"):
            raise _refuse(ERR_STALE, f"visit {visit_id} is {status}: cancel the discharge (A13) first")
        for sid in state["segments"]:
            out.stays[sid] = None
        new.update(status="cancelled", segments=[], transfers=[], leave=False)
        out.summary = f"admission of visit {visit_id} cancelled"
    elif mv.trigger == "A12":
        if status != "open" or not new["transfers"]:
            raise _refuse(ERR_STALE, f"visit {visit_id} has no transfer to cancel" +
                          ("" if status == "open" else f" (it is {status})"))
        last = new["transfers"].pop()
        if last["segment"] is None:
            out.summary = "bed change cancelled (no care-team change)"
        else:
            if new["segments"][-1] != last["segment"] or len(new["segments"]) < 2:
                raise _refuse(ERR_INTERNAL, f"visit {visit_id}: transfer history damaged")
            removed = new["segments"].pop()
            previous = new["segments"][-1]
            prev_stay = stays.get(previous)
            if prev_stay is None:
                raise _refuse(ERR_INTERNAL, f"visit {visit_id}: segment {previous} has no stay")
            out.stays[removed] = None
            out.stays[previous] = {**prev_stay, "end": None}
            out.summary = f"transfer cancelled: back in {prev_stay['unit']}"
    elif mv.trigger == "A13":
        if status != "discharged":
            raise _refuse(ERR_STALE, f"visit {visit_id} is {status}: no discharge to cancel")
        sid, stay = current_segment()
        out.stays[sid] = {**stay, "end": None}
        new["status"] = "open"
        new.pop("discharged", None)
        out.summary = f"discharge cancelled: back in {stay['unit']}"
    elif mv.trigger in ("A21", "A22"):
        if status != "open":
            raise _refuse(ERR_STALE, f"visit {visit_id} is {status}: no leave of absence possible")
        leave = mv.trigger == "A21"
        if bool(state.get("leave")) == leave:
            raise _refuse(ERR_STALE, f"visit {visit_id} is already {'on' if leave else 'back from'} leave")
        new["leave"] = leave
        out.summary = ("leave of absence" if leave else "back from leave") + " (care team unchanged)"
    elif mv.trigger == "A08":
        out.summary = "patient data updated (no care-team change)"
        if mv.patient_class:
            new["class"] = mv.patient_class
        if status == "open" and mv.unit:
            sid, stay = current_segment()
            if stay["unit"] != mv.unit:
                out.stays[sid] = {**stay, "unit": mv.unit}
                out.summary = f"location corrected from {stay['unit']} to {mv.unit}"
    else:  # pragma: no cover - adt.parse_message only lets known triggers through
        raise _refuse(ERR_INTERNAL, f"unsupported event {mv.trigger}")
    put(new)
    return out


def _plan_merge(mv: Movement, visits, stays, other: tuple[dict, dict]) -> Plan:
    old_visits, old_stays = other
    out = Plan(mv.patient, "-", "")
    out.other_patient = mv.prior_patient
    clash = sorted(set(old_visits) & set(visits)) or sorted(set(old_stays) & set(stays))
    if clash:
        raise _refuse(ERR_DUPLICATE_KEY, f"merge: {mv.prior_patient} and {mv.patient} both have "
                                         f"visit/stay {clash[0]}")
    for vid, state in old_visits.items():
        out.visits[vid] = state
        out.other_visits[vid] = None
    for sid, stay in old_stays.items():
        out.stays[sid] = stay
        out.other_stays[sid] = None
    out.summary = (f"patient {mv.prior_patient} merged into {mv.patient} "
                   f"({len(old_visits)} visit(s), {len(old_stays)} stay(s) moved)")
    return out


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class MovementResult:
    """The answer to one message: ``ack`` AA/AE/AR, ``text`` for MSA-3/ERR-8, ``code`` HL7 0357."""

    ack: str
    text: str
    code: str | None = None
    duplicate: bool = False
    patient: str | None = None
    visit: str | None = None


class MovementStore:
    """Applies movements to Redis (see the module docstring)."""

    def __init__(self, redis_client: redis.Redis, prefix: str = "dpiguard", dedup_ttl: int = 7 * 86400):
        self.redis = redis_client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.dedup_ttl = int(dedup_ttl)
        self.channel = self.keys.events

    @staticmethod
    def _digest(mv: Movement) -> str:
        return hashlib.sha256(f"{mv.sender}\0{mv.control_id}".encode()).hexdigest()[:32]

    def seen_key(self, mv: Movement) -> str:
        """The duplicate marker, in the slot of the message's patient (PID-3)."""
        return self.keys.adt_seen(mv.patient, self._digest(mv))

    # ----------------------------------------------------------------- apply

    def apply(self, mv: Movement, *, journal: bool = True, dedup: bool = True) -> MovementResult:
        """Apply one movement (see the module docstring). AdtError (AE) for a refusal; Redis errors
        propagate (the message was then not applied, or applied and finished by the next message or
        ``adt replay`` of that patient: a resend gets the first answer)."""
        patients = [mv.patient] + ([mv.prior_patient] if mv.trigger == "A40" and mv.prior_patient else [])
        for patient in reversed(patients):  # what an interrupted apply left to do, in order (an A40's
            self.finish_pending(patient)     # merged patient first: its movements came before the merge)
        if dedup:
            first = self._first_answer(self.redis.get(self.keys.adt_seen_legacy(self._digest(mv))))
            if first is not None:  # marker written before the key moved to the patient's slot
                return self._duplicate(mv, first)
        vkey, skey, okey = self.keys.visits(mv.patient), self.keys.stays(mv.patient), self.keys.adt_outbox(mv.patient)
        seen_key = self.seen_key(mv)
        watched = [vkey, skey, okey] + ([seen_key] if dedup else [])
        entry: dict = {}

        def transaction(pipe: redis.client.Pipeline) -> MovementResult:
            if dedup:
                first = self._first_answer(pipe.get(seen_key))
                if first is not None:
                    return self._duplicate(mv, first)
            visits, latest = parse_visits(pipe.hgetall(vkey))
            stays = parse_stays(pipe.hgetall(skey))
            other = None
            if len(patients) == 2:  # another slot: read, not watched (the merge step re-checks it)
                other_visits, _ = parse_visits(self.redis.hgetall(self.keys.visits(patients[1])))
                other = (other_visits, parse_stays(self.redis.hgetall(self.keys.stays(patients[1]))))
            p = plan(mv, visits, stays, latest, other)
            added, removed = _unit_changes(stays, p.stays)
            for unit in added:  # the unit index first (another slot)
                self.redis.sadd(self.keys.unit_patients(unit), mv.patient)
            entry.clear()
            entry.update({"id": uuid.uuid4().hex, "patient": mv.patient, "summary": p.summary,
                          "applied": time.time(), "release": removed,
                          "mv": mv.to_dict() if journal else None,
                          "merge": None if p.other_patient is None else {
                              "patient": p.other_patient, "stays": sorted(p.other_stays),
                              "visits": sorted(p.other_visits)}})
            pipe.multi()
            _queue_hash_changes(pipe, skey, p.stays)
            _queue_hash_changes(pipe, vkey, p.visits)
            if p.latest is not None:
                pipe.hset(vkey, LATEST, p.latest)
            if dedup:
                pipe.set(seen_key, orjson.dumps({"text": p.summary, "visit": p.visit}), ex=self.dedup_ttl)
            pipe.rpush(okey, orjson.dumps(entry))
            return MovementResult("AA", p.summary, patient=mv.patient, visit=p.visit)

        result = self.redis.transaction(transaction, *watched, value_from_callable=True)
        if not result.duplicate:
            self.finish_pending(mv.patient)
        return result

    @staticmethod
    def _first_answer(raw: Any) -> dict | None:
        return None if raw is None else orjson.loads(raw)

    @staticmethod
    def _duplicate(mv: Movement, first: dict) -> MovementResult:
        return MovementResult("AA", f"duplicate of an applied message: {first.get('text', '')}"[:200],
                              duplicate=True, patient=mv.patient, visit=first.get("visit"))

    def finish_pending(self, patient: str) -> int:
        """Finish, in order, the movements of ``patient`` committed but not yet finished (the outbox
        ``P:ct:outbox:{PATIENT}``): the merged patient's side of an A40, the unit index entries the
        movement freed, the journal entry, the invalidation. Every step is idempotent, so finishing an
        entry twice (two writers, or a crash after a step) changes nothing more; a journal entry written
        twice has the same ``id`` and :meth:`journal` yields it once. Returns the entries finished."""
        okey = self.keys.adt_outbox(patient)
        done = 0
        for raw in self.redis.lrange(okey, 0, -1):
            entry = orjson.loads(raw)
            merge = entry.get("merge")
            if merge:
                self._merge_away(merge["patient"], merge["stays"], merge["visits"])
            release_unit_index(self.redis, self.keys, patient, entry.get("release") or [])
            if entry.get("mv") is not None:
                self.redis.xadd(self.keys.journal, {"mv": orjson.dumps(entry["mv"]), "summary": entry["summary"],
                                                    "applied": repr(entry["applied"]), "id": entry["id"]})
            events = [format_event("patient", patient)] + ([format_event("patient", merge["patient"])] if merge else [])
            publish_each(self.redis, self.channel, events)
            self.redis.lrem(okey, 1, raw)
            done += 1
        return done

    def _merge_away(self, patient: str, stay_ids: list[str], visit_ids: list[str]) -> None:
        """A40, the merged patient's side: its moved stays and visits are deleted (they are already
        in the surviving patient's keys), then the unit index entries they held are released."""
        skey, vkey = self.keys.stays(patient), self.keys.visits(patient)

        def transaction(pipe) -> list[str]:
            before = parse_stays(pipe.hgetall(skey))
            after = {k: v for k, v in before.items() if k not in stay_ids}
            pipe.multi()
            if stay_ids:
                pipe.hdel(skey, *stay_ids)
            pipe.hdel(vkey, LATEST, *visit_ids)
            return sorted({st["unit"] for st in before.values()} - {st["unit"] for st in after.values()})

        freed = self.redis.transaction(transaction, skey, vkey, value_from_callable=True)
        release_unit_index(self.redis, self.keys, patient, freed)

    # ----------------------------------------------------------------- reads

    def visits(self, patient: str) -> dict:
        visits, latest = parse_visits(self.redis.hgetall(self.keys.visits(patient)))
        return {"latest": latest, "visits": visits}

    def journal(self, count: int = 1000) -> Iterable[tuple[str, Movement]]:
        """Every journal entry, oldest first: (entry id, movement)."""
        start = "-"
        seen: set[str] = set()
        while True:
            batch = self.redis.xrange(self.keys.journal, min=start, count=count)
            for entry_id, fields in batch:
                ident = as_text(fields.get(b"id") or fields.get("id"))
                if ident is not None:
                    if ident in seen:
                        continue  # written twice by two writers finishing the same movement
                    seen.add(ident)
                data = fields.get(b"mv") or fields.get("mv")
                yield as_text(entry_id), Movement.from_dict(orjson.loads(data))
            if len(batch) < count:
                return
            start = "(" + as_text(batch[-1][0])

    # ----------------------------------------------------------------- replay

    def replay(self, *, dry_run: bool = False, progress: Callable[[str], None] | None = None) -> dict:
        """Rebuild every visit and its stays from the journal.

        Stays that do not belong to a visit (``careteam stay-add``) are kept. Returns counts and the
        patients whose state differed from the rebuilt one. With ``dry_run`` nothing is written."""
        if not dry_run:  # movements committed but not finished (a crash) go into the journal first
            for key in self.redis.scan_iter(match=self.keys.adt_outbox_pattern, count=1000):
                self.finish_pending(as_text(key).split(":ct:outbox:", 1)[1].strip("{}"))
        sim_visits: dict[str, dict] = {}
        sim_stays: dict[str, dict] = {}
        sim_latest: dict[str, str | None] = {}
        entries = refused = 0
        for entry_id, mv in self.journal():
            entries += 1
            patients = [mv.patient] + ([mv.prior_patient] if mv.trigger == "A40" and mv.prior_patient else [])
            for p in patients:
                sim_visits.setdefault(p, {})
                sim_stays.setdefault(p, {})
            other = (sim_visits[patients[1]], sim_stays[patients[1]]) if len(patients) == 2 else None
            try:
                p = plan(mv, sim_visits[mv.patient], sim_stays[mv.patient], sim_latest.get(mv.patient), other)
            except AdtError as exc:
                refused += 1
                if progress:
                    progress(f"journal entry {entry_id} ({mv.trigger} {mv.patient}) no longer applies: {exc}")
                continue
            _merge_changes(sim_stays[mv.patient], p.stays)
            _merge_changes(sim_visits[mv.patient], p.visits)
            if p.latest is not None:
                sim_latest[mv.patient] = p.latest
            if p.other_patient is not None:
                _merge_changes(sim_stays[p.other_patient], p.other_stays)
                _merge_changes(sim_visits[p.other_patient], p.other_visits)
                sim_latest.pop(p.other_patient, None)
        # Patients with a visit state in Redis but none in the journal lose it too.
        for key in self.redis.scan_iter(match=self.keys.visits_pattern, count=1000):
            patient = as_text(key).split(":ct:visits:", 1)[1].strip("{}")
            sim_visits.setdefault(patient, {})
            sim_stays.setdefault(patient, {})
        changed = []
        for patient in sorted(sim_visits):
            if self._replace_patient(patient, sim_visits[patient], sim_stays[patient],
                                     sim_latest.get(patient), dry_run):
                changed.append(patient)
        return {"entries": entries, "refused": refused, "patients": len(sim_visits), "changed": changed,
                "dry_run": dry_run}

    def _replace_patient(self, patient: str, visits: dict, stays: dict, latest: str | None,
                         dry_run: bool) -> bool:
        vkey, skey = self.keys.visits(patient), self.keys.stays(patient)
        freed: list[str] = []

        def transaction(pipe) -> bool:
            cur_visits, cur_latest = parse_visits(pipe.hgetall(vkey))
            cur_stays = parse_stays(pipe.hgetall(skey))
            owned = {sid for st in cur_visits.values() for sid in st["segments"]}
            owned |= {sid for st in visits.values() for sid in st["segments"]}
            current_owned = {k: v for k, v in cur_stays.items() if k in owned}
            same = (cur_visits == visits and current_owned == stays and cur_latest == latest)
            if same or dry_run:
                return not same
            changes: dict[str, dict | None] = {sid: None for sid in current_owned}
            changes.update(stays)
            added, removed = _unit_changes(cur_stays, changes)
            for unit in added:  # the unit index first (another slot)
                self.redis.sadd(self.keys.unit_patients(unit), patient)
            freed[:] = removed
            pipe.multi()
            if latest is None:
                pipe.hdel(vkey, LATEST)
            _queue_hash_changes(pipe, skey, changes)
            _queue_hash_changes(pipe, vkey, {**{v: None for v in cur_visits}, **visits})
            if latest is not None:
                pipe.hset(vkey, LATEST, latest)
            return True

        changed = self.redis.transaction(transaction, vkey, skey, value_from_callable=True)
        if changed and not dry_run:
            release_unit_index(self.redis, self.keys, patient, freed)
            publish_each(self.redis, self.channel, [format_event("patient", patient)])
        return changed


def _unit_changes(before: Mapping[str, dict], changes: Mapping[str, dict | None]) -> tuple[list[str], list[str]]:
    """Units a patient enters and leaves (the ``unit-patients`` index) when ``changes`` are applied."""
    after = {k: v for k, v in {**before, **changes}.items() if v is not None}
    old_units = {st["unit"] for st in before.values()}
    new_units = {st["unit"] for st in after.values()}
    return sorted(new_units - old_units), sorted(old_units - new_units)


def _queue_hash_changes(pipe, key: str, changes: Mapping[str, dict | None]) -> None:
    sets = {k: orjson.dumps(v) for k, v in changes.items() if v is not None}
    dels = [k for k, v in changes.items() if v is None]
    if sets:
        pipe.hset(key, mapping=sets)
    if dels:
        pipe.hdel(key, *dels)


def _merge_changes(target: dict, changes: Mapping[str, Any]) -> None:
    for k, v in changes.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = v
