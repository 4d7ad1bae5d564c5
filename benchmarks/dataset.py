"""A synthetic hospital at benchmark scale, loaded through the production code paths.

Scale (release profile): 5,000 staff, 100,000 patients and 1,000,000 care-team links: unit
memberships of the staff, stays of the patients (past stays and the current inpatients), and explicit
assignments (referring physicians, consultants...) filling the rest. Generation is deterministic
(``seed``).

Loading goes through :class:`dpiguard.careteam.bulkload.CareTeamBulkLoader` (the same keys, values and checks as
``CareTeamStore``'s writes, batched). Loginable accounts are created with
:meth:`dpiguard.auth.users.UserDirectory.add` (production argon2id parameters, so a few hundred only: at
~50 ms of CPU per hash, 5,000 would take minutes); the other staff exist in the care-team data at full
scale, which is what the decisions read. Sessions for the load are opened through the real login
endpoint (see :mod:`benchmarks.run`).
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

from dpiguard.auth.users import UserDirectory
from dpiguard.careteam.bulkload import AssignmentRow, CareTeamBulkLoader, MembershipRow, StayRow
from dpiguard.careteam.store import CareTeamStore

DAY = 86400.0
PASSWORD = "Bench-Hopital-2026!"
ROLE_SHARES = (("doctor", 0.20), ("nurse", 0.45), ("secretary", 0.12), ("pharmacist", 0.05), ("reception", 0.18))
LOGIN_PREFIX = {"doctor": "dr", "nurse": "inf", "secretary": "sec", "pharmacist": "pha", "reception": "acc"}
CLINICAL = ("doctor", "nurse", "secretary")
BEDS_PER_UNIT = 30
ASSIGN_KINDS = ("referring_physician", "consultant", "assigned")


@dataclass(frozen=True)
class Scale:
    staff: int
    patients: int
    links: int
    accounts: int  # loginable users (argon2 + TOTP), used by the load generator

    def describe(self) -> str:
        return (f"{self.staff:,} staff, {self.patients:,} patients, {self.links:,} care-team links, "
                f"{self.accounts} loginable accounts")


@dataclass
class Staff:
    login: str
    role: str
    units: tuple[str, ...]


@dataclass
class Hospital:
    scale: Scale
    seed: int
    now: float
    units: list[str]
    staff: list[Staff]
    patients: list[str]
    accounts: list[Staff]  # the loginable subset
    current: dict[str, list[str]] = field(default_factory=dict)  # unit → patients staying now
    active_assignments: dict[str, list[str]] = field(default_factory=dict)  # account login → patients
    counts: dict[str, int] = field(default_factory=dict)
    totp_secrets: dict[str, str] = field(default_factory=dict)

    def team_of(self, account: Staff) -> list[str]:
        """Patients in this account's care team now (current stays in its units + active assignments)."""
        out = list(self.active_assignments.get(account.login, ()))
        for unit in account.units:
            out += self.current.get(unit, ())
        return out


def build_hospital(scale: Scale, seed: int = 2026, now: float | None = None) -> Hospital:
    rng = random.Random(seed)
    now = float(int(time.time() if now is None else now))
    n_units = max(8, scale.patients // 1700)
    units = [f"U{i:03d}" for i in range(n_units)]
    staff: list[Staff] = []
    for role, share in ROLE_SHARES:
        for i in range(max(1, round(scale.staff * share))):
            if role in CLINICAL:
                k = 1 if rng.random() < 0.7 else 2
                member_of = tuple(sorted(rng.sample(units, k)))
            elif role == "pharmacist":
                member_of = tuple(sorted(rng.sample(units, 3)))
            else:
                member_of = ()
            staff.append(Staff(f"{LOGIN_PREFIX[role]}.{i:05d}", role, member_of))
    patients = [f"P{i:06d}" for i in range(scale.patients)]
    # Loginable accounts: a sample keeping the role mix (at least two of each role).
    by_role: dict[str, list[Staff]] = {}
    for s in staff:
        by_role.setdefault(s.role, []).append(s)
    accounts: list[Staff] = []
    for role, share in ROLE_SHARES:
        accounts += rng.sample(by_role[role], min(len(by_role[role]), max(2, round(scale.accounts * share))))
    return Hospital(scale, seed, now, units, staff, patients, accounts)


# ----------------------------------------------------------------------------- rows


def membership_rows(h: Hospital) -> Iterator[MembershipRow]:
    for s in h.staff:
        for unit in s.units:
            yield MembershipRow(s.login, unit, h.now - 400 * DAY, None)


def stay_rows(h: Hospital, budget: int) -> Iterator[StayRow]:
    """``budget`` stays: one open stay per bed (the current inpatients), the rest past stays."""
    rng = random.Random(h.seed + 1)
    beds = min(len(h.units) * BEDS_PER_UNIT, len(h.patients), budget)
    inpatients = rng.sample(h.patients, beds)
    h.current = {}
    n = 0
    for i, patient in enumerate(inpatients):
        unit = h.units[i % len(h.units)]
        h.current.setdefault(unit, []).append(patient)
        yield StayRow(patient, unit, h.now - rng.uniform(0.1, 12) * DAY, None, f"S{n:07d}")
        n += 1
    while n < budget:
        patient = h.patients[rng.randrange(len(h.patients))]
        start = h.now - rng.uniform(5, 3 * 365) * DAY
        end = min(start + rng.uniform(0.5, 15) * DAY, h.now - 3 * DAY)
        if end < start:
            end = start
        yield StayRow(patient, h.units[rng.randrange(len(h.units))], start, end, f"S{n:07d}")
        n += 1


def assignment_rows(h: Hospital, budget: int) -> Iterator[AssignmentRow]:
    """``budget`` explicit assignments, distinct (user, patient) pairs; 30% valid now."""
    rng = random.Random(h.seed + 2)
    clinical = [s.login for s in h.staff if s.role in ("doctor", "nurse")]
    tracked = {a.login for a in h.accounts}
    h.active_assignments = {}
    per_patient, extra = divmod(budget, len(h.patients))
    for p_index, patient in enumerate(h.patients):
        k = per_patient + (1 if p_index < extra else 0)
        seen: dict[str, None] = {}  # insertion-ordered: the same rows in every process
        while len(seen) < min(k, len(clinical)):
            seen[clinical[rng.randrange(len(clinical))]] = None
        for login in seen:
            active = rng.random() < 0.3
            if active:
                start, end = h.now - rng.uniform(1, 200) * DAY, None
                if login in tracked:
                    h.active_assignments.setdefault(login, []).append(patient)
            else:
                start = h.now - rng.uniform(100, 900) * DAY
                end = start + rng.uniform(1, 60) * DAY
            yield AssignmentRow(login, patient, ASSIGN_KINDS[rng.randrange(3)], start, end)


# ----------------------------------------------------------------------------- loading


def load_careteam(h: Hospital, store: CareTeamStore, batch_size: int = 5000) -> dict:
    """Load memberships, stays and assignments (1/4 of the non-membership links are stays)."""
    loader = CareTeamBulkLoader(store, batch_size=batch_size)
    t0 = time.perf_counter()
    memberships = loader.add_unit_members(membership_rows(h))
    rest = max(0, h.scale.links - memberships)
    stays = loader.add_stays(stay_rows(h, rest // 4))
    assignments = loader.assign_many(assignment_rows(h, rest - rest // 4))
    h.counts = {"memberships": memberships, "stays": stays, "assignments": assignments,
                "links": memberships + stays + assignments}
    return {**h.counts, "seconds": round(time.perf_counter() - t0, 2)}


def create_accounts(h: Hospital, users: UserDirectory, workers: int = 2) -> dict:
    """Create the loginable accounts with the production ``UserDirectory.add`` (argon2id)."""
    t0 = time.perf_counter()

    def add(account: Staff) -> tuple[str, str]:
        _, uri = users.add(account.login, PASSWORD, [account.role], display_name=account.login)
        return account.login, uri.split("secret=")[1].split("&")[0]

    with ThreadPoolExecutor(workers) as pool:
        h.totp_secrets = dict(pool.map(add, h.accounts))
    return {"accounts": len(h.accounts), "seconds": round(time.perf_counter() - t0, 2)}
