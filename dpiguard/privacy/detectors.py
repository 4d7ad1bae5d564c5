"""The detectors as pure functions: one access and what is known about its user and patient → candidates.

No I/O here. :mod:`dpiguard.privacy.monitor` reads the facts (in batches, from Redis) and calls
:func:`evaluate`; a candidate is either an alert at once, or waits for its care-event window
(``deferred``) and becomes an alert only if :func:`care_event` finds nothing that explains the access.
:func:`static_matches` is the subset known when a request arrives, used by the decision for the
``require_break_glass`` / ``refuse`` actions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from dpiguard.privacy.store import Profile

HOUR = 3600.0
DAY = 86400.0


@dataclass(slots=True)
class Access:
    """One allowed access to one patient's data, as the trace recorded it."""

    user: str
    roles: tuple[str, ...]
    units: tuple[str, ...]
    patient: str
    t: float
    category: str | None
    write: bool
    source: str | None  # the record's care_team field
    break_glass: bool
    request_id: str | None
    instance: str | None
    seq: int

    @property
    def explanation(self) -> str:
        """direct (stay in one of the user's units, assignment), transversal, role_only, break_glass."""
        s = self.source or ""
        if self.break_glass or s.startswith("break_glass:"):
            return "break_glass"
        if s.startswith(("unit:", "assignment:")):
            return "direct"
        if s.startswith("transversal:"):
            return "transversal"
        return "role_only"

    def ref(self) -> dict:
        return {"user": self.user, "roles": list(self.roles), "units": list(self.units), "patient": self.patient,
                "t": self.t, "category": self.category, "source": self.source, "break_glass": self.break_glass,
                "request_id": self.request_id, "instance": self.instance, "seq": self.seq, "write": self.write}

    @classmethod
    def from_ref(cls, d: Mapping[str, Any]) -> "Access":
        return cls(d["user"], tuple(d.get("roles") or ()), tuple(d.get("units") or ()), d["patient"], float(d["t"]),
                   d.get("category"), bool(d.get("write")), d.get("source"), bool(d.get("break_glass")),
                   d.get("request_id"), d.get("instance"), int(d.get("seq") or 0))


@dataclass
class Facts:
    """What the monitor read for one (user, patient)."""

    staff: Profile
    patient: Profile
    name_counts: Mapping[str, int] = field(default_factory=dict)
    patients_known: int = 0
    stays: list[dict] = field(default_factory=list)  # {"unit", "start", "end"}
    assignment: dict | None = None  # the user's assignment to the patient
    coworker_units: frozenset[str] = frozenset()  # units shared with the patient when the patient is staff


@dataclass
class Candidate:
    detector: str
    access: Access
    evidence: dict
    deferred: str | None = None  # None: alert now; "context" / "after": only if no care event
    due: float = 0.0
    key: str = ""  # what the alert is about besides the user (patient, or a day for baselines)


def explained_directly(a: Access) -> bool:
    return a.explanation == "direct"


def relationship_end(a: Access, f: Facts) -> tuple[bool, float | None]:
    """(current relationship, end of the latest past one): stays of the patient in the user's units and
    the user's assignment, at the access time."""
    current, latest = False, None
    units = set(a.units)
    windows = [(s["start"], s["end"]) for s in f.stays if s["unit"] in units]
    if f.assignment is not None:
        windows.append((f.assignment.get("start"), f.assignment.get("end")))
    for start, end in windows:
        if start is not None and start > a.t:
            continue
        if end is None or end >= a.t:
            current = True
        else:
            latest = end if latest is None else max(latest, end)
    return current, latest


def evaluate(a: Access, f: Facts, rules, care_hours: float) -> list[Candidate]:
    """Candidates raised by one access (``rules``: a PrivacyPolicy)."""
    out: list[Candidate] = []
    expl = a.explanation
    due = a.t + care_hours * HOUR
    self_links = f.staff.links
    is_self = a.patient in self_links or (a.user in f.patient.links)
    if is_self:
        if rules.on("self_access"):
            out.append(Candidate("self_access", a, {"explanation": expl}, key=a.patient))
        return out  # the other relationship detectors are about someone else
    sp, pp = f.staff.pseudonyms, f.patient.pseudonyms
    shared_address = bool(sp.addresses & pp.addresses)
    shared_street = bool(sp.streets & pp.streets)
    shared_names = sp.family & pp.family
    r = rules.on("family_name")
    if r and shared_names:
        known = max(1, f.patients_known)
        share = max((f.name_counts.get(t, 1) for t in shared_names), default=1) / known
        common = share > r.get("common_name_share")
        ev = {"explanation": expl, "name_share": round(share, 6), "common_name": common,
              "same_address": shared_address, "same_street": shared_street}
        if shared_address or shared_street or expl in ("break_glass", "role_only") and not common:
            out.append(Candidate("family_name", a, ev, key=a.patient))  # a relative, most likely
        elif not explained_directly(a):  # a namesake, unless nothing explains the access
            out.append(Candidate("family_name", a, ev, "context", due, a.patient))
    r = rules.on("same_address")
    if r and shared_address:
        out.append(Candidate("same_address", a, {"explanation": expl, "where": "à la même adresse"}, key=a.patient))
    elif r and shared_street and r.get("street") and not explained_directly(a):
        out.append(Candidate("same_address", a, {"explanation": expl, "where": "dans la même rue"}, "context", due,
                             a.patient))
    if f.patient.links and not explained_directly(a):  # a member of the staff, not in the user's care
        if f.coworker_units and rules.on("coworker"):
            out.append(Candidate("coworker", a, {"explanation": expl, "units": ",".join(sorted(f.coworker_units))},
                                 key=a.patient))
        elif r := rules.on("staff_patient"):
            # only a DIRECT care relationship explains it (checked once the window is over): no stay "going
            # on" somewhere else; a desk agent's access, only an admission or a discharge close to it
            ev = {"explanation": expl, "hours": int(care_hours)}
            if set(a.roles) & set(r.get("desk_roles")):
                ev["desk_hours"] = r.get("desk_event_hours")
            out.append(Candidate("staff_patient", a, ev, "direct", due, a.patient))
    r = rules.on("vip")
    if r and f.patient.vip:
        level = "confidentiel" if f.patient.vip == "confidential" else "personnalité (VIP)"
        if r.get("every_access"):
            out.append(Candidate("vip", a, {"explanation": expl, "level": level}, key=f"{a.patient}|{a.request_id}"))
        elif expl == "break_glass":
            out.append(Candidate("vip", a, {"explanation": expl, "level": level}, key=a.patient))
        elif not explained_directly(a):  # stricter: only the user's own care explains it
            out.append(Candidate("vip", a, {"explanation": expl, "level": level}, "strict", due, a.patient))
    r = rules.on("late_access")
    if r:
        current, ended = relationship_end(a, f)
        if not current and ended is not None and a.t - ended > r.get("after_days") * DAY:
            # a former patient coming back (a new stay, an appointment booked) is a care event
            out.append(Candidate("late_access", a, {"explanation": expl, "days": int((a.t - ended) // DAY)},
                                 "context", due, a.patient))
    if rules.on("broad_rule") and expl in ("transversal", "role_only"):
        out.append(Candidate("broad_rule", a, {"explanation": expl, "hours": int(care_hours)}, "context", due,
                             a.patient))
    r = rules.on("break_glass_unused")
    if r and expl == "break_glass":
        window = r.get("window_hours")
        out.append(Candidate("break_glass_unused", a, {"explanation": expl, "hours": int(window)}, "after",
                             a.t + window * HOUR, a.patient))
    return out


def care_event(c: Candidate, stays: Iterable[dict], assignment: dict | None, orders: Mapping[str, float],
               care_hours: float) -> str | None:
    """What explains a deferred candidate's access (None: nothing, so it becomes an alert).

    ``context`` candidates: within ``care_hours`` before or after the access, a stay of the patient in
    one of the user's units, an assignment of the user, something written for the patient by the user
    or one of their units; for data without care-team requirement (``role_only``), any stay of the
    patient starting, going on or ending then (admissions, discharges: the desk's work).
    ``strict`` candidates (confidential / VIP patients): the same, but only the user's own care counts
    (their units' stays, their assignment, their own writes: no desk movement, no colleague's write).
    ``after`` candidates (emergency access): as ``strict``, after the access only.
    ``direct`` candidates (a staff member's record): only a direct care relationship within ``care_hours``
    (a stay in one of the user's units, the user's assignment, something written by the user or one of
    their units): a stay going on elsewhere explains nothing. A desk agent's access (the candidate's
    evidence has ``desk_hours``) is also explained by an admission or a discharge of the patient (a stay
    starting or ending) within ``desk_hours`` of the access: registering it is their work."""
    a = c.access
    after_only = c.deferred == "after"
    strict = c.deferred in ("after", "strict")  # only the user's own care (not the desk's, not the unit's)
    lo = a.t if after_only else a.t - care_hours * HOUR
    hi = c.due if after_only else a.t + care_hours * HOUR
    units = set(a.units)
    for s in stays:
        start, end = s["start"], s["end"]
        overlaps = start <= hi and (end is None or end >= lo)
        if not overlaps:
            continue
        if s["unit"] in units:
            if after_only and start <= a.t and (end is None or end >= a.t):
                # the stay was already there when the glass was broken: it did not need breaking,
                # but it is a care relationship all the same
                return f"stay:{s['unit']}"
            return f"stay:{s['unit']}"
        if not strict and c.deferred != "direct" and a.explanation == "role_only":
            return "movement"
    desk = c.evidence.get("desk_hours") if c.deferred == "direct" else None
    if desk:
        near = desk * HOUR
        for s in stays:
            if any(t is not None and abs(t - a.t) <= near for t in (s["start"], s["end"])):
                return "registration"
    if assignment is not None:
        start, end = assignment.get("start"), assignment.get("end")
        if (start is None or start <= hi) and (end is None or end >= lo):
            return "assignment"
    who = [f"u:{a.user}"] + ([] if strict else [f"unit:{u}" for u in units])
    for w in who:
        t = orders.get(w)
        if t is not None and t >= lo:
            return "order"
    return None


def static_matches(login: str, patient: str, staff: Profile, pat: Profile) -> dict[str, str]:
    """Decision-time facts (no care event, no history): detector → short evidence code.

    ``family_name`` matches on any shared family-name hash here (common or not): an RSSI who sets
    ``require_break_glass`` on it asks for a justification for every such access."""
    out: dict[str, str] = {}
    if patient in staff.links or login in pat.links:
        out["self_access"] = "self"
        return out
    if staff.pseudonyms.family & pat.pseudonyms.family:
        out["family_name"] = "same_name"
    if staff.pseudonyms.addresses & pat.pseudonyms.addresses:
        out["same_address"] = "same_address"
    if pat.links:
        out["staff_patient"] = "staff"
    if pat.vip:
        out["vip"] = pat.vip
    return out
