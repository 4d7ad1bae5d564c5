"""`dpiguard policy check | test | explain | diff` and the decision simulation they share with the proxy."""

from __future__ import annotations

import shutil
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from dpiguard.cli import main
from dpiguard.policy.lint import lint
from dpiguard.policy.sim import (
    TestFileError,
    decide_request,
    diff_policies,
    load_test_file,
    run_case,
    situation_careteam,
)
from dpiguard.policy.snapshot import PolicySet
from dpiguard.policy.table import Policy

from .test_policy import BROKEN_VARIANTS, POLICIES, edit

DEMO_TESTS = POLICIES / "tests" / "demo-policy.test.yaml"


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def grant_reception_notes(d: Path) -> None:
    with (d / "policy.csv").open("a", encoding="utf-8") as f:
        f.write("p, reception, clinical_notes, read\n")


# -- check -----------------------------------------------------------------------------------------
def test_check_demo_policy_is_valid_without_warnings(capsys):
    code, out = run(capsys, "policy", "check", "--dir", POLICIES)
    assert code == 0, out
    assert f"policy OK: version {Policy.load(POLICIES).version}" in out
    # Write rules on administrative, biology... are reachable through FHIR create/update (fhir.yaml).
    assert ": warning: " not in out
    code, out = run(capsys, "policy", "check", "--dir", POLICIES, "--strict")
    assert code == 0, out


@pytest.mark.parametrize("file_name, old, new, words", [
    ("fhir.yaml", "category: biology", "category: biolgy", "biolgy"),
    ("breakglass.yaml", "duration_seconds:", "duration_secondz:", "duration_secondz"),
    ("careteam.yaml", "categories:", "categorys:", "categorys"),
])
def test_check_validates_companion_files(capsys, policy_dir, file_name, old, new, words):
    text = (policy_dir / file_name).read_text(encoding="utf-8")
    assert old in text
    (policy_dir / file_name).write_text(text.replace(old, new, 1), encoding="utf-8")
    code, out = run(capsys, "policy", "check", "--dir", str(policy_dir))
    assert code == 1
    assert file_name in out and words in out and "error" in out


@pytest.mark.parametrize("breaker", BROKEN_VARIANTS, ids=lambda f: f.__name__)
def test_check_names_file_line_and_problem(capsys, policy_dir, breaker):
    file_name, line, words = breaker(policy_dir)
    code, out = run(capsys, "policy", "check", "--dir", policy_dir)
    assert code == 1, out
    where = f"{policy_dir / file_name}:{line}: error:" if line else f"{policy_dir / file_name}"
    assert where in out and words in out, out
    assert "policy NOT valid" in out


def test_check_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["policy", "check", "--no-such-option"])
    assert exit_info.value.code == 2


def test_check_reads_policies_dir_from_config(capsys, tmp_path, policy_dir):
    config = tmp_path / "dpiguard.yaml"
    config.write_text(f"upstream: {{url: 'http://x'}}\npolicies: {{dir: {policy_dir.name}}}\n")
    edit(policy_dir / "policy.csv", "p, nurse, biology, read", "p, nurse, biolgy, read")
    code, out = run(capsys, "policy", "check", "--config", config)
    assert code == 1 and "unknown category 'biolgy'" in out and str(policy_dir) in out


def test_lint_role_without_rule_and_unreachable_category(policy_dir):
    text = (policy_dir / "categories.yaml").read_text(encoding="utf-8")
    text = text.replace("roles:\n", "roles:\n  physio:\n    description: Physiotherapist.\n", 1)
    text = text.replace("categories:\n\n", "categories:\n\n  pathology:\n    description: Pathology.\n"
                        "    care_team_required: true\n", 1)
    (policy_dir / "categories.yaml").write_text(text, encoding="utf-8")
    found = [str(f) for f in lint(Policy.load(policy_dir))]
    cat = str(policy_dir / "categories.yaml")
    assert any(f.startswith(f"{cat}:") and "role 'physio' has no rule" in f for f in found), found
    assert any("category 'pathology': no role may read or write it" in f for f in found), found
    assert any("category 'pathology': no route" in f for f in found), found


def test_lint_route_refused_for_everyone_and_shadowed_routes(policy_dir):
    with (policy_dir / "routes.yaml").open("a", encoding="utf-8") as f:
        f.write("\n  - name: new patient form\n    path: /patients/new\n    methods: [GET]\n    category: portal\n"
                "\n  - name: delete imaging\n    path: /patients/{patient}/imaging\n    methods: [DELETE]\n"
                "    category: imaging\n    action: read\n"
                "\n  - name: any file\n    path: /files/*\n    methods: [GET]\n    category: portal\n")
    (policy_dir / "routes.yaml").write_text((policy_dir / "routes.yaml").read_text().replace(
        "  - /favicon.ico\n", "  - /favicon.ico\n  - /files/**\n"))
    found = [str(f) for f in lint(Policy.load(policy_dir))]
    text = "\n".join(found)
    # '/patients/new' also looks like a patient id: the literal route takes it from '/patients/{patient}'.
    assert "route 'patient file (page)'" in text and "shadowed by route 'new patient form'" in text
    assert "GET /patients/new" in text
    # A public path overlapping a protected one.
    assert "public path /files/**" in text and "shadowed by route 'any file'" in text
    # Everyone-refused routes are reported only when no role may use them: here doctors may read imaging.
    assert "refused for everyone" not in text
    edit(policy_dir / "policy.csv", "p, doctor, portal, read", "# p, doctor, portal, read")
    for role in ("nurse", "secretary", "pharmacist", "reception"):
        edit(policy_dir / "policy.csv", f"p, {role}, portal, read", f"# p, {role}, portal, read")
    text = "\n".join(str(f) for f in lint(Policy.load(policy_dir)))
    assert "route 'home page'" in text and "refused for everyone" in text
    assert "category 'portal': no role may read or write it" in text


# -- test ------------------------------------------------------------------------------------------
def test_demo_test_file_passes(capsys, tmp_path):
    junit = tmp_path / "report.xml"
    code, out = run(capsys, "policy", "test", DEMO_TESTS, "--dir", POLICIES, "--junit", junit)
    assert code == 0, out
    assert " 0 failed" in out
    suite = ET.parse(junit).getroot().find("testsuite")
    assert int(suite.get("tests")) >= 20 and suite.get("failures") == "0"
    names = [tc.get("name") for tc in suite.iter("testcase")]
    assert "reception cannot read clinical notes" in names


def test_rssi_test_catches_reception_reading_clinical_notes(capsys, tmp_path, policy_dir):
    grant_reception_notes(policy_dir)
    junit = tmp_path / "report.xml"
    code, out = run(capsys, "policy", "test", DEMO_TESTS, "--dir", policy_dir, "--junit", junit)
    assert code == 1
    assert f"FAIL {DEMO_TESTS}:" in out and "reception cannot read clinical notes" in out
    assert "expected DENY" in out
    # The explanation names the rule that now grants it.
    assert f"p, reception, clinical_notes, read ({policy_dir / 'policy.csv'}:" in out
    failures = {tc.get("name"): tc.find("failure") for tc in ET.parse(junit).getroot().iter("testcase")}
    assert failures["reception cannot read clinical notes"] is not None
    assert "not_in_care_team" in failures["reception cannot read clinical notes"].get("message")
    assert "expected DENY, got ALLOW" in failures[
        "reception of the patient's unit still cannot read clinical notes"].get("message")
    assert failures["nurse reads lab results of a patient in her unit"] is None


def test_test_file_errors_name_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.test.yaml"
    bad.write_text("fixture:\n  users:\n    a: {roles: [nurse]}\ncases:\n  - name: x\n    user: b\n"
                   "    request: GET /\n    expect: allow\n")
    code, out = run(capsys, "policy", "test", bad, "--dir", POLICIES)
    assert code == 2 and f"{bad}:6:" in out and "not in the fixture" in out
    bad.write_text("cases:\n  - name: x\n    roles: [nurse]\n    request: GET /\n    expect: maybe\n")
    code, out = run(capsys, "policy", "test", bad, "--dir", POLICIES)
    assert code == 2 and f"{bad}:5:" in out and "allow or deny" in out
    bad.write_text("cases:\n  - name: x\n    roles: [nurse]\n    request: /patients\n    expect: allow\n")
    with pytest.raises(TestFileError, match="METHOD /path"):
        load_test_file(bad)


def test_fixture_care_team_uses_stays_assignments_and_grace():
    test = load_test_file(DEMO_TESTS)
    policy = PolicySet.load(POLICIES)
    by_name = {case.name: case for case in test.cases}
    assert run_case(policy, test, by_name["nurse keeps access a few hours after discharge"]).care_team \
        == "unit:CARDIO stay:S1"
    consult = run_case(policy, test, by_name["consultant doctor reads notes of an assigned patient of another unit"])
    assert consult.care_team == "assignment:consultant" and consult.allowed


# -- explain ---------------------------------------------------------------------------------------
def test_explain_names_rule_route_and_care_team(capsys):
    code, out = run(capsys, "policy", "explain", "--dir", POLICIES, "--roles", "nurse", "--units", "CARDIO",
                    "--patient-in-unit", "--request", "GET /fhir/Observation?patient=P7")
    assert code == 0, out
    assert "ALLOW (allowed)" in out
    assert "route:       'FHIR search Observation (fhir.yaml)'" in out  # mapped by the FHIR analyzer
    rule_line = next(n for n, line in enumerate((POLICIES / "policy.csv").read_text().splitlines(), 1)
                     if line == "p, nurse, biology, read")
    assert f"p, nurse, biology, read ({POLICIES / 'policy.csv'}:{rule_line})" in out
    assert "member by unit stay (unit:CARDIO stay:S1)" in out

    code, out = run(capsys, "policy", "explain", "--dir", POLICIES, "--roles", "reception",
                    "--category", "clinical_notes", "--patient", "P1")
    assert code == 1
    assert "no rule grants role reception action read on category clinical_notes" in out
    assert "roles that may: doctor, nurse, secretary" in out

    code, out = run(capsys, "policy", "explain", "--dir", POLICIES, "--roles", "doctor", "--units", "CARDIO",
                    "--category", "imaging", "--patient", "P1")
    assert code == 1 and "not_in_care_team" in out and "MISSING" in out
    code, out = run(capsys, "policy", "explain", "--dir", POLICIES, "--roles", "doctor", "--assigned",
                    "referring_physician", "--category", "imaging", "--patient", "P1")
    assert code == 0 and "explicit assignment (referring_physician)" in out


def test_explain_with_fixture_user(capsys):
    code, out = run(capsys, "policy", "explain", "--dir", POLICIES, "--fixture", DEMO_TESTS, "--user",
                    "dr.martin", "--request", "GET /api/patients/P2/notes")
    assert code == 0 and "assignment (consultant)" in out and "roles doctor" in out


def test_explain_live_reads_redis_care_team(capsys, tmp_path, r, redis_url):
    from dpiguard.config import load_config
    from dpiguard.demo.runner import write_demo_config
    from dpiguard.services import careteam_store, user_directory

    config = write_demo_config(tmp_path, host="127.0.0.1", port=1, upstream_port=2, redis_url=redis_url)
    cfg = load_config(config)
    user_directory(cfg).add("inf.live", "Un-Mot-De-Passe-Solide-2026", ["nurse"])
    store = careteam_store(cfg)
    store.add_unit_member("inf.live", "CARDIO")
    store.add_stay("P42", "CARDIO", start=0, stay_id="S9")
    code, out = run(capsys, "policy", "explain", "--config", config, "--user", "inf.live",
                    "--request", "GET /api/patients/P42/biology")
    assert code == 0, out
    assert "unit:CARDIO stay:S9" in out and "roles nurse" in out and "live care team" in out
    store.remove_stay("P42", "S9")
    code, out = run(capsys, "policy", "explain", "--config", config, "--user", "inf.live",
                    "--request", "GET /api/patients/P42/biology")
    assert code == 1 and "not_in_care_team" in out


# -- diff ------------------------------------------------------------------------------------------
def test_diff_same_policy_has_no_changes(capsys, policy_dir):
    code, out = run(capsys, "policy", "diff", POLICIES, policy_dir)
    assert code == 0 and "no decision changes" in out


def test_diff_lists_changed_decisions(capsys, policy_dir):
    grant_reception_notes(policy_dir)
    edit(policy_dir / "routes.yaml", "    category: imaging\n", "    category: clinical_notes\n")
    code, out = run(capsys, "policy", "diff", POLICIES, policy_dir)
    assert code == 1, out
    rows = [line.split() for line in out.splitlines()]
    changed = {tuple(row[:4]) for row in rows if len(row) > 5 and row[0] == "reception"}
    assert ("reception", "clinical_notes", "read", "unit_stay") in changed
    assert ("reception", "clinical_notes", "read", "assignment") in changed
    # Not in the team: still refused, only for another reason.
    assert any(r[:4] == ["reception", "clinical_notes", "read", "not_in_team"] and "category_not_permitted)" in r[5]
               and "not_in_care_team)" in r[-1] for r in rows if len(r) > 5)
    assert "GET    /patients/P1/imaging" in out and "imaging read" in out
    code, _ = run(capsys, "policy", "diff", POLICIES, policy_dir, "--allow-changes")
    assert code == 0


def test_diff_grid_uses_the_same_decision_as_requests(policy_dir):
    """The grid decision for (role, category) agrees with a real request line through the routes."""
    old, new = PolicySet.load(POLICIES), PolicySet.load(policy_dir)
    assert diff_policies(old, new) == []
    source = situation_careteam(unit_stay=True)
    d = decide_request(old, ["nurse"], "GET", "/api/patients/P1/biology", user="u", units=("CARDIO",),
                       careteam=source, now=1e9)
    assert d.allowed and d.care_team == "unit:CARDIO stay:S1"
