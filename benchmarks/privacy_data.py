"""A synthetic month of a hospital, as dpiguard's trace would record it, with injected snooping cases.

Deterministic from a seed. What it models (and so what the privacy benchmark measures) is written
here and in benchmarks/README.md ("Privacy monitoring"); the detectors never see this module, only
what it produces: audit records (the schema of docs/audit.md), the care-team data (stays, memberships,
assignments) in Redis, HL7 PID segments / FHIR Patient resources fed to the learner, the staff CSV and
the VIP list.

The hospital: clinical units of 30 beds (stays of 1-12 days, two thirds through the emergency unit
URG), outpatient consultations, transversal units (URG, LABO, RADIO, PHARMA, as in
policies/careteam.yaml), staff in the role mix of benchmarks/dataset.py working shifts (nurses day or
night, doctors with on-call nights, desk and secretaries by day, 5 days out of 7 on average). Staff
and patients come from one population: family names from a long-tailed distribution (Zipf, s = 0.6 over
200,000 names: the commonest carried by 0.3% of people), households sharing an address (and most of
the time a name), addresses spread over 40 postal codes of a few hundred streets. Some staff are
patients of their own hospital; a few patients are flagged confidential/VIP.

Legitimate work (what the detectors must stay quiet on): nurses and doctors read and write the
records of the patients of their unit during their shift (stays in their unit, assignments of
consultants from other units); secretaries read notes and the administrative file of their unit's
patients and book appointments (administrative writes) for future consultations; desk agents read
and write the administrative file of patients arriving, staying or leaving; LABO, RADIO and PHARMA read
and write results and validations for inpatients of every unit (transversal rule); clinicians break
the glass a few times a day to treat a patient of another unit (most then write; one in five only
reads). Noise on top: busy days (1.5-2x), on-call nights, a desk agent's occasional lookup with no
visit around (0.2% of desk reads), relatives in one's own unit, colleagues hospitalised in their unit.

Injected cases (ground truth: the (user, patient) pairs and (user, day) pairs of the snooping), of
every kind of the issue, each through the paths a snooper really has behind dpiguard (data without
care-team requirement, a transversal unit's rule, emergency access, or one's own unit).
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Iterator
from zoneinfo import ZoneInfo

TZ = ZoneInfo("Europe/Paris")
HOUR = 3600.0
DAY = 86400.0
ROLE_SHARES = (("doctor", 0.20), ("nurse", 0.45), ("secretary", 0.12), ("pharmacist", 0.05), ("reception", 0.18))
PREFIX = {"doctor": "dr", "nurse": "inf", "secretary": "sec", "pharmacist": "pha", "reception": "acc"}
BEDS = 30
KINDS = ("self_access", "family_name", "same_address", "staff_patient", "coworker", "vip", "late_access",
         "broad_rule", "volume", "unusual_hours", "break_glass_unused")
CLINICAL_READS = {"doctor": ("clinical_notes", "biology", "prescriptions", "imaging", "administrative"),
                  "nurse": ("clinical_notes", "biology", "prescriptions", "vital_signs", "administrative"),
                  "secretary": ("clinical_notes", "administrative")}
WRITES = {"doctor": ("clinical_notes", "prescriptions"), "nurse": ("vital_signs", "clinical_notes"),
          "secretary": ("administrative",), "reception": ("administrative",), "pharmacist": ("prescriptions",)}
SYLLABLES = ("ba", "be", "bi", "bo", "bou", "ca", "ce", "cha", "che", "co", "da", "de", "di", "do", "du", "fa", "fe",
             "fo", "ga", "ge", "gi", "go", "gu", "la", "le", "li", "lo", "lu", "ma", "me", "mi", "mo", "mu", "na",
             "ne", "ni", "no", "pa", "pe", "pi", "po", "ra", "re", "ri", "ro", "ru", "sa", "se", "si", "so", "ta",
             "te", "ti", "to", "va", "ve", "vi", "vo", "quin", "ron", "mont", "lard", "ret", "vin", "court", "val")
ACCENTS = str.maketrans({"e": "é", "a": "à", "o": "ô", "u": "ù", "i": "î"})
STREET_TYPES = ("rue", "avenue", "boulevard", "place", "chemin", "impasse", "allée")
STREET_ABBR = {"rue": "r.", "avenue": "av.", "boulevard": "bd", "place": "pl.", "chemin": "ch.", "impasse": "imp.",
               "allée": "all."}


@dataclass(frozen=True)
class Scale:
    staff: int
    patients: int
    days: int


@dataclass
class Person:
    family: str  # as the administrative file spells it
    given: str
    birth: str  # YYYY-MM-DD
    number: int
    street: str  # "rue des X"
    postal: str
    household: int


@dataclass
class StaffMember:
    login: str
    role: str
    units: tuple[str, ...]
    shift: str  # day, night
    oncall: bool
    person: Person
    patient: str | None = None  # the staff member's own patient id
    link: str = "none"  # csv, identity


@dataclass
class Stay:
    id: str
    patient: str
    unit: str
    start: float
    end: float | None


@dataclass
class Case:
    kind: str
    user: str
    patients: list[str]
    day: str | None = None  # volume / hours cases: the local day
    path: str = ""


@dataclass
class World:
    scale: Scale
    seed: int
    start: float  # first day 00:00 local
    units: list[str]
    staff: list[StaffMember]
    patients: list[str]
    people: dict[str, Person]
    stays: list[Stay]
    assignments: list[tuple[str, str, str, float, float | None]]  # login, patient, kind, start, end
    vip: dict[str, str] = field(default_factory=dict)  # patient -> level ; source "list" or "adt"
    vip_adt: set[str] = field(default_factory=set)
    cases: list[Case] = field(default_factory=list)
    by_unit: dict[str, list[StaffMember]] = field(default_factory=dict)
    stays_of: dict[str, list[Stay]] = field(default_factory=dict)
    relatives: dict[str, list[str]] = field(default_factory=dict)  # login -> patients of the household/family
    work: dict[str, set[int]] = field(default_factory=dict)  # login -> days worked (index)
    legit_vip_accesses: int = 0

    def day_start(self, d: int) -> float:
        return (datetime.fromtimestamp(self.start, TZ) + timedelta(days=d)).replace(hour=0, minute=0).timestamp()

    def local_day(self, t: float) -> str:
        return datetime.fromtimestamp(t, TZ).strftime("%Y-%m-%d")


# ----------------------------------------------------------------------------- people


class Names:
    def __init__(self, rng: random.Random, n: int = 200_000, s: float = 0.6):
        self.rng = rng
        weights = [k ** -s for k in range(1, n + 1)]
        self.cum = list(itertools.accumulate(weights))
        self.n = n
        self._cache: dict[int, str] = {}
        self.given = ["Camille", "Léa", "Manon", "Chloé", "Inès", "Jade", "Louise", "Emma", "Alice", "Anne", "Hélène",
                      "Élise", "Lucas", "Hugo", "Louis", "Jules", "Gabriel", "Arthur", "Théo", "Pierre", "Jean",
                      "Étienne", "Olivier", "Thomas", "Julien", "Nicolas", "Rémi", "Yves", "Sophie", "Paul"]

    def family(self) -> str:
        k = bisect.bisect_left(self.cum, self.rng.random() * self.cum[-1])
        if k not in self._cache:
            r = random.Random(k * 7919 + 17)
            word = "".join(r.choice(SYLLABLES) for _ in range(r.choice((2, 2, 3, 3, 4))))
            if r.random() < 0.15:
                word = word.translate(ACCENTS) if r.random() < 0.5 else word[:3] + word[3:].translate(ACCENTS)
            if r.random() < 0.06:
                word = word + "-" + "".join(r.choice(SYLLABLES) for _ in range(2))
            if r.random() < 0.04:
                word = r.choice(("Le ", "De ", "Du ")) + word
            self._cache[k] = word.capitalize() if not word[:3] in ("Le ", "De ", "Du ") else word
        return self._cache[k]


class Places:
    def __init__(self, rng: random.Random, codes: int = 40):
        self.rng = rng
        self.codes = [f"99{100 + i:03d}" for i in range(codes)]
        self.weights = list(itertools.accumulate(k ** -0.7 for k in range(1, codes + 1)))
        self.streets = {}
        for i, code in enumerate(self.codes):
            r = random.Random(i * 31 + 5)
            n = 80 + int(400 * (codes - i) / codes)
            self.streets[code] = [f"{r.choice(STREET_TYPES)} des {''.join(r.choice(SYLLABLES) for _ in range(3))}s"
                                  for _ in range(n)]

    def address(self) -> tuple[int, str, str]:
        code = self.codes[bisect.bisect_left(self.weights, self.rng.random() * self.weights[-1])]
        return self.rng.randint(1, 180), self.rng.choice(self.streets[code]), code

    def neighbour(self, number: int, street: str, postal: str) -> tuple[int, str, str]:
        other = number
        while other == number:
            other = self.rng.randint(1, 180)
        return other, street, postal


def written_address(p: Person, rng: random.Random) -> str:
    """How one source writes the street line (abbreviations, case, 'bis' spelled or not)."""
    kind, _, rest = p.street.partition(" ")
    if rng.random() < 0.3:
        kind = STREET_ABBR.get(kind, kind)
    line = f"{p.number} {kind} {rest}"
    return line.upper() if rng.random() < 0.3 else line


def written_family(name: str, rng: random.Random) -> str:
    """Sources spell names differently: upper case without accents (PAS), or as the person writes it."""
    if rng.random() < 0.4:
        import unicodedata
        return "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c)).upper()
    return name


# ----------------------------------------------------------------------------- the world


def build_world(scale: Scale, seed: int) -> World:
    rng = random.Random(seed)
    names, places = Names(random.Random(seed + 1)), Places(random.Random(seed + 2))
    start = datetime(2026, 10, 5, tzinfo=TZ).timestamp()
    n_units = max(6, scale.patients // 1700)
    units = [f"U{i:03d}" for i in range(n_units)]
    people: dict[str, Person] = {}
    households: list[list[str]] = []
    patients: list[str] = []

    def person(household: int, family: str | None = None, addr=None) -> Person:
        number, street, postal = addr or places.address()
        year = rng.randint(1935, 2020)
        return Person(family or names.family(), rng.choice(names.given), f"{year}-{rng.randint(1, 12):02d}-"
                      f"{rng.randint(1, 28):02d}", number, street, postal, household)

    while len(patients) < scale.patients:
        h = len(households)
        size = rng.choices((1, 2, 3, 4, 5), (35, 33, 15, 12, 5))[0]
        head = person(h)
        members = []
        for i in range(size):
            if len(patients) >= scale.patients:
                break
            same_name = i == 0 or rng.random() < 0.8
            p = person(h, head.family if same_name else None, (head.number, head.street, head.postal))
            pid = f"P{len(patients):06d}"
            patients.append(pid)
            people[pid] = p
            members.append(pid)
        households.append(members)

    # staff: each is a person of the population; a quarter have relatives among the patients
    staff: list[StaffMember] = []
    relatives: dict[str, list[str]] = {}
    clinical_units = list(units)
    for role, share in ROLE_SHARES:
        for i in range(max(2, round(scale.staff * share))):
            login = f"{PREFIX[role]}.{i:05d}"
            if role in ("doctor", "nurse"):
                r = rng.random()
                if r < 0.06:
                    member_of = ("URG",)
                elif role == "doctor" and r < 0.10:
                    member_of = ("LABO",)
                elif role == "doctor" and r < 0.14:
                    member_of = ("RADIO",)
                else:
                    member_of = tuple(sorted(rng.sample(clinical_units, 1 if rng.random() < 0.75 else 2)))
            elif role == "secretary":
                member_of = (rng.choice(clinical_units),)
            elif role == "pharmacist":
                member_of = ("PHARMA",)
            else:
                member_of = ()
            shift = "night" if role == "nurse" and rng.random() < 0.3 else "day"
            if role == "reception" and rng.random() < 0.15:
                shift = "night"  # the emergency desk at night
            oncall = role == "doctor" and member_of[0] not in ("LABO", "RADIO") and rng.random() < 0.5
            hh = rng.randrange(len(households))
            if rng.random() < 0.3:  # lives with patients of the hospital (a household of the population)
                base = people[households[hh][0]]
                p = Person(base.family if rng.random() < 0.8 else names.family(), rng.choice(names.given),
                           f"{rng.randint(1960, 2000)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                           base.number, base.street, base.postal, hh)
                relatives[login] = list(households[hh])
            else:
                p = person(-1)
                relatives[login] = []
            staff.append(StaffMember(login, role, member_of, shift, oncall, p))
    # extended family: same name, elsewhere (parents, siblings)
    by_family: dict[str, list[str]] = {}
    for pid, p in people.items():
        by_family.setdefault(p.family, []).append(pid)
    for s in staff:
        same = [x for x in by_family.get(s.person.family, []) if x not in relatives[s.login]]
        if same and len(same) < 60 and rng.random() < 0.5:  # a real relative, not a namesake
            relatives[s.login] += rng.sample(same, min(2, len(same)))
    # staff who are patients of the hospital: the patient record is theirs
    for s in rng.sample(staff, max(4, len(staff) // 20)):
        pid = f"P{len(patients):06d}"
        patients.append(pid)
        people[pid] = Person(s.person.family, s.person.given, s.person.birth, s.person.number, s.person.street,
                             s.person.postal, -1)
        s.patient = pid
        s.link = "csv" if rng.random() < 0.6 else "identity"
    world = World(scale, seed, start, units, staff, patients, people, [], [], relatives=relatives)
    for s in staff:
        for u in s.units:
            world.by_unit.setdefault(u, []).append(s)
    _schedule(world, rng)
    _stays(world, rng)
    vip_n = max(3, len(patients) // 1000)
    for pid in rng.sample(patients[:scale.patients], vip_n):
        world.vip[pid] = "confidential" if rng.random() < 0.3 else "vip"
        if rng.random() < 0.4:
            world.vip_adt.add(pid)
    return world


def _schedule(w: World, rng: random.Random) -> None:
    for s in w.staff:
        days = set()
        for d in range(w.scale.days):
            if rng.random() < 0.7:
                days.add(d)
        w.work[s.login] = days


def _stays(w: World, rng: random.Random) -> None:
    """Stays of the month (and before it: past stays for late access), consultations, assignments."""
    n = itertools.count()
    end_of_month = w.day_start(w.scale.days)
    free = [p for p in w.patients]
    rng.shuffle(free)
    pool = itertools.cycle(free)

    def add(patient: str, unit: str, start: float, end: float | None) -> Stay:
        st = Stay(f"S{next(n):07d}", patient, unit, start, end)
        w.stays.append(st)
        w.stays_of.setdefault(patient, []).append(st)
        return st

    # past stays (2 to 24 months before the month): former patients of the units
    for _ in range(len(w.patients) // 3):
        p = next(pool)
        start = w.start - rng.uniform(60, 720) * DAY
        add(p, rng.choice(w.units), start, start + rng.uniform(1, 10) * DAY)
    # inpatients: each bed of each unit, back to back stays through the month
    for unit in w.units:
        for _bed in range(BEDS):
            t = w.start - rng.uniform(0, 8) * DAY
            while t < end_of_month:
                p = next(pool)
                los = rng.uniform(1, 12) * DAY
                if rng.random() < 0.66:  # came through the emergency unit
                    er = add(p, "URG", t - rng.uniform(2, 8) * HOUR, t)
                    del er
                st = add(p, unit, t, t + los if t + los < end_of_month + 10 * DAY else None)
                if rng.random() < 0.1:  # a consultant of another unit is assigned
                    doctors = [s for s in w.by_unit.get(rng.choice(w.units), []) if s.role == "doctor"]
                    if doctors:
                        w.assignments.append((rng.choice(doctors).login, p, "consultant", st.start, st.end))
                t += los + rng.uniform(0.1, 1.0) * DAY
    # emergency visits sent home, and outpatient consultations (stays of a few hours)
    for d in range(w.scale.days):
        day = w.day_start(d)
        for _ in range(len(w.units) * 4):
            t = day + rng.uniform(0, DAY)
            add(next(pool), "URG", t, t + rng.uniform(2, 8) * HOUR)
        for _ in range(len(w.units) * 20):
            t = day + rng.uniform(8, 17) * HOUR
            add(next(pool), rng.choice(w.units), t, t + 1 * HOUR)


# ----------------------------------------------------------------------------- records


class Recorder:
    """Builds access records exactly as the pipeline writes them (docs/audit.md)."""

    def __init__(self, w: World):
        self.w = w
        self.ids = itertools.count(1)
        self.bg = itertools.count(1)

    def access(self, s: StaffMember, patient: str, t: float, category: str, write: bool, source: str | None,
               break_glass: str | None = None) -> tuple[float, dict]:
        rec = {"event": "access", "request_id": f"{next(self.ids):016x}", "outcome": "allow", "reason": "allowed",
               "user": s.login, "roles": [s.role], "units": list(s.units), "patient": patient, "category": category,
               "action": "write" if write else "read", "method": "POST" if write else "GET",
               "path": f"/api/patients/{patient}/{category}", "fhir_type": None, "fhir_id": None,
               "break_glass": None, "break_glass_reason": None, "client": "10.0.0.1", "care_team": source,
               "policy_version": "bench", "detail": None}
        if break_glass:
            rec.update(break_glass=True, break_glass_id=break_glass, break_glass_reason="continuite_des_soins",
                       care_team=f"break_glass:{break_glass}")
        return t, rec


def source_for(w: World, s: StaffMember, patient: str, t: float, category: str, grace: float = DAY) -> str | None:
    """What the decision records in ``care_team`` (a stay in one of the user's units, an assignment, a
    transversal unit's rule), None when nothing but the role allowed it."""
    for st in w.stays_of.get(patient, ()):
        if st.unit in s.units and st.start <= t and (st.end is None or t <= st.end + grace):
            return f"unit:{st.unit} stay:{st.id}"
    transversal = {"URG": {"clinical_notes", "biology", "imaging", "prescriptions"}, "RADIO": {"imaging"},
                   "LABO": {"biology"}, "PHARMA": {"prescriptions", "biology"}}
    for u in s.units:
        if category in transversal.get(u, ()) and any(st.start <= t and (st.end is None or t <= st.end)
                                                      for st in w.stays_of.get(patient, ())):
            return f"transversal:{u} open_stay_anywhere"
    return None


def present(w: World, unit: str, lo: float, hi: float) -> list[str]:
    return [st.patient for st in w._unit_stays.get(unit, ()) if st.start <= hi and (st.end is None or st.end >= lo)]


def shift_window(w: World, s: StaffMember, d: int) -> tuple[float, float]:
    day = w.day_start(d)
    if s.shift == "night":
        return day + 19 * HOUR, day + 31 * HOUR
    if s.role in ("secretary", "reception"):
        return day + 8 * HOUR, day + 18 * HOUR
    return day + 7.5 * HOUR, day + 19 * HOUR


def legitimate(w: World, rng: random.Random) -> Iterator[list[tuple[float, dict]]]:
    """The legitimate accesses, one list per day of shifts (a night shift's records spill over into the
    next morning, before 07:00; the caller sorts and merges)."""
    rec = Recorder(w)
    w._unit_stays = {}
    for st in w.stays:
        w._unit_stays.setdefault(st.unit, []).append(st)
    desk_events_by_day: dict[int, list[tuple[float, str]]] = {}  # arrivals and departures, by local day
    first_day = datetime.fromtimestamp(w.start, TZ).date()
    for st in w.stays:
        for t in (st.start, st.end):
            if t is not None and w.start <= t < w.day_start(w.scale.days):
                d = (datetime.fromtimestamp(t, TZ).date() - first_day).days
                desk_events_by_day.setdefault(d, []).append((t, st.patient))
    assigned: dict[str, list[tuple[str, float, float | None]]] = {}
    for login, p, _, a_start, a_end in w.assignments:
        assigned.setdefault(login, []).append((p, a_start, a_end))
    inpatients_now = {}
    for d in range(w.scale.days):
        lo = w.day_start(d)
        inpatients_now[d] = [st.patient for st in w.stays if st.unit != "URG" and st.start <= lo + 12 * HOUR
                             and (st.end is None or st.end >= lo + 12 * HOUR)]
    desk = [s for s in w.staff if s.role == "reception"]
    n_desk_day = {d: max(1, sum(1 for s in desk if d in w.work[s.login])) for d in range(w.scale.days)}
    for d in range(w.scale.days):
        yield list(_day(w, rng, rec, d, desk_events_by_day, assigned, inpatients_now, n_desk_day))


def _day(w, rng, rec, d, desk_events_by_day, assigned, inpatients_now, n_desk_day) -> Iterator[tuple[float, dict]]:
    for s in w.staff:
        if d in w.work[s.login]:
            lo, hi = shift_window(w, s, d)
            busy = 1.0 if rng.random() > 0.08 else rng.uniform(1.5, 2.0)

            def t_in() -> float:
                return rng.uniform(lo, hi)

            if s.role in ("doctor", "nurse") and s.units[0] in ("LABO", "RADIO"):
                cat = "biology" if s.units[0] == "LABO" else "imaging"
                for p in rng.sample(inpatients_now[d], min(len(inpatients_now[d]), int(rng.randint(20, 45) * busy))):
                    t = t_in()
                    yield rec.access(s, p, t, cat, False, source_for(w, s, p, t, cat))
                    t2 = min(hi, t + rng.uniform(60, 3 * HOUR))
                    yield rec.access(s, p, t2, cat, True, source_for(w, s, p, t2, cat))
                continue
            if s.role == "pharmacist":
                for p in rng.sample(inpatients_now[d], min(len(inpatients_now[d]), int(rng.randint(15, 35) * busy))):
                    t = t_in()
                    yield rec.access(s, p, t, "prescriptions", False, source_for(w, s, p, t, "prescriptions"))
                    t2 = min(hi, t + rng.uniform(60, 2 * HOUR))
                    yield rec.access(s, p, t2, "prescriptions", True, source_for(w, s, p, t2, "prescriptions"))
                continue
            if s.role == "reception":  # the desk registers arrivals and departures as they happen
                events = [e for dd in (d, d + 1) for e in desk_events_by_day.get(dd, []) if lo <= e[0] <= hi]
                k = int(len(events) / max(1.0, n_desk_day[d] * (0.15 if s.shift == "night" else 0.85)) * busy) + 1
                for t_event, p in rng.sample(events, min(len(events), k)):
                    t = min(hi, max(lo, t_event + rng.uniform(-1, 1) * HOUR))
                    yield rec.access(s, p, t, "administrative", False, source_for(w, s, p, t, "administrative"))
                    if rng.random() < 0.5:
                        yield rec.access(s, p, t + 120, "administrative", True, None)
                if rng.random() < 0.002 * k:  # an occasional lookup with no visit around (0.2% of desk reads)
                    p = rng.choice(w.patients)
                    t = t_in()
                    yield rec.access(s, p, t, "administrative", False, source_for(w, s, p, t, "administrative"))
                continue
            # unit staff: the patients of their units during the shift
            mine = []
            for u in s.units:
                mine += present(w, u, lo, hi)
            mine = list(dict.fromkeys(mine))
            if s.role == "doctor" and s.oncall and rng.random() < 0.1:  # an on-call night as well
                n_lo, n_hi = lo + 12 * HOUR, lo + 23 * HOUR
                for p in rng.sample(mine, min(len(mine), rng.randint(2, 6))):
                    t = rng.uniform(n_lo, n_hi)
                    yield rec.access(s, p, t, "clinical_notes", False, source_for(w, s, p, t, "clinical_notes"))
                    yield rec.access(s, p, t + 300, "prescriptions", True, source_for(w, s, p, t + 300, "prescriptions"))
            want = {"doctor": (8, 16), "nurse": (6, 12), "secretary": (6, 14)}[s.role]
            chosen = rng.sample(mine, min(len(mine), int(rng.randint(*want) * busy)))
            for p in chosen:
                n_acc = rng.randint(2, 5) if s.role != "secretary" else rng.randint(1, 3)
                for _ in range(n_acc):
                    t = t_in()
                    write = rng.random() < 0.3
                    cat = rng.choice(WRITES[s.role] if write else CLINICAL_READS[s.role])
                    src = source_for(w, s, p, t, cat)
                    if src is None:
                        continue  # the patient had left before this moment (grace over): the proxy refused it
                    yield rec.access(s, p, t, cat, write, src)
                if p in w.vip:
                    w.legit_vip_accesses += n_acc
            for p, a_start, a_end in assigned.get(s.login, ()):
                t = t_in()
                if a_start <= t and (a_end is None or t <= a_end) and rng.random() < 0.5:
                    yield rec.access(s, p, t, "clinical_notes", False, "assignment:consultant")
                    yield rec.access(s, p, t + 600, "clinical_notes", True, "assignment:consultant")
            if s.role == "secretary" and rng.random() < 0.8:  # booking future consultations: read, then write
                for _ in range(rng.randint(1, 4)):
                    p = rng.choice(w.patients)
                    t = t_in()
                    yield rec.access(s, p, t, "administrative", False, source_for(w, s, p, t, "administrative"))
                    yield rec.access(s, p, t + 90, "administrative", True, source_for(w, s, p, t + 90, "administrative"))
            if s.role in ("doctor", "nurse") and rng.random() < 0.004:  # emergency access to another unit's patient
                p = rng.choice(inpatients_now[d])
                if source_for(w, s, p, lo, "clinical_notes") is None:
                    gid = f"BG{next(rec.bg):06d}"
                    t = t_in()
                    for i in range(rng.randint(2, 6)):
                        yield rec.access(s, p, t + i * 120, "clinical_notes", False, None, gid)
                    if rng.random() < 0.8:
                        yield rec.access(s, p, t + 900, rng.choice(WRITES[s.role]), True, None, gid)


# ----------------------------------------------------------------------------- snooping


def inject(w: World, rng: random.Random, per_kind: int) -> list[tuple[float, dict]]:
    """The snooping cases (``w.cases``: ground truth) and their access records."""
    rec = Recorder(w)
    out: list[tuple[float, dict]] = []
    first, last = 1, w.scale.days - 2  # leave the last days for the windows to close
    staff_by_login = {s.login: s for s in w.staff}
    clinicians = [s for s in w.staff if s.role in ("doctor", "nurse")]
    workers = [s for s in w.staff if s.role != "pharmacist"]
    used: set[tuple[str, str]] = set()

    def when(s: StaffMember, d: int | None = None) -> float:
        d = d if d is not None else rng.randint(first, last)
        lo, hi = shift_window(w, s, d)
        return rng.uniform(lo, hi)

    def snoop(kind: str, s: StaffMember, patients: list[str], t: float, path: str | None = None) -> None:
        """The snooper opens each patient through a path they really have behind dpiguard."""
        done, ways = [], []
        for p in patients:
            if (s.login, p) in used:
                continue
            used.add((s.login, p))
            way = path or rng.choices(("admin", "transversal", "break_glass", "own_unit"), (70, 10, 15, 5))[0]
            ways.append(way)
            src = None
            cat = "administrative"
            if way == "transversal" and s.units and s.units[0] in ("URG", "LABO", "RADIO", "PHARMA"):
                cat = {"URG": "clinical_notes", "LABO": "biology", "RADIO": "imaging", "PHARMA": "prescriptions"}[s.units[0]]
                src = source_for(w, s, p, t, cat)
                if src is None:
                    cat, src = "administrative", source_for(w, s, p, t, "administrative")
            elif way == "break_glass" and s.role in ("doctor", "nurse"):
                gid = f"BGX{next(rec.bg):05d}"
                for i in range(rng.randint(2, 5)):
                    out.append(rec.access(s, p, t + i * 90, "clinical_notes", False, None, gid))
                done.append(p)
                continue
            else:
                src = source_for(w, s, p, t, "administrative")
            for i in range(rng.randint(1, 4)):
                out.append(rec.access(s, p, t + i * 60, cat, False, src))
            done.append(p)
        if done:
            w.cases.append(Case(kind, s.login, done, path=",".join(sorted(set(ways)))))

    # 1. self access
    selves = [s for s in w.staff if s.patient]
    for s in rng.sample(selves, min(per_kind, len(selves))):
        snoop("self_access", s, [s.patient], when(s))
    # 2. family (same name, elsewhere or at home)
    fam = [s for s in workers if any(w.people[p].family == s.person.family for p in w.relatives[s.login])]
    for s in rng.sample(fam, min(per_kind, len(fam))):
        ps = [p for p in w.relatives[s.login] if w.people[p].family == s.person.family]
        snoop("family_name", s, ps[:1], when(s))
    # 3. same address: the household (other name) or a neighbour in the street
    for s in rng.sample(workers, per_kind):
        home = [p for p in w.relatives[s.login] if w.people[p].family != s.person.family
                and (w.people[p].number, w.people[p].street) == (s.person.number, s.person.street)]
        if home and rng.random() < 0.4:
            snoop("same_address", s, home[:1], when(s))
            continue
        street = [p for p, q in w.people.items() if q.street == s.person.street and q.postal == s.person.postal
                  and q.number != s.person.number and q.family != s.person.family][:50]
        if street:
            snoop("same_address", s, [rng.choice(street)], when(s))
    # 4/5. staff members as patients: colleagues of the unit, other staff
    patient_staff = [s for s in w.staff if s.patient and s.units]
    for _ in range(per_kind):
        target = rng.choice(patient_staff)
        colleagues = [c for c in w.by_unit.get(target.units[0], []) if c.login != target.login and c.role != "pharmacist"]
        if colleagues:
            snoop("coworker", rng.choice(colleagues), [target.patient], when(target))
    all_patient_staff = [s for s in w.staff if s.patient]
    for _ in range(per_kind):
        target = rng.choice(all_patient_staff)
        others = [c for c in workers if not set(c.units) & set(target.units) and c.login != target.login]
        snoop("staff_patient", rng.choice(others), [target.patient], when(rng.choice(others)), "admin")
    # 6. VIP / confidential patients, by someone outside their unit
    vips = list(w.vip)
    for _ in range(per_kind):
        p = rng.choice(vips)
        s = rng.choice(workers)
        t = when(s)
        if source_for(w, s, p, t, "clinical_notes") is None:
            snoop("vip", s, [p], t)
    # 7. late access: a former patient of the user's unit, long after
    formers = [st for st in w.stays if st.end is not None and st.end < w.start - 45 * DAY and st.unit in w.by_unit]
    for st in rng.sample(formers, min(per_kind * 3, len(formers))):
        if sum(1 for c in w.cases if c.kind == "late_access") >= per_kind:
            break
        cands = [c for c in w.by_unit[st.unit] if c.role in ("doctor", "nurse", "secretary")]
        s = rng.choice(cands)
        t = when(s)
        if source_for(w, s, st.patient, t, "clinical_notes") is None:
            snoop("late_access", s, [st.patient], t, "admin")
    # 8. browsing with a broad rule: patients with no visit around
    quiet = [p for p in w.patients if not any(abs(st.start - w.start - 15 * DAY) < 20 * DAY
                                              for st in w.stays_of.get(p, ()))]
    for s in rng.sample([x for x in workers if x.role in ("reception", "secretary", "nurse")], per_kind):
        snoop("broad_rule", s, rng.sample(quiet, rng.randint(2, 6)), when(s), "admin")
    # 9. volume: one day, many more patients than usual (the admin file of random patients)
    day_cases = set()
    for s in rng.sample([x for x in workers if x.role in ("nurse", "secretary", "doctor")], per_kind * 2):
        days = sorted(d for d in w.work[s.login] if 8 <= d <= last)
        if not days or sum(1 for c in w.cases if c.kind == "volume") >= per_kind:
            continue
        d = rng.choice(days)
        day_cases.add((s.login, d))
        ps = rng.sample(w.patients, rng.randint(70, 120))
        lo, hi = shift_window(w, s, d)
        t = rng.uniform(lo, hi - 3 * HOUR)
        for i, p in enumerate(ps):
            used.add((s.login, p))
            out.append(rec.access(s, p, t + i * 50, "administrative", False, source_for(w, s, p, t, "administrative")))
        w.cases.append(Case("volume", s.login, ps, w.local_day(t)))
    # 10. unusual hours: day staff at night
    day_staff = [x for x in workers if x.shift == "day" and not x.oncall and x.role in ("secretary", "reception", "doctor")]
    for s in rng.sample(day_staff, per_kind * 2):
        if sum(1 for c in w.cases if c.kind == "unusual_hours") >= per_kind:
            break
        d = rng.randint(9, last)
        if (s.login, d) in day_cases:
            continue
        t = w.day_start(d) + rng.uniform(1, 4) * HOUR
        ps = rng.sample(w.patients, rng.randint(4, 8))
        for i, p in enumerate(ps):
            used.add((s.login, p))
            out.append(rec.access(s, p, t + i * 240, "administrative", False, source_for(w, s, p, t, "administrative")))
        w.cases.append(Case("unusual_hours", s.login, ps, w.local_day(t)))
    # 11. emergency access that was not needed: the user never treats the patient
    for s in rng.sample(clinicians, per_kind * 2):
        if sum(1 for c in w.cases if c.kind == "break_glass_unused") >= per_kind:
            break
        t = when(s)
        p = rng.choice(w.patients)
        if source_for(w, s, p, t, "clinical_notes") is None:
            snoop("break_glass_unused", s, [p], t, "break_glass")
    del staff_by_login
    return out
