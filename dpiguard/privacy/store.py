"""The minimised demographics in Redis: patients (learnt from ADT and FHIR), staff (imported), VIP list.

Keys (``P`` = prefix; docs/privacy.md has the table and the retention):

- ``P:pv:patient:{PATIENT}`` hash: ``family``, ``addresses``, ``streets``, ``identity`` (space-separated
  keyed hashes), ``flags`` (``vip``, ``confidential``, ``staff`` from the feeds), ``staff`` (logins this
  patient is), ``seen`` (epoch). Expires ``retention_days`` after the last time the patient was seen.
- ``P:pv:staff:{LOGIN}`` hash: the same hashes for a staff member, ``patients`` (patient ids that are this
  person), ``imported``. Expires ``staff_retention_days`` after the last import that listed the login.
- ``P:pv:vip:{PATIENT}`` string ``LEVEL|SOURCE|SINCE``: the RSSI's list; no expiry (removed by hand).
- ``P:pv:ident:TOKEN`` set of ``p:PATIENT`` / ``s:LOGIN``: who carries an identity hash (staff ↔ patient
  matching); same expiry as the hashes it indexes.
- ``P:pv:names`` hash family-name hash → number of patients carrying it; ``P:pv:patients`` counter.

Every write that changes what a decision could read (flags, family, address hashes, links) publishes
``patient:P`` or ``user:U`` on the invalidation bus, so decision caches follow at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Mapping

import redis

from dpiguard.ids import check_id
from dpiguard.privacy.pseudonyms import Pseudonyms
from dpiguard.storage.bus import format_event
from dpiguard.storage.clients import as_text
from dpiguard.storage.keys import Keys

VIP_LEVELS = ("vip", "confidential")
DAY = 86400


@dataclass(frozen=True)
class Profile:
    """What the detectors know of a person (patient or staff member): hashes and links, no clear text."""

    pseudonyms: Pseudonyms
    links: frozenset[str] = frozenset()  # patient → staff logins; staff → patient ids
    vip: str | None = None  # patients: "vip" / "confidential" (list or feed)

    @property
    def empty(self) -> bool:
        p = self.pseudonyms
        return not (p.family or p.addresses or p.streets or self.links or self.vip)


def parse_patient(raw: Mapping, vip_raw) -> Profile:
    pseudo = Pseudonyms.from_fields(raw)
    links = frozenset((as_text(raw.get(b"staff") or raw.get("staff")) or "").split())
    vip = None
    if vip_raw:
        vip = as_text(vip_raw).split("|", 1)[0] or None
    if vip is None:
        vip = "confidential" if "confidential" in pseudo.flags else ("vip" if "vip" in pseudo.flags else None)
    return Profile(pseudo, links, vip)


def parse_staff(raw: Mapping) -> Profile:
    pseudo = Pseudonyms.from_fields(raw)
    links = frozenset((as_text(raw.get(b"patients") or raw.get("patients")) or "").split())
    return Profile(pseudo, links)


class PrivacyStore:
    def __init__(self, client: redis.Redis, prefix: str = "dpiguard", *, retention_days: float = 365,
                 staff_retention_days: float = 400):
        self.r = client
        self.keys = Keys(prefix)
        self.retention = int(retention_days * DAY)
        self.staff_retention = int(staff_retention_days * DAY)

    # -- patients (learnt) -------------------------------------------------------------------------
    def learn_patients(self, items: Iterable[tuple[str, Pseudonyms]], now: float | None = None) -> int:
        """Store what the feeds said about patients (one read and one write round trip per batch).
        Returns how many patients' decision-relevant data changed (each published ``patient:P``)."""
        now = time.time() if now is None else now
        merged: dict[str, Pseudonyms] = {}
        for patient, p in items:
            patient = check_id(patient, "patient")
            old = merged.get(patient)
            merged[patient] = p if old is None else _union(old, p)
        if not merged:
            return 0
        order = sorted(merged)
        pipe = self.r.pipeline(transaction=False)
        for patient in order:
            pipe.hgetall(self.keys.pv_patient(patient))
        current = pipe.execute()
        pipe = self.r.pipeline(transaction=False)
        changed = []
        new_patients = 0
        for patient, raw in zip(order, current):
            old = Pseudonyms.from_fields(raw)
            new = _refresh(old, merged[patient])
            key = self.keys.pv_patient(patient)
            if not raw:
                new_patients += 1
            for token in new.family - old.family:
                pipe.hincrby(self.keys.pv_name_counts, token, 1)
            for token in old.family - new.family:
                pipe.hincrby(self.keys.pv_name_counts, token, -1)
            for token in new.identity - old.identity:
                pipe.sadd(self.keys.pv_ident(token), f"p:{patient}")
                pipe.expire(self.keys.pv_ident(token), self.retention)
            pipe.hset(key, mapping={**new.fields(), "seen": str(int(now))})
            pipe.expire(key, self.retention)
            if new != old:
                changed.append(patient)
        if new_patients:
            pipe.incrby(self.keys.pv_patient_count, new_patients)
        pipe.execute()
        self._link_identities(order, merged)
        for patient in changed:
            self.r.publish(self.keys.events, format_event("patient", patient))
        return len(changed)

    def _link_identities(self, patients: list[str], merged: Mapping[str, Pseudonyms]) -> None:
        """A patient whose identity hash is a staff member's becomes linked to that login (both ways)."""
        pairs = [(p, t) for p in patients for t in merged[p].identity]
        if not pairs:
            return
        pipe = self.r.pipeline(transaction=False)
        for _, token in pairs:
            pipe.smembers(self.keys.pv_ident(token))
        for (patient, _), members in zip(pairs, pipe.execute()):
            for member in members:
                member = as_text(member)
                if member.startswith("s:"):
                    self.link(member[2:], patient)

    def patient(self, patient: str) -> Profile:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.keys.pv_patient(patient))
        pipe.get(self.keys.pv_vip(patient))
        raw, vip = pipe.execute()
        return parse_patient(raw, vip)

    def patients(self, ids: Iterable[str]) -> dict[str, Profile]:
        ids = list(ids)
        pipe = self.r.pipeline(transaction=False)
        for p in ids:
            pipe.hgetall(self.keys.pv_patient(p))
            pipe.get(self.keys.pv_vip(p))
        res = pipe.execute()
        return {p: parse_patient(res[2 * i], res[2 * i + 1]) for i, p in enumerate(ids)}

    def name_counts(self, tokens: Iterable[str]) -> tuple[dict[str, int], int]:
        """(patients per family-name hash, patients known): how common a name is here."""
        tokens = sorted(set(tokens))
        pipe = self.r.pipeline(transaction=False)
        pipe.get(self.keys.pv_patient_count)
        if tokens:
            pipe.hmget(self.keys.pv_name_counts, tokens)
        res = pipe.execute()
        total = int(res[0] or 0)
        counts = dict(zip(tokens, (int(c or 0) for c in res[1]))) if tokens else {}
        return counts, total

    # -- staff (imported) --------------------------------------------------------------------------
    def import_staff(self, login: str, p: Pseudonyms, patients: Iterable[str] = (), now: float | None = None) -> None:
        """Replace a staff member's hashes (from the HR file); explicit patient links are added."""
        login = check_id(login, "login")
        now = time.time() if now is None else now
        key = self.keys.pv_staff(login)
        old = self.staff(login)
        pipe = self.r.pipeline(transaction=False)
        for name in ("family", "addresses", "streets", "identity", "flags"):
            pipe.hdel(key, name)
        pipe.hset(key, mapping={**p.fields(), "imported": str(int(now)),
                                "patients": " ".join(sorted(old.links))})
        pipe.expire(key, self.staff_retention)
        for token in p.identity:
            pipe.sadd(self.keys.pv_ident(token), f"s:{login}")
            pipe.expire(self.keys.pv_ident(token), self.staff_retention)
        members = []
        for token in sorted(p.identity):
            pipe.smembers(self.keys.pv_ident(token))
        res = pipe.execute()
        for found in res[-len(p.identity):] if p.identity else []:
            members += [as_text(m)[2:] for m in found if as_text(m).startswith("p:")]
        for patient in sorted(set(members) | {check_id(x, "patient") for x in patients}):
            self.link(login, patient)
        self.r.publish(self.keys.events, format_event("user", login))

    def link(self, login: str, patient: str) -> None:
        """Record that patient ``patient`` is staff member ``login`` (both directions)."""
        for key, field, value in ((self.keys.pv_staff(login), "patients", patient),
                                  (self.keys.pv_patient(patient), "staff", login)):
            current = set((as_text(self.r.hget(key, field)) or "").split())
            if value not in current:
                current.add(value)
                self.r.hset(key, field, " ".join(sorted(current)))
        self.r.expire(self.keys.pv_staff(login), self.staff_retention, nx=True)
        self.r.expire(self.keys.pv_patient(patient), self.retention, nx=True)
        self.r.publish(self.keys.events, format_event("user", login))
        self.r.publish(self.keys.events, format_event("patient", patient))

    def remove_staff(self, login: str) -> bool:
        login = check_id(login, "login")
        old = self.staff(login)
        removed = self.r.delete(self.keys.pv_staff(login))
        for patient in old.links:
            key = self.keys.pv_patient(patient)
            rest = set((as_text(self.r.hget(key, "staff")) or "").split()) - {login}
            if rest:
                self.r.hset(key, "staff", " ".join(sorted(rest)))
            else:
                self.r.hdel(key, "staff")
            self.r.publish(self.keys.events, format_event("patient", patient))
        self.r.publish(self.keys.events, format_event("user", login))
        return bool(removed)

    def staff(self, login: str) -> Profile:
        return parse_staff(self.r.hgetall(self.keys.pv_staff(login)))

    def staff_many(self, logins: Iterable[str]) -> dict[str, Profile]:
        logins = list(logins)
        pipe = self.r.pipeline(transaction=False)
        for login in logins:
            pipe.hgetall(self.keys.pv_staff(login))
        return {login: parse_staff(raw) for login, raw in zip(logins, pipe.execute())}

    # -- VIP / confidential list -------------------------------------------------------------------
    def set_vip(self, patient: str, level: str, source: str = "list", now: float | None = None) -> None:
        patient = check_id(patient, "patient")
        if level not in VIP_LEVELS:
            raise ValueError(f"level must be one of {', '.join(VIP_LEVELS)}, not {level!r}")
        self.r.set(self.keys.pv_vip(patient), f"{level}|{source}|{int(time.time() if now is None else now)}")
        self.r.publish(self.keys.events, format_event("patient", patient))

    def remove_vip(self, patient: str) -> bool:
        patient = check_id(patient, "patient")
        removed = self.r.delete(self.keys.pv_vip(patient))
        self.r.publish(self.keys.events, format_event("patient", patient))
        return bool(removed)

    def vip_list(self) -> list[dict]:
        out = []
        pattern = self.keys.pv_vip("*").replace("{*}", "*")
        for key in self.r.scan_iter(match=pattern, count=1000):
            key = as_text(key)
            value = as_text(self.r.get(key))
            if not value:
                continue
            level, source, since = (value.split("|") + ["", ""])[:3]
            out.append({"patient": key.rsplit("{", 1)[1].rstrip("}"), "level": level, "source": source,
                        "since": int(since) if since.isdigit() else None})
        return sorted(out, key=lambda x: x["patient"])


def _refresh(old: Pseudonyms, new: Pseudonyms) -> Pseudonyms:
    """What a feed's message changes: each kind of hash it carries replaces the stored one (the person
    moved, married...); kinds it does not carry are kept; flags only accumulate (the RSSI's list and the
    retention remove them)."""
    return Pseudonyms(new.family or old.family, new.addresses or old.addresses, new.streets or old.streets,
                      new.identity or old.identity, old.flags | new.flags)


def _union(a: Pseudonyms, b: Pseudonyms) -> Pseudonyms:
    return Pseudonyms(a.family | b.family, a.addresses | b.addresses, a.streets | b.streets, a.identity | b.identity,
                      a.flags | b.flags)
