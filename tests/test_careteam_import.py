"""Transversal units (policies/careteam.yaml) and CSV bulk imports, against a real Redis server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpiguard.careteam.imports import import_assignments, import_members, import_stays
from dpiguard.careteam.movements import MovementStore
from dpiguard.careteam.store import CareTeamStore
from dpiguard.policy.careteam import CareTeamPolicy
from dpiguard.policy.files import PolicyError

ROOT = Path(__file__).resolve().parents[1]
CATS = ["administrative", "clinical_notes", "biology", "prescriptions", "imaging", "portal"]
NOW = float(int(time.time()))


def test_shipped_careteam_policy_loads():
    policy = CareTeamPolicy.load(ROOT / "policies" / "careteam.yaml", CATS)
    assert policy.units["RADIO"].categories == {"imaging"}
    assert policy.grace_seconds is None
    assert CareTeamPolicy.load(ROOT / "policies" / "absent.yaml", CATS).units == {}


@pytest.mark.parametrize("text, line, words", [
    ("transversal_units:\n  RADIO:\n    description: x\n    categories: [imagery]\n", 4, "unknown category"),
    ("transversal_units:\n  RADIO:\n    description: x\n    categories: [imaging]\n    patients: all\n", 5, "patients"),
    ("transversal_units:\n  RADIO:\n    categories: [imaging]\n", 3, "description"),
    ("grace_seconds: -5\n", 1, "grace_seconds"),
    ("grace: 5\n", 1, "unknown section"),
    ("transversal_units:\n  RADIO:\n    description: x\n    categories: [imaging]\n    color: red\n", 5, "unknown setting"),
])
def test_careteam_policy_errors_name_the_line(tmp_path, text, line, words):
    path = tmp_path / "careteam.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        CareTeamPolicy.load(path, CATS)
    assert err.value.line == line and words in err.value.message


def test_transversal_unit_reaches_listed_categories_of_patients_staying_anywhere(r):
    policy = CareTeamPolicy.load(ROOT / "policies" / "careteam.yaml", CATS)
    ct = CareTeamStore(r, grace_seconds=100, transversal=policy.units)
    ct.add_unit_member("manip.radio", "RADIO")
    ct.add_stay("P1", "CARDIO", start=NOW - 1000, stay_id="S1")
    m = ct.membership("manip.radio", "P1", NOW, category="imaging")
    assert m.member and m.source == "transversal:RADIO open_stay_anywhere"
    assert not ct.membership("manip.radio", "P1", NOW, category="clinical_notes").member
    assert not ct.membership("manip.radio", "P1", NOW).member  # no category: no transversal access
    ct.end_stay("P1", "S1", NOW - 10)  # discharged: open_stay_anywhere no longer matches (no grace)
    assert not ct.membership("manip.radio", "P1", NOW, category="imaging").member
    assert not ct.membership("manip.radio", "P2", NOW, category="imaging").member  # no stay at all
    info = ct.explain_user("manip.radio", NOW)
    assert info["transversal_units"] == {"RADIO": {"categories": ["imaging"], "patients": "open_stay_anywhere"}}


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_members_import_validates_everything_first(r, tmp_path):
    bad = _write(tmp_path, "m.csv", "login;unit;from;to\ninf.a;CARDIO;2026-01-01;\ninf b;CARDIO;;\n"
                                    "inf.c;PNEUMO;2026-13-01;\ninf.d;URG;2026-02-01;2026-01-01\n")
    report = import_members(r, "dpiguard", bad, "UTC")
    assert not report.ok and report.applied == 0
    text = "\n".join(report.lines())
    assert f"{bad}:3: column 'login'" in text
    assert f"{bad}:4: column 'from'" in text
    assert f"{bad}:5: column 'to'" in text
    assert r.keys("dpiguard:ct:*") == []  # nothing half-imported
    good = _write(tmp_path, "m2.csv", "login,unit,from,to\ninf.a,cardio,2026-01-01,\ninf.b,PNEUMO,,\n")
    report = import_members(r, "dpiguard", good, "UTC")
    assert report.ok and report.applied == 2
    assert CareTeamStore(r).user_units("inf.a", NOW) == ["CARDIO"]


def test_header_problems_are_reported(r, tmp_path):
    report = import_members(r, "dpiguard", _write(tmp_path, "h.csv", "login,service\nx,y\n"), "UTC")
    assert any("column 'service': unknown column" in e for e in report.errors)
    assert any("column 'unit': required column missing" in e for e in report.errors)


def test_assignments_and_census_imports(r, tmp_path):
    a = _write(tmp_path, "a.csv", "login,patient,kind\ndr.x,P1,referring_physician\ndr.y,P2,\n")
    assert import_assignments(r, "dpiguard", a, "UTC").applied == 2
    assert CareTeamStore(r).membership("dr.x", "P1", NOW).source == "assignment:referring_physician"
    census = _write(tmp_path, "s.csv", "patient,unit,start,visit\nP1,CARDIO,2026-01-02T08:00,V1\n"
                                       "P2,PNEUMO,2026-01-03,\n")
    store = MovementStore(r)
    report = import_stays(store, census, "UTC")
    assert report.ok and report.applied == 2
    again = import_stays(store, census, "UTC")  # importing the same census again changes nothing
    assert again.ok and again.applied == 0 and again.unchanged == 2
    assert [s["unit"] for s in CareTeamStore(r).patient_stays("P1")] == ["CARDIO"]
    assert r.xlen("dpiguard:ct:journal") == 2  # census rows are journaled movements


def test_cli_import_and_show(r, redis_url, tmp_path):
    cfg = _write(tmp_path, "dpiguard.yaml", f"upstream: {{url: 'http://127.0.0.1:9'}}\nredis: {{url: '{redis_url}'}}\n"
                                            f"policies: {{dir: '{ROOT / 'policies'}'}}\naudit: {{path: audit.jsonl}}\n")
    members = _write(tmp_path, "m.csv", "login,unit\ninf.a,CARDIO\n")
    stays = _write(tmp_path, "s.csv", "patient,unit,start\nP1,CARDIO,2026-01-01\nP1,,x\n")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "dpiguard.cli", *args, "--config", str(cfg)],
                              capture_output=True, text=True, cwd=str(ROOT), timeout=60)

    assert run("import", "members", str(members)).returncode == 0
    bad = run("import", "stays", str(stays))
    assert bad.returncode == 1 and f"{stays}:3: column 'unit'" in bad.stderr and f"{stays}:3: column 'start'" in bad.stderr
    stays.write_text("patient,unit,start\nP1,CARDIO,2026-01-01\n")
    assert run("import", "stays", str(stays)).returncode == 0
    show = run("careteam", "show", "--patient", "P1")
    assert show.returncode == 0 and '"inf.a"' in show.stdout
    visits = run("adt", "visits", "--patient", "P1")
    assert '"status": "open"' in visits.stdout
