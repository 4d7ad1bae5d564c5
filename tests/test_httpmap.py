"""HTTP mapping: path normalization, query parsing, route matching and patient resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpiguard.policy.files import PolicyError
from dpiguard.policy.paths import HostileRequest, normalize_path, parse_query
from dpiguard.policy.routes import RouteMatch, RouteTable

POLICIES = Path(__file__).resolve().parent.parent / "policies"
DEMO_CATEGORIES = {"administrative": True, "clinical_notes": True, "biology": True,
                   "prescriptions": True, "imaging": True, "portal": False}


# -- normalize_path --------------------------------------------------------------------------------
HOSTILE_PATHS = [
    "/api/patients/P1/../P2/notes",
    "/api/patients/P1/./notes",
    "/api/patients/P1/%2e%2e/P2/notes",
    "/api/patients/P1/%2E%2e/P2/notes",
    "/api/patients/P1/%2E./P2/notes",
    "/api/patients/P1/.%2e/P2/notes",
    "/api/patients/P1/%2e/notes",
    "/api/patients/P1/..",
    "/..",
    "//api/patients/P1",
    "/api//patients/P1",
    "/api/patients/P1//",
    "/api/patients/P1%2fP2",
    "/api/patients/P1%2FP2",
    "/api/patients/P1%5c..%5cP2",
    "/api/patients/P1%5C",
    "/api/patients/P1\\..\\P2",
    "/api/patients/P1%00",
    "/api/patients/P1\x00",
    "/api/patients/P1%0a",
    "/api/patients/P1\r\n",
    "/api/patients/P1%7f",
    "/api/patients/P1\t",
    "/api/patients/%252e%252e/P2",
    "/api/patients/P1%2541",
    "/api/patients/P1%",
    "/api/patients/P1%4",
    "/api/patients/P1%zz",
    "/api/patients/%ff",
    "/api/patients/%c0%ae%c0%ae/P2",
    "/static/..;/patients/P2/notes",
    "/static/%3b/x",
    "/patients/P1 /notes",
    "/patients/\u00e9",
    "/patients/%EF%BC%8E%EF%BC%8E/x",
    "/patients/%E2%80%8B",
    "/" + "a" * 2048,
    "patients/P1",
    "",
    "*",
]


@pytest.mark.parametrize("raw", HOSTILE_PATHS)
def test_hostile_paths_are_refused(raw):
    with pytest.raises(HostileRequest) as info:
        normalize_path(raw)
    assert info.value.reason == "hostile_path"
    assert str(info.value)


@pytest.mark.parametrize("raw, canonical", [
    ("/", "/"),
    ("/patients", "/patients"),
    ("/patients/", "/patients"),
    ("/patients/P1/", "/patients/P1"),
    ("/patients/%41%62c", "/patients/Abc"),
    ("/patients/P%2D1", "/patients/P-1"),
    ("/static/a%7eb.css", "/static/a~b.css"),
    ("/static/x%20y", "/static/x%20y"),
    ("/static/x%3fy", "/static/x%3Fy"),
    ("/static/caf%c3%a9", "/static/caf%C3%A9"),
    ("/static/...x", "/static/...x"),
    ("/static/app.v2.js", "/static/app.v2.js"),
    ("/static/%25zz", "/static/%25zz"),
    ("/" + "a" * 2047, "/" + "a" * 2047),
])
def test_benign_paths_are_canonicalized(raw, canonical):
    assert normalize_path(raw) == canonical


# -- parse_query -----------------------------------------------------------------------------------
def test_parse_query_decodes_and_keeps_repeats():
    assert parse_query("") == {}
    assert parse_query("patient=P1&_count=10&patient=P2") == {"patient": ["P1", "P2"], "_count": ["10"]}
    assert parse_query("q=a+b%20c&flag") == {"q": ["a b c"], "flag": [""]}
    assert parse_query("subject=Patient%2FP1") == {"subject": ["Patient/P1"]}


@pytest.mark.parametrize("raw", [
    "&".join(f"a{i}=1" for i in range(101)),
    "q=" + "x" * 4095,
    "q=%zz",
    "q=%ff",
    "q=%00",
    "q=a%0db",
])
def test_parse_query_limits_and_bad_encoding(raw):
    with pytest.raises(HostileRequest) as info:
        parse_query(raw)
    assert info.value.reason == "hostile_path"


def test_parse_query_accepts_exactly_the_limits():
    assert len(parse_query("&".join(f"a{i}=1" for i in range(100)))) == 100
    assert parse_query("q=" + "x" * 4094) == {"q": ["x" * 4094]}


# -- route matching --------------------------------------------------------------------------------
# FHIR-style routes with patient_query, as a hospital without policies/fhir.yaml could write them
# (the demo decides /fhir with fhir.yaml instead, see tests/test_fhir_*.py); they keep the
# patient_query and ambiguous-patient mechanisms of routes.yaml covered.
PATIENT_QUERY_ROUTES = """
  - name: FHIR Patient
    path: /fhir/Patient/{patient}
    methods: [GET]
    category: administrative
    fhir: true
  - name: FHIR Observation (lab results)
    path: /fhir/Observation
    methods: [GET]
    category: biology
    patient_query: patient
    fhir: true
  - name: FHIR MedicationRequest (prescriptions)
    path: /fhir/MedicationRequest
    methods: [GET]
    category: prescriptions
    patient_query: patient
    fhir: true
  - name: FHIR DocumentReference (clinical documents)
    path: /fhir/DocumentReference
    methods: [GET]
    category: clinical_notes
    patient_query: patient
    fhir: true
  - name: FHIR ImagingStudy (imaging)
    path: /fhir/ImagingStudy
    methods: [GET]
    category: imaging
    patient_query: patient
    fhir: true
"""


@pytest.fixture(scope="module")
def demo_routes() -> RouteTable:
    text = (POLICIES / "routes.yaml").read_text(encoding="utf-8").rstrip() + "\n" + PATIENT_QUERY_ROUTES
    return RouteTable.from_text(text, "routes.yaml", DEMO_CATEGORIES)


def match(table: RouteTable, method: str, target: str) -> RouteMatch | None:
    raw_path, _, raw_query = target.partition("?")
    return table.match(method, normalize_path(raw_path), parse_query(raw_query))


@pytest.mark.parametrize("method, target, expected", [
    ("GET", "/", ("home page", "portal", "read", None, False)),
    ("GET", "/patients", ("patient list", "portal", "read", None, False)),
    ("GET", "/patients/P1", ("patient file (page)", "administrative", "read", "P1", False)),
    ("GET", "/patients/P1/notes", ("clinical notes (page)", "clinical_notes", "read", "P1", False)),
    ("POST", "/patients/P1/notes", ("add clinical note (form)", "clinical_notes", "write", "P1", False)),
    ("GET", "/patients/P-9/biology", ("lab results (page)", "biology", "read", "P-9", False)),
    ("GET", "/patients/P1/prescriptions", ("prescriptions (page)", "prescriptions", "read", "P1", False)),
    ("GET", "/patients/P1/imaging", ("imaging (page)", "imaging", "read", "P1", False)),
    ("GET", "/api/patients/P1", ("patient file (API)", "administrative", "read", "P1", False)),
    ("GET", "/api/patients/P1/notes", ("clinical notes (API)", "clinical_notes", "read", "P1", False)),
    ("POST", "/api/patients/P1/notes", ("add clinical note (API)", "clinical_notes", "write", "P1", False)),
    ("GET", "/api/patients/P1/biology?patient=P1", ("lab results (API)", "biology", "read", "P1", False)),
    ("GET", "/fhir/Patient/P1", ("FHIR Patient", "administrative", "read", "P1", True)),
    ("GET", "/fhir/Observation?patient=P1&_count=5",
     ("FHIR Observation (lab results)", "biology", "read", "P1", True)),
    ("GET", "/fhir/Observation?patient=Patient/P1",
     ("FHIR Observation (lab results)", "biology", "read", "P1", True)),
    ("GET", "/fhir/MedicationRequest?patient=P2",
     ("FHIR MedicationRequest (prescriptions)", "prescriptions", "read", "P2", True)),
    ("GET", "/fhir/DocumentReference?patient=P3",
     ("FHIR DocumentReference (clinical documents)", "clinical_notes", "read", "P3", True)),
    ("GET", "/fhir/ImagingStudy?patient=P4", ("FHIR ImagingStudy (imaging)", "imaging", "read", "P4", True)),
    ("GET", "/patients/P1/", ("patient file (page)", "administrative", "read", "P1", False)),
])
def test_demo_routes(demo_routes, method, target, expected):
    found = match(demo_routes, method, target)
    assert found is not None and not found.public
    assert (found.route_name, found.category, found.action, found.patient, found.fhir) == expected


@pytest.mark.parametrize("method, target", [
    ("GET", "/static/app.css"), ("HEAD", "/static/js/app.js"), ("GET", "/favicon.ico"),
])
def test_public_routes(demo_routes, method, target):
    found = match(demo_routes, method, target)
    assert found is not None and found.public and found.category is None and found.patient is None


@pytest.mark.parametrize("method, target", [
    ("GET", "/nowhere"),
    ("GET", "/static"),                      # ** needs at least one part
    ("POST", "/static/app.css"),             # public paths are GET/HEAD only
    ("DELETE", "/patients/P1/notes"),        # method not listed
    ("PUT", "/patients"),
    ("GET", "/patients/P1/notes/extra"),
    ("GET", "/patients/P!1"),                # not a patient id
    ("GET", "/patients/" + "P" * 65),        # patient id too long
    ("GET", "/fhir/Observation"),            # patient-bound, no patient given
    ("GET", "/fhir/Observation?patient="),
    ("GET", "/fhir/Observation?patient=Group/G1"),
    ("GET", "/fhir/Observation?subject=Patient/P1"),  # only the declared parameter carries it
    ("get", "/patients"),
])
def test_no_route(demo_routes, method, target):
    assert match(demo_routes, method, target) is None


@pytest.mark.parametrize("method, target", [
    ("GET", "/patients/P1/notes?patient=P2"),
    ("GET", "/api/patients/P1/notes?patient_id=P2"),
    ("GET", "/api/patients/P1/notes?Patient=P2"),
    ("GET", "/api/patients/P1/notes?PATIENT=P2"),
    ("GET", "/api/patients/P1/notes?ipp=P2"),
    ("GET", "/api/patients/P1/notes?subject=Patient/P2"),
    ("GET", "/api/patients/P1/notes?subject:Patient=P2"),
    ("GET", "/api/patients/P1/notes?patient=P1&patient=P1"),
    ("GET", "/api/patients/P1/notes?patient=P1,P2"),
    ("GET", "/fhir/Patient/P1?patient=P2"),
    ("GET", "/fhir/Observation?patient=P1&patient=P2"),
    ("GET", "/fhir/Observation?patient=P1,P2"),
    ("GET", "/fhir/Observation?patient=P1&subject=Patient/P2"),
    ("GET", "/fhir/Observation?patient=P1&ipp=P1"),
    ("GET", "/fhir/Observation?patient=P1&patient.identifier=X"),
])
def test_ambiguous_patient(demo_routes, method, target):
    with pytest.raises(HostileRequest) as info:
        match(demo_routes, method, target)
    assert info.value.reason == "ambiguous_patient"


def test_same_patient_in_path_and_query_is_fine(demo_routes):
    assert match(demo_routes, "GET", "/api/patients/P1/notes?subject=Patient/P1").patient == "P1"


def write_routes(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(body, encoding="utf-8")
    return path


def test_specificity_and_action_override(tmp_path):
    path = write_routes(tmp_path, """
routes:
  - {name: any rest, path: /files/**, methods: [GET], category: portal}
  - {name: any one, path: /files/*, methods: [GET], category: portal}
  - {name: any then report, path: /files/*/report, methods: [GET], category: portal}
  - {name: patient, path: '/files/{patient}', methods: [GET], category: biology}
  - {name: literal, path: /files/index, methods: [GET], category: portal}
  - {name: search, path: /search, methods: [POST], category: portal, action: read}
  - {name: subject search, path: /obs, methods: [GET], category: biology, patient_query: subject}
""")
    table = RouteTable.from_file(path, DEMO_CATEGORIES)
    assert table.match("GET", "/files/index", {}).route_name == "literal"
    assert table.match("GET", "/files/P1", {}).route_name == "patient"
    assert table.match("GET", "/files/P1", {}).patient == "P1"
    assert table.match("GET", "/files/a.b", {}).route_name == "any one"
    assert table.match("GET", "/files/a.b/report", {}).route_name == "any then report"
    assert table.match("GET", "/files/a/b/c", {}).route_name == "any rest"
    search = table.match("POST", "/search", {})
    assert (search.action, search.patient) == ("read", None)
    assert table.match("GET", "/obs", {"subject": ["Patient/P7"]}).patient == "P7"
    assert table.match("GET", "/obs", {"subject": ["P7"]}).patient == "P7"


@pytest.mark.parametrize("body, line, words", [
    ("routes:\n  - {name: a, path: /x, methods: [GET], category: nope}\n", 2, "unknown category 'nope'"),
    ("routes:\n  - {name: a, path: /x/../y, methods: [GET], category: portal}\n", 2, "bad path"),
    ("routes:\n  - {name: a, path: x, methods: [GET], category: portal}\n", 2, "bad path"),
    ("routes:\n  - {name: a, path: /x/**/y, methods: [GET], category: portal}\n", 2, "bad path"),
    ("routes:\n  - {name: a, path: '/x/{patient}/{patient}', methods: [GET], category: biology}\n", 2,
     "bad path"),
    ("routes:\n  - {name: a, path: '/x/{id}', methods: [GET], category: portal}\n", 2, "bad path"),
    ("routes:\n  - {name: a, path: /x, methods: [FETCH], category: portal}\n", 2, "unknown method 'FETCH'"),
    ("routes:\n  - {name: a, path: /x, methods: [GET], category: portal}\n"
     "  - {name: b, path: /x, methods: [POST, GET], category: portal}\n", 3, "already defined"),
    ("public: [/x]\nroutes:\n  - {name: a, path: /x, methods: [GET], category: portal}\n", 3,
     "already defined"),
    ("routes:\n  - {name: a, path: /x, methods: [GET], category: portal}\n"
     "  - {name: a, path: /y, methods: [GET], category: portal}\n", 3, "name is already used"),
    ("routes:\n  - {name: a, path: /x, methods: [GET], category: biology}\n", 2, "needs '{patient}'"),
    ("routes:\n  - {name: a, path: /x, methods: [GET], category: portal, action: delete}\n", 2,
     "unknown action"),
    ("routes:\n  - {name: a, path: /x, methods: [GET], category: portal, colour: red}\n", 2,
     "unknown setting 'colour'"),
    ("routes:\n  - {name: a, path: /x, category: portal}\n", 2, "'methods' is missing"),
    ("routes:\n  - {name: a, path: /x, methods: [GET], category: portal}\n  - name: b\n    path: [/y\n",
     5, "YAML syntax error"),
    ("public: ['/static/{patient}']\nroutes:\n  - {name: a, path: /x, methods: [GET], category: portal}\n",
     1, "public path"),
    ("routes: []\n", 1, "non-empty list"),
    ("rooutes:\n  - {name: a, path: /x, methods: [GET], category: portal}\n", 1, "unknown section"),
    ("routes:\n  - {name: a, path: /x, methods: [GET], category: portal}\nroutes: []\n", 3, "twice"),
])
def test_bad_routes_files(tmp_path, body, line, words):
    path = write_routes(tmp_path, body)
    with pytest.raises(PolicyError) as info:
        RouteTable.from_file(path, DEMO_CATEGORIES)
    error = info.value
    assert error.file == str(path) and error.line == line, str(error)
    assert words in error.message
    assert str(error).startswith(f"{path}:{line}: ")
