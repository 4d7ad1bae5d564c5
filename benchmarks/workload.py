"""The request mix replayed by wrk, and running wrk.

Each request is authenticated as one of the logged-in accounts (bearer token from the real login
endpoint) and is one of: a web page (``/patients/P/biology``, HTML), a JSON API call
(``/api/patients/P/biology``) or a FHIR read/search (``/fhir/Patient/P``, ``/fhir/Observation?patient=P``),
over a working set of patients of the account's care team. About ``refuse_share`` of them are refused by
dpiguard: a category the role may not read (reception opening biology...) or a patient outside the
account's care team. The expected status of every request is known, so the harness checks that
dpiguard answered what it should (same statuses, not a wall of 401s).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import orjson

from .dataset import Hospital

HERE = Path(__file__).resolve().parent
LUA = HERE / "workload.lua"

READS = {
    "doctor": ("administrative", "clinical_notes", "biology", "prescriptions", "imaging"),
    "nurse": ("administrative", "clinical_notes", "biology", "prescriptions", "imaging"),
    "secretary": ("administrative", "clinical_notes"),
    "pharmacist": ("administrative", "prescriptions", "biology"),
    "reception": ("administrative",),
}
CARE_TEAM = {"clinical_notes", "biology", "prescriptions", "imaging"}
ALL_CATEGORIES = ("administrative", "clinical_notes", "biology", "prescriptions", "imaging")
PAGE = {"administrative": "/patients/{p}", "clinical_notes": "/patients/{p}/notes",
        "biology": "/patients/{p}/biology", "prescriptions": "/patients/{p}/prescriptions",
        "imaging": "/patients/{p}/imaging"}
API = {"administrative": "/api/patients/{p}", "clinical_notes": "/api/patients/{p}/notes",
       "biology": "/api/patients/{p}/biology", "prescriptions": "/api/patients/{p}/prescriptions",
       "imaging": "/api/patients/{p}/imaging"}
FHIR = {"administrative": "/fhir/Patient/{p}", "clinical_notes": "/fhir/DocumentReference?patient={p}",
        "biology": "/fhir/Observation?patient={p}", "prescriptions": "/fhir/MedicationRequest?patient={p}",
        "imaging": "/fhir/ImagingStudy?patient={p}"}
FAMILIES = (("page", 0.35, PAGE, "text/html,application/xhtml+xml"),
            ("json", 0.35, API, "application/json"),
            ("fhir", 0.30, FHIR, "application/fhir+json"))


@dataclass
class Request:
    method: str
    path: str
    login: str
    family: str
    expected: int  # 200 or 403
    reason: str  # allowed, category_not_permitted, not_in_care_team
    patient: str | None = None


def build_requests(h: Hospital, count: int, refuse_share: float = 0.05, seed: int = 7,
                   working_set: int = 20) -> list[Request]:
    """``count`` requests; each user works on ``working_set`` patients of their care team (the patients
    a clinician follows during a shift), so decisions repeat as they do in a ward."""
    rng = random.Random(seed)
    full_teams = {a.login: h.team_of(a) for a in h.accounts}
    team_sets = {login: set(team) for login, team in full_teams.items()}
    teams = {login: rng.sample(team, min(working_set, len(team))) for login, team in full_teams.items()}
    out: list[Request] = []
    for _ in range(count):
        account = h.accounts[rng.randrange(len(h.accounts))]
        roll = rng.random()
        family, _, table, _ = _pick_family(rng)
        if roll < refuse_share:
            forbidden = [c for c in ALL_CATEGORIES if c not in READS[account.role]]
            team_cats = [c for c in READS[account.role] if c in CARE_TEAM]
            if forbidden and (not team_cats or rng.random() < 0.5):
                category, patient = rng.choice(forbidden), h.patients[rng.randrange(len(h.patients))]
                reason = "category_not_permitted"
            else:
                category = rng.choice(team_cats)
                patient = _outsider(rng, h, team_sets[account.login])
                reason = "not_in_care_team"
            out.append(Request("GET", table[category].format(p=patient), account.login, family, 403, reason, patient))
            continue
        if roll < refuse_share + 0.03:
            out.append(Request("GET", rng.choice(("/", "/patients")), account.login, "page", 200, "allowed"))
            continue
        team = teams[account.login]
        categories = [c for c in READS[account.role] if c not in CARE_TEAM or team]
        category = rng.choice(categories)
        if category in CARE_TEAM or (team and rng.random() < 0.7):
            patient = team[rng.randrange(len(team))]
        else:
            patient = h.patients[rng.randrange(len(h.patients))]
        out.append(Request("GET", table[category].format(p=patient), account.login, family, 200, "allowed", patient))
    return out


def _pick_family(rng: random.Random):
    x = rng.random()
    for fam in FAMILIES:
        if x < fam[1]:
            return fam
        x -= fam[1]
    return FAMILIES[-1]


def _outsider(rng: random.Random, h: Hospital, team: set[str]) -> str:
    while True:
        patient = h.patients[rng.randrange(len(h.patients))]
        if patient not in team:
            return patient


def write_requests(requests: list[Request], tokens: dict[str, str], path: Path) -> None:
    accept = {fam[0]: fam[3] for fam in FAMILIES}
    with open(path, "w") as fh:
        for r in requests:
            fh.write(f"{r.method}\t{r.path}\t{tokens[r.login]}\t{accept[r.family]}\n")


def mix_summary(requests: list[Request]) -> dict:
    out: dict = {"requests": len(requests), "families": {}, "reasons": {}, "users": len({r.login for r in requests}),
                 "patients": len({r.patient for r in requests if r.patient})}
    for r in requests:
        out["families"][r.family] = out["families"].get(r.family, 0) + 1
        out["reasons"][r.reason] = out["reasons"].get(r.reason, 0) + 1
    out["expected_refused_share"] = round(sum(r.expected == 403 for r in requests) / len(requests), 4)
    return out


# ----------------------------------------------------------------------------- wrk


def ensure_wrk() -> str:
    """Path of wrk; installs the Debian package when missing (the harness runs as root in CI)."""
    found = shutil.which("wrk")
    if found:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, env=env, stdout=subprocess.DEVNULL)
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk could not be installed (apt-get install wrk)")
    return found


def run_wrk(url: str, requests_file: Path, *, seconds: float, connections: int, threads: int = 1,
            cpus: str | None = None, offset: int | None = None) -> dict:
    """One wrk run; each run starts at a random place of the list unless ``offset`` is given."""
    offset = random.randrange(1_000_000) if offset is None else offset
    cmd = [ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(LUA), url, "--", str(requests_file), str(offset)]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT"):
            result = orjson.loads(line[len("@@RESULT"):])
            result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
            return result
    raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
