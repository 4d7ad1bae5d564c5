"""Policy loading, validation (PolicyError with file and line), permissions matrix and version."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from dpiguard.policy.table import Category, Policy, PolicyError

POLICIES = Path(__file__).resolve().parent.parent / "policies"
PATIENT_CATEGORIES = ("administrative", "clinical_notes", "biology", "prescriptions", "imaging", "vital_signs")


@pytest.fixture(scope="module")
def demo() -> Policy:
    return Policy.load(POLICIES)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A private copy of the demo policies/ directory, free to break."""
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


def edit(path: Path, old: str, new: str) -> None:
    """Replace the first ``old`` found outside comments (at a line start, after indentation or
    after the '=' of a setting)."""
    text = path.read_text(encoding="utf-8")
    found = re.search(r"(?m)^(?:[ \t]*|[^#\n]*= )" + re.escape(old), text)
    assert found, f"{old!r} not in {path.name}"
    start = found.end() - len(old)
    path.write_text(text[:start] + new + text[found.end():], encoding="utf-8")


def line_number(path: Path, content: str) -> int:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip() == content:
            return number
    raise AssertionError(f"{content!r} not in {path.name}")


# -- the demo policy -------------------------------------------------------------------------------
def test_demo_declarations(demo):
    assert set(demo.roles) == {"doctor", "nurse", "secretary", "pharmacist", "reception"}
    assert set(demo.categories) == set(PATIENT_CATEGORIES) | {"portal"}
    assert demo.category("administrative") == Category(
        "administrative", demo.categories["administrative"].description, False, True)
    assert demo.category("portal").patient_bound is False
    assert demo.category("portal").care_team_required is False
    for name in PATIENT_CATEGORIES[1:]:
        assert demo.category(name).care_team_required and demo.category(name).patient_bound
    with pytest.raises(KeyError):
        demo.category("finance")


EXPECTED = {
    "doctor": {(c, a) for c in PATIENT_CATEGORIES for a in ("read", "write")} | {("portal", "read")},
    "nurse": {("administrative", "read"), ("clinical_notes", "read"), ("clinical_notes", "write"),
              ("biology", "read"), ("prescriptions", "read"), ("imaging", "read"), ("portal", "read"),
              ("vital_signs", "read"), ("vital_signs", "write")},
    "secretary": {("administrative", "read"), ("administrative", "write"), ("clinical_notes", "read"),
                  ("portal", "read")},
    "pharmacist": {("administrative", "read"), ("prescriptions", "read"), ("prescriptions", "write"),
                   ("biology", "read"), ("portal", "read")},
    "reception": {("administrative", "read"), ("administrative", "write"), ("portal", "read")},
}


@pytest.mark.parametrize("role", sorted(EXPECTED))
def test_demo_permission_matrix(demo, role):
    for category in demo.categories:
        for action in ("read", "write"):
            assert demo.permits([role], category, action) == ((category, action) in EXPECTED[role]), \
                (role, category, action)


@pytest.mark.parametrize("roles, category, action, allowed", [
    (["nurse"], "biology", "read", True),
    (["nurse"], "biology", "write", False),
    (["reception"], "clinical_notes", "read", False),
    (["pharmacist"], "prescriptions", "write", True),
    (["pharmacist"], "imaging", "read", False),
    (["secretary"], "clinical_notes", "write", False),
    (["reception", "pharmacist"], "prescriptions", "write", True),
    (("reception",), "administrative", "write", True),
    ([], "portal", "read", False),
    (["janitor"], "portal", "read", False),
    (["doctor"], "unknown", "read", False),
    (["doctor"], "biology", "delete", False),
])
def test_permits(demo, roles, category, action, allowed):
    assert demo.permits(roles, category, action) is allowed


def test_permits_refuses_a_bare_string(demo):
    with pytest.raises(TypeError):
        demo.permits("doctor", "biology", "read")


def test_policy_is_read_only(demo):
    with pytest.raises(TypeError):
        demo.categories["biology"] = None  # type: ignore[index]
    with pytest.raises(AttributeError):
        demo.version = "x"  # type: ignore[misc]


def test_routes_are_loaded_with_the_policy(demo):
    found = demo.routes.match("GET", "/api/patients/P1/biology", {})
    assert (found.category, found.patient, found.fhir) == ("biology", "P1", False)
    assert demo.routes.match("GET", "/fhir/Observation", {"patient": ["P1"]}) is None  # fhir.yaml decides


# -- version ---------------------------------------------------------------------------------------
def test_version_is_stable_and_follows_every_file(demo, policy_dir):
    assert len(demo.version) == 16 and int(demo.version, 16) >= 0
    assert Policy.load(policy_dir).version == demo.version == Policy.load(POLICIES).version
    seen = {demo.version}
    for name in ("model.conf", "policy.csv", "categories.yaml", "routes.yaml"):
        with (policy_dir / name).open("a", encoding="utf-8") as file:
            file.write("\n# reviewed\n")
        version = Policy.load(policy_dir).version
        assert version not in seen, name
        seen.add(version)


# -- broken files ----------------------------------------------------------------------------------
def break_model_syntax(d: Path):
    edit(d / "model.conf", "[matchers]", "[matchers")
    return "model.conf", line_number(d / "model.conf", "[matchers"), "does not parse"


def break_model_fields(d: Path):
    edit(d / "model.conf", "r = role, category, action", "r = role, category")
    return "model.conf", line_number(d / "model.conf", "r = role, category"), "exactly 3 fields"


def break_model_missing_matcher(d: Path):
    edit(d / "model.conf", "m = r.role", "# m = r.role")
    return "model.conf", None, "[matchers]"


def break_model_too_permissive(d: Path):
    edit(d / "model.conf", "m = r.role == p.role && r.category == p.category && r.action == p.action",
         "m = r.role == p.role && r.category == p.category")
    return "model.conf", line_number(d / "model.conf", "m = r.role == p.role && r.category == p.category"), \
        "the model permits"


def break_model_bad_matcher(d: Path):
    edit(d / "model.conf", "r.role == p.role && r.category == p.category && r.action == p.action",
         "r.role == p.role && r.category == p.category && r.action == p.verb")
    return "model.conf", None, "Casbin"


def unknown_role(d: Path):
    edit(d / "policy.csv", "p, nurse, biology, read", "p, nurce, biology, read")
    return "policy.csv", line_number(d / "policy.csv", "p, nurce, biology, read"), "unknown role 'nurce'"


def unknown_category(d: Path):
    edit(d / "policy.csv", "p, nurse, biology, read", "p, nurse, biolgy, read")
    return "policy.csv", line_number(d / "policy.csv", "p, nurse, biolgy, read"), "unknown category 'biolgy'"


def unknown_action(d: Path):
    edit(d / "policy.csv", "p, nurse, biology, read", "p, nurse, biology, delete")
    return "policy.csv", line_number(d / "policy.csv", "p, nurse, biology, delete"), "unknown action 'delete'"


def wrong_field_count(d: Path):
    edit(d / "policy.csv", "p, nurse, biology, read", "p, nurse, biology")
    return "policy.csv", line_number(d / "policy.csv", "p, nurse, biology"), "expected 4 fields"


def not_a_p_line(d: Path):
    edit(d / "policy.csv", "p, nurse, biology, read", "g, nurse, biology, read")
    return "policy.csv", line_number(d / "policy.csv", "g, nurse, biology, read"), "must start with 'p'"


def duplicate_line(d: Path):
    edit(d / "policy.csv", "p, nurse, biology, read", "p, nurse, biology, read\np, nurse, biology, read")
    first = line_number(d / "policy.csv", "p, nurse, biology, read")
    return "policy.csv", first + 1, f"duplicate rule (same as line {first})"


def trailing_comment(d: Path):
    edit(d / "policy.csv", "p, nurse, biology, read", "p, nurse, biology, read  # lab")
    return "policy.csv", line_number(d / "policy.csv", "p, nurse, biology, read  # lab"), "own line"


def only_comments_policy(d: Path):
    (d / "policy.csv").write_text("# nothing yet\n", encoding="utf-8")
    return "policy.csv", None, "no rule line"


def empty_policy(d: Path):
    (d / "policy.csv").write_bytes(b"")
    return "policy.csv", None, "file is empty"


def empty_categories(d: Path):
    (d / "categories.yaml").write_text("   \n\n", encoding="utf-8")
    return "categories.yaml", None, "file is empty"


def missing_file(d: Path):
    (d / "model.conf").unlink()
    return "model.conf", None, "cannot read"


def non_utf8_policy(d: Path):
    data = (d / "policy.csv").read_bytes().replace(b"p, nurse, biology, read", b"p, nurse, biolog\xe9, read")
    (d / "policy.csv").write_bytes(data)
    return "policy.csv", data[:data.index(b"\xe9")].count(b"\n") + 1, "not valid UTF-8"


def non_utf8_routes(d: Path):
    (d / "routes.yaml").write_bytes(b"routes:\n  - name: caf\xe9\n")
    return "routes.yaml", 2, "not valid UTF-8"


def truncated_categories(d: Path):
    text = (d / "categories.yaml").read_text(encoding="utf-8")
    cut = text.index("  clinical_notes:")
    (d / "categories.yaml").write_text(text[:cut] + "  clinical_notes: [descr", encoding="utf-8")
    return "categories.yaml", text[:cut].count("\n") + 1, "YAML syntax error"


def truncated_routes(d: Path):
    text = (d / "routes.yaml").read_text(encoding="utf-8")
    cut = text.index("methods: [GET]\n    category: biology") + len("methods: [GE")
    (d / "routes.yaml").write_text(text[:cut], encoding="utf-8")
    return "routes.yaml", None, "YAML syntax error"


def undeclared_category_setting(d: Path):
    edit(d / "categories.yaml", "    care_team_required: true\n", "    care_team_requird: true\n")
    return "categories.yaml", line_number(d / "categories.yaml", "care_team_requird: true"), "unknown setting"


def non_boolean_setting(d: Path):
    edit(d / "categories.yaml", "    care_team_required: true\n", "    care_team_required: maybe\n")
    return "categories.yaml", line_number(d / "categories.yaml", "care_team_required: maybe"), "true or false"


def duplicate_role(d: Path):
    edit(d / "categories.yaml", "  nurse:\n", "  doctor:\n")
    lines = (d / "categories.yaml").read_text(encoding="utf-8").splitlines()
    second = [number for number, line in enumerate(lines, start=1) if line == "  doctor:"][1]
    return "categories.yaml", second, "written twice"


def role_without_description(d: Path):
    edit(d / "categories.yaml", "    description: Nurse caring for patients in a unit.\n", "    {}\n")
    return "categories.yaml", None, "role 'nurse'"


def care_team_without_patient(d: Path):
    edit(d / "categories.yaml", "    care_team_required: false\n    patient_bound: false",
         "    care_team_required: true\n    patient_bound: false")
    return "categories.yaml", None, "care team can only be checked"


def duplicate_route(d: Path):
    edit(d / "routes.yaml", "path: /patients/{patient}/imaging", "path: /patients/{patient}/biology")
    return "routes.yaml", None, "already defined"


def route_unknown_category(d: Path):
    edit(d / "routes.yaml", "    category: imaging\n", "    category: radiology\n")
    return "routes.yaml", line_number(d / "routes.yaml", "category: radiology"), "unknown category 'radiology'"


def route_bad_pattern(d: Path):
    edit(d / "routes.yaml", "path: /patients/{patient}/imaging", "path: /patients/{patient}/../imaging")
    return "routes.yaml", line_number(d / "routes.yaml", "path: /patients/{patient}/../imaging"), "bad path"


def route_unknown_method(d: Path):
    edit(d / "routes.yaml", "path: /patients/{patient}/imaging\n    methods: [GET]",
         "path: /patients/{patient}/imaging\n    methods: [GETT]")
    return "routes.yaml", line_number(d / "routes.yaml", "methods: [GETT]"), "unknown method 'GETT'"


BROKEN_VARIANTS = [
    break_model_syntax, break_model_fields, break_model_missing_matcher, break_model_too_permissive,
    break_model_bad_matcher, unknown_role, unknown_category, unknown_action, wrong_field_count,
    not_a_p_line, duplicate_line, trailing_comment, only_comments_policy, empty_policy,
    empty_categories, missing_file, non_utf8_policy, non_utf8_routes, truncated_categories,
    truncated_routes, undeclared_category_setting, non_boolean_setting, duplicate_role,
    role_without_description, care_team_without_patient, duplicate_route, route_unknown_category,
    route_bad_pattern, route_unknown_method,
]


@pytest.mark.parametrize("breaker", BROKEN_VARIANTS, ids=lambda f: f.__name__)
def test_broken_policy_files_are_refused(policy_dir, breaker):
    file_name, line, words = breaker(policy_dir)
    with pytest.raises(PolicyError) as info:
        Policy.load(policy_dir)
    error = info.value
    assert error.file == str(policy_dir / file_name), str(error)
    if line is not None:
        assert error.line == line, str(error)
        assert str(error).startswith(f"{policy_dir / file_name}:{line}: ")
    assert file_name in str(error)
    assert words in error.message, str(error)


def test_error_message_format():
    error = PolicyError("policies/policy.csv", 7, "unknown category 'biolgy'")
    assert str(error) == "policies/policy.csv:7: unknown category 'biolgy'"
    assert (error.file, error.line, error.message) == ("policies/policy.csv", 7, "unknown category 'biolgy'")
    assert str(PolicyError("policies/model.conf", None, "bad")) == "policies/model.conf: bad"


def test_relative_directory_gives_relative_file_names(monkeypatch, policy_dir):
    monkeypatch.chdir(policy_dir.parent)
    unknown_category(policy_dir)
    with pytest.raises(PolicyError) as info:
        Policy.load("policies")
    assert str(info.value).startswith("policies/policy.csv:")
