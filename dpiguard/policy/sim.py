"""Decision simulation for security officers: ``dpiguard policy test | explain | diff``.

Nothing here re-implements the decision. A simulated request goes through the very functions the
proxy uses (:func:`dpiguard.pipeline.map_request`, :func:`~dpiguard.pipeline.authorize`,
:func:`~dpiguard.pipeline.needs_care_team`) and the care team is decided by
:func:`dpiguard.careteam.compute_membership`, fed either with an in-memory fixture (units, stays,
assignments written in a test file) or with the live care team read from Redis. Only the login step
is skipped: the simulated user is taken as logged in with the roles given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson

from dpiguard.careteam.membership import Membership, compute_membership
from dpiguard.policy.evaluate import KNOWN_METHODS, authorize, map_request, needs_care_team, parse_target
from dpiguard.policy.files import LineDict, LineList, PolicyError, load_yaml, read_policy_file
from dpiguard.policy.paths import HostileRequest
from dpiguard.policy.routes import ACTIONS, RouteMatch
from dpiguard.policy.snapshot import PolicySet
from dpiguard.policy.table import CATEGORIES_FILE, POLICY_FILE, ROUTES_FILE
from dpiguard.times import parse_time

DEFAULT_GRACE = 86400.0
# Care-team situations of the `policy diff` grid.
SITUATIONS = ("unit_stay", "assignment", "not_in_team")

#: A care-team source: (user, user's units, patient, now) -> Membership.
CareTeamSource = Callable[[str, tuple[str, ...], str, float], Membership]


# -- the simulated decision -------------------------------------------------------------------------
@dataclass
class Decision:
    outcome: str  # "allow" | "deny"
    reason: str  # a refusal reason of docs/architecture.md, or "allowed" / "public"
    message: str = ""
    method: str | None = None
    target: str | None = None
    route: str | None = None
    route_line: int | None = None
    category: str | None = None
    action: str | None = None
    patient: str | None = None
    roles: tuple[str, ...] = ()
    granting_rules: list[tuple[str, int | None]] = field(default_factory=list)  # (role, policy.csv line)
    care_team_required: bool | None = None
    care_team: str | None = None  # membership source (unit:X stay:S, assignment:KIND) or "none"
    policy_version: str = ""

    @property
    def allowed(self) -> bool:
        return self.outcome == "allow"


def parse_request_line(line: str) -> tuple[str, str]:
    """``"GET /api/patients/P1/notes"`` (an optional trailing ``HTTP/1.1`` is ignored) → (method, target)."""
    parts = line.strip().split()
    if len(parts) == 3 and parts[2].upper().startswith("HTTP/"):
        parts = parts[:2]
    if len(parts) != 2 or not parts[1].startswith("/"):
        raise ValueError(f"a request is written 'METHOD /path', e.g. 'GET /api/patients/P1/notes', not {line!r}")
    return parts[0].upper(), parts[1]


def _route_line(policy: PolicySet, name: str) -> int | None:
    for route in policy.routes.routes:
        if route.name == name:
            return route.line
    return None


# -- FHIR requests: mapped by the same analyzer as the proxy (policies/fhir.yaml) ---------------------
def map_any(policy: PolicySet, method: str, target: str) -> RouteMatch | None:
    """Like pipeline.map_request, but FHIR addresses go through the FHIR analyzer as in the proxy.

    Raises HostileRequest, or FhirRefusal for a FHIR request the proxy refuses before forwarding. A FHIR
    search without patient gives a match without patient (the proxy filters the answer)."""
    from dpiguard.fhir.compartment import FhirRefusal, analyze

    fhir = policy.fhir
    if fhir is not None:
        path, query, _ = parse_target(target)
        if fhir.owns(path):
            freq = analyze(method, fhir.segments(path), query, types=fhir.types,
                           allowed_params=fhir.allow_parameters, operations=fhir.operations)
            rule = fhir.types.get(freq.resource_type or "")
            if rule is None:
                raise FhirRefusal("fhir_not_supported", "no resource type in this FHIR request")
            if not freq.patients and freq.interaction == "search" and rule.search == "refuse":
                raise FhirRefusal("fhir_search_not_scoped",
                                  f"a {freq.resource_type} search must name the patient (patient=...)")
            if len(freq.patients) > 1:
                raise FhirRefusal("fhir_not_supported", "the simulator decides one patient at a time")
            patient = freq.patients[0] if freq.patients else None
            return RouteMatch(route_name=f"FHIR {freq.interaction} {freq.resource_type} (fhir.yaml)",
                              public=False, category=rule.category, action=freq.action, patient=patient,
                              fhir=True)
    match, _, _ = map_request(policy, method, target)
    return match


def decide_request(policy: PolicySet, roles: Iterable[str], method: str, target: str, *, user: str,
                   units: tuple[str, ...], careteam: CareTeamSource, now: float) -> Decision:
    """Decide a raw request line as the proxy would for a logged-in user with ``roles``."""
    roles = tuple(roles)
    d = Decision("deny", "", method=method, target=target, roles=roles, policy_version=policy.version)
    if method not in KNOWN_METHODS:
        d.reason, d.message = "method_not_allowed", f"method {method!r} is not allowed"
        return d
    from dpiguard.fhir.compartment import FhirRefusal

    try:
        match = map_any(policy, method, target)
    except (HostileRequest, FhirRefusal) as exc:
        d.reason, d.message = exc.reason, exc.message
        return d
    if match is not None and match.public:
        d.outcome, d.reason, d.route = "allow", "public", match.route_name
        d.message = "public address: no login, no patient data"
        return d
    if match is None:
        d.reason, d.message = "no_route", "no route of routes.yaml matches this address (or it names no patient)"
        return d
    return decide_match(policy, roles, match, user=user, units=units, careteam=careteam, now=now, decision=d)


def decide_match(policy: PolicySet, roles: Iterable[str], match: RouteMatch, *, user: str, units: tuple[str, ...],
                 careteam: CareTeamSource, now: float, decision: Decision | None = None) -> Decision:
    """Steps 4 and 5 (permission, care team) for an already mapped request."""
    roles = tuple(roles)
    d = decision or Decision("deny", "", roles=roles, policy_version=policy.version)
    d.route, d.category, d.action, d.patient = match.route_name, match.category, match.action, match.patient
    d.route_line = _route_line(policy, match.route_name) if match.route_name else None
    d.granting_rules = [(role, policy.table.rule_lines.get((role, match.category, match.action)))
                        for role in roles if policy.permits([role], match.category, match.action)]
    refusal = authorize(policy, roles, match)
    if refusal is not None:
        d.reason, d.message = refusal
        return d
    d.care_team_required = needs_care_team(policy, match)
    if d.care_team_required:
        membership = careteam(user, units, match.patient, now)
        d.care_team = membership.source
        if not membership.member:
            d.reason, d.message = "not_in_care_team", "you are not in this patient's care team"
            return d
    d.outcome, d.reason = "allow", "allowed"
    return d


def decide_category(policy: PolicySet, roles: Iterable[str], category: str, action: str, patient: str | None, *,
                    user: str, units: tuple[str, ...], careteam: CareTeamSource, now: float) -> Decision:
    """Decide (category, action, patient) without an address: as if a route mapped the request so."""
    if category not in policy.categories:
        d = Decision("deny", "unknown_category", roles=tuple(roles), category=category, action=action,
                     patient=patient, policy_version=policy.version)
        d.message = f"category {category!r} is not declared in {CATEGORIES_FILE}"
        return d
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r} (use read or write)")
    match = RouteMatch("", False, category, action, patient, False)
    return decide_match(policy, roles, match, user=user, units=units, careteam=careteam, now=now)


# -- care-team fixture (in memory) ------------------------------------------------------------------
@dataclass
class Fixture:
    """Units, users and patients of a test file, in the form Redis would return them."""

    users: dict[str, dict] = field(default_factory=dict)  # login -> {"roles": (...), "units": (...)}
    stays: dict[str, dict[str, bytes]] = field(default_factory=dict)  # patient -> stay id -> json
    assignments: dict[str, dict[str, bytes]] = field(default_factory=dict)  # patient -> login -> json
    grace: float = DEFAULT_GRACE

    def careteam(self, user: str, units: tuple[str, ...], patient: str, now: float) -> Membership:
        user_units = {unit.upper(): "|" for unit in units}
        return compute_membership(user_units, self.stays.get(patient, {}),
                                  self.assignments.get(patient, {}).get(user), now, self.grace)


def live_careteam(store) -> CareTeamSource:
    """The care team as the proxy sees it (Redis, through CareTeamStore.membership)."""

    def source(user: str, units: tuple[str, ...], patient: str, now: float) -> Membership:
        return store.membership(user, patient, now)

    return source


def situation_careteam(unit_stay: bool = False, assignment: str | None = None,
                       discharged_seconds_ago: float | None = None) -> CareTeamSource:
    """A one-patient care team for `explain`/`diff`: patient staying in the user's first unit (or not),
    assigned to the user (or not)."""

    def source(user: str, units: tuple[str, ...], patient: str, now: float) -> Membership:
        stays: dict[str, bytes] = {}
        if unit_stay:
            unit = units[0] if units else "UNIT-A"
            end = None if discharged_seconds_ago is None else now - discharged_seconds_ago
            stays["S1"] = orjson.dumps({"unit": unit, "start": now - 2 * 86400, "end": end})
        raw_assign = None
        if assignment:
            raw_assign = orjson.dumps({"kind": assignment, "start": None, "end": None})
        return compute_membership({u.upper(): "|" for u in (units or ("UNIT-A",))}, stays, raw_assign, now,
                                  DEFAULT_GRACE)

    return source


# -- test files -------------------------------------------------------------------------------------
class TestFileError(ValueError):
    """A decision-test file is invalid; ``str()`` reads ``file:line: message``."""
    __test__ = False  # not a pytest test class

    def __init__(self, file: str, line: int | None, message: str):
        self.file, self.line, self.message = file, line, message
        super().__init__(f"{file}:{line}: {message}" if line else f"{file}: {message}")


def parse_when(value: Any, now: float, label: str, line: int) -> float | None:
    """A time in a test file: null, epoch seconds, ISO date/time (UTC), or relative
    ``-2d``, ``-3h``, ``+1h``, ``-30m`` (from the test's ``now``)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text == "now":
            return now
        if text[:1] in "+-" and text[-1:] in "dhms" and text[1:-1].replace(".", "", 1).isdigit():
            factor = {"d": 86400, "h": 3600, "m": 60, "s": 1}[text[-1]]
            return now + float(text[:-1]) * factor
        try:
            return parse_time(text, now=now)
        except ValueError:
            pass
    raise TestFileError(label, line, f"not a time: {value!r} (use 2026-03-01T08:00, -2d, -3h or now)")


@dataclass
class TestCase:
    __test__ = False  # not a pytest test class
    name: str
    line: int
    user: str
    roles: tuple[str, ...]
    units: tuple[str, ...]
    request: tuple[str, str] | None  # (method, target)
    category: tuple[str, str, str | None] | None  # (category, action, patient)
    expect: str
    reason: str | None


@dataclass
class TestFile:
    __test__ = False  # not a pytest test class
    path: str
    now: float
    fixture: Fixture
    cases: list[TestCase]


def _strs(value: Any, label: str, line: int, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TestFileError(label, line, f"{what}: expected a list like [nurse, doctor]")
    return tuple(value)


def _mapping(**values: Any) -> LineDict:
    """A LineDict built in code (no line numbers of its own)."""
    result = LineDict(values)
    result.line, result.key_lines = 0, {}
    return result


def _check_keys(entry: LineDict, allowed: set[str], label: str, what: str) -> None:
    for key in entry:
        if key not in allowed:
            raise TestFileError(label, entry.line_of(key),
                                f"{what}: unknown setting {key!r} (allowed: {', '.join(sorted(allowed))})")


def load_test_file(path: str | Path, now: float | None = None) -> TestFile:
    """Read and validate a decision-test file (format: docs/policies.md, `policy test`)."""
    label = str(path)
    try:
        _, text = read_policy_file(path)
        data = load_yaml(text, label)
    except PolicyError as exc:
        raise TestFileError(exc.file, exc.line, exc.message) from None
    _check_keys(data, {"now", "grace_hours", "fixture", "cases"}, label, "test file")
    base_now = now if now is not None else datetime.now(timezone.utc).timestamp()
    when = parse_when(data.get("now"), base_now, label, data.line_of("now")) if "now" in data else base_now
    grace = data.get("grace_hours", DEFAULT_GRACE / 3600)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
        raise TestFileError(label, data.line_of("grace_hours"), "grace_hours: expected a number of hours")
    fixture = Fixture(grace=float(grace) * 3600)
    fx = data.get("fixture") or _mapping()
    if not isinstance(fx, LineDict):
        raise TestFileError(label, data.line_of("fixture"), "fixture: expected 'units:', 'users:', 'patients:'")
    _check_keys(fx, {"units", "users", "patients"}, label, "fixture")
    known_units = {u.upper() for u in _strs(fx.get("units", []), label, fx.line_of("units"), "units")}

    def unit_ok(unit: str, line: int) -> str:
        if known_units and unit.upper() not in known_units:
            raise TestFileError(label, line, f"unit {unit!r} is not in the fixture's 'units' list")
        return unit.upper()

    users = fx.get("users") or _mapping()
    if not isinstance(users, LineDict):
        raise TestFileError(label, fx.line_of("users"), "users: expected 'login: {roles: [...], units: [...]}'")
    for login, entry in users.items():
        line = users.line_of(login)
        if not isinstance(entry, LineDict):
            raise TestFileError(label, line, f"user {login!r}: expected 'roles:' and 'units:'")
        _check_keys(entry, {"roles", "units"}, label, f"user {login!r}")
        if "roles" not in entry:
            raise TestFileError(label, line, f"user {login!r}: 'roles' is missing")
        fixture.users[str(login)] = {
            "roles": _strs(entry["roles"], label, entry.line_of("roles"), f"user {login!r} roles"),
            "units": tuple(unit_ok(u, entry.line_of("units"))
                           for u in _strs(entry.get("units", []), label, entry.line_of("units"), "units")),
        }
    patients = fx.get("patients") or _mapping()
    if not isinstance(patients, LineDict):
        raise TestFileError(label, fx.line_of("patients"), "patients: expected 'P1: {stays: [...]}'")
    for patient, entry in patients.items():
        line = patients.line_of(patient)
        patient = str(patient)
        entry = entry if entry is not None else _mapping()
        if not isinstance(entry, LineDict):
            raise TestFileError(label, line, f"patient {patient}: expected 'stays:' and/or 'assignments:'")
        _check_keys(entry, {"stays", "assignments"}, label, f"patient {patient}")
        stays = entry.get("stays") or []
        if not isinstance(stays, list):
            raise TestFileError(label, entry.line_of("stays"), f"patient {patient}: 'stays' must be a list")
        for index, stay in enumerate(stays, start=1):
            sline = stays.item_lines[index - 1] if isinstance(stays, LineList) else line
            if isinstance(stay, str):
                stay = _mapping(unit=stay)
                stay.line = sline
            if not isinstance(stay, LineDict) or "unit" not in stay:
                raise TestFileError(label, sline, f"patient {patient}: a stay is 'UNIT' or {{unit: U, start: ..., end: ...}}")
            _check_keys(stay, {"unit", "start", "end"}, label, f"patient {patient} stay")
            start = parse_when(stay.get("start", "-1d"), when, label, stay.line_of("start"))
            end = parse_when(stay.get("end"), when, label, stay.line_of("end"))
            fixture.stays.setdefault(patient, {})[f"S{index}"] = orjson.dumps(
                {"unit": unit_ok(str(stay["unit"]), sline), "start": start, "end": end})
        assigns = entry.get("assignments") or []
        if not isinstance(assigns, list):
            raise TestFileError(label, entry.line_of("assignments"), f"patient {patient}: 'assignments' must be a list")
        for index, assign in enumerate(assigns, start=1):
            aline = assigns.item_lines[index - 1] if isinstance(assigns, LineList) else line
            if isinstance(assign, str):
                assign = _mapping(user=assign)
                assign.line = aline
            if not isinstance(assign, LineDict) or "user" not in assign:
                raise TestFileError(label, aline, f"patient {patient}: an assignment is 'login' or {{user: login, kind: ...}}")
            _check_keys(assign, {"user", "kind", "start", "end"}, label, f"patient {patient} assignment")
            fixture.assignments.setdefault(patient, {})[str(assign["user"])] = orjson.dumps({
                "kind": str(assign.get("kind", "assigned")),
                "start": parse_when(assign.get("start"), when, label, assign.line_of("start")),
                "end": parse_when(assign.get("end"), when, label, assign.line_of("end"))})
    cases_raw = data.get("cases")
    if not isinstance(cases_raw, LineList) or not cases_raw:
        raise TestFileError(label, data.line_of("cases") if "cases" in data else None,
                            "'cases' must be a non-empty list of tests")
    cases = []
    names: dict[str, int] = {}
    for entry, line in zip(cases_raw, cases_raw.item_lines):
        cases.append(_read_case(entry, line, label, fixture, names))
    return TestFile(label, when, fixture, cases)


def _read_case(entry: Any, line: int, label: str, fixture: Fixture, names: dict[str, int]) -> TestCase:
    if not isinstance(entry, LineDict):
        raise TestFileError(label, line, "a test is 'name:', 'user:', 'request:', 'expect:'...")
    _check_keys(entry, {"name", "user", "roles", "units", "request", "expect", "reason"}, label, "test")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise TestFileError(label, line, "each test needs a 'name'")
    if name in names:
        raise TestFileError(label, entry.line_of("name"), f"test name {name!r} already used on line {names[name]}")
    names[name] = entry.line_of("name")
    what = f"test {name!r}"
    user = entry.get("user")
    if user is not None and (not isinstance(user, str) or user not in fixture.users) and "roles" not in entry:
        raise TestFileError(label, entry.line_of("user"), f"{what}: user {user!r} is not in the fixture "
                                                           "(add it under fixture/users, or give 'roles:')")
    if user is None and "roles" not in entry:
        raise TestFileError(label, line, f"{what}: give 'user:' (from the fixture) or 'roles:'")
    known = fixture.users.get(user or "", {})
    roles = (_strs(entry["roles"], label, entry.line_of("roles"), f"{what} roles") if "roles" in entry
             else known.get("roles", ()))
    units = (tuple(u.upper() for u in _strs(entry["units"], label, entry.line_of("units"), f"{what} units"))
             if "units" in entry else known.get("units", ()))
    request = entry.get("request")
    req_line = category = None
    if isinstance(request, str):
        try:
            req_line = parse_request_line(request)
        except ValueError as exc:
            raise TestFileError(label, entry.line_of("request"), f"{what}: {exc}") from None
    elif isinstance(request, LineDict):
        _check_keys(request, {"patient", "category", "action"}, label, f"{what} request")
        if "category" not in request:
            raise TestFileError(label, entry.line_of("request"), f"{what}: request needs 'category:'")
        action = request.get("action", "read")
        if action not in ACTIONS:
            raise TestFileError(label, request.line_of("action"), f"{what}: action must be read or write")
        patient = request.get("patient")
        category = (str(request["category"]), action, None if patient is None else str(patient))
    else:
        raise TestFileError(label, entry.line_of("request") if "request" in entry else line,
                            f"{what}: 'request' is 'GET /path' or {{patient: P1, category: biology, action: read}}")
    expect = entry.get("expect")
    if expect not in ("allow", "deny"):
        raise TestFileError(label, entry.line_of("expect") if "expect" in entry else line,
                            f"{what}: 'expect' must be allow or deny")
    reason = entry.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise TestFileError(label, entry.line_of("reason"), f"{what}: 'reason' must be a reason code")
    return TestCase(name, line, user or "test.user", roles, units, req_line, category, expect, reason)


def run_case(policy: PolicySet, test: TestFile, case: TestCase) -> Decision:
    if case.request is not None:
        method, target = case.request
        return decide_request(policy, case.roles, method, target, user=case.user, units=case.units,
                              careteam=test.fixture.careteam, now=test.now)
    category, action, patient = case.category
    return decide_category(policy, case.roles, category, action, patient, user=case.user, units=case.units,
                           careteam=test.fixture.careteam, now=test.now)


def case_failure(case: TestCase, decision: Decision) -> str | None:
    """None if the decision is the expected one, else a sentence saying what differs."""
    if decision.outcome != case.expect:
        return f"expected {case.expect.upper()}, got {decision.outcome.upper()} ({decision.reason})"
    if case.reason is not None and decision.reason != case.reason:
        return f"expected reason {case.reason}, got {decision.reason}"
    return None


# -- explanation ------------------------------------------------------------------------------------
def explain_lines(policy: PolicySet, d: Decision) -> list[str]:
    """A decision in plain sentences, naming the files and lines involved."""
    out = [f"decision:    {d.outcome.upper()} ({d.reason})" + (f": {d.message}" if d.message else "")]
    out.append(f"policy:      version {policy.version} ({policy.directory})")
    if d.target is not None:
        out.append(f"request:     {d.method} {d.target}")
    if d.route:
        where = f" ({policy.file(ROUTES_FILE)}:{d.route_line})" if d.route_line else ""
        out.append(f"route:       '{d.route}'{where}")
    elif d.target is not None and d.reason in ("no_route", "hostile_path", "ambiguous_patient", "method_not_allowed"):
        out.append(f"route:       none ({d.reason})")
        return out
    if d.reason == "public":
        return out
    if d.category:
        out.append(f"data:        category {d.category}, action {d.action}, patient {d.patient or '-'}")
    if d.reason == "unknown_category":
        return out
    roles = ", ".join(d.roles) or "(none)"
    if d.granting_rules:
        rules = "; ".join(f"p, {role}, {d.category}, {d.action} ({policy.file(POLICY_FILE)}:{line})"
                          for role, line in d.granting_rules)
        out.append(f"permission:  granted by {rules}")
    else:
        out.append(f"permission:  no rule grants role {roles} action {d.action} on category {d.category} "
                   f"(no line 'p, ROLE, {d.category}, {d.action}' in {policy.file(POLICY_FILE)} for these roles)")
        others = sorted(role for (role, cat, act) in policy.table.permitted if cat == d.category and act == d.action)
        out.append(f"             roles that may: {', '.join(others) or 'none'}")
        return out
    if d.reason == "no_route":
        out.append("care team:   the category needs the care team but the request names no patient")
        return out
    if d.care_team_required is False:
        out.append(f"care team:   not required for {d.category} ({policy.file(CATEGORIES_FILE)}:"
                   f"{policy.table.category_lines.get(d.category, '?')}: care_team_required: false)")
    elif d.care_team:
        if d.care_team == "none":
            out.append(f"care team:   MISSING: no stay of patient {d.patient} in a unit of the user, "
                       "and no assignment of the user to the patient (within the grace period after discharge)")
        elif d.care_team.startswith("assignment:"):
            out.append(f"care team:   member by explicit assignment ({d.care_team.split(':', 1)[1]})")
        else:
            out.append(f"care team:   member by unit stay ({d.care_team})")
    return out


# -- diff -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    what: str  # "decision" | "route"
    key: tuple
    old: str
    new: str


def diff_policies(old: PolicySet, new: PolicySet) -> list[Change]:
    """Decisions that differ between two policies over roles x categories x actions x care-team
    situations, and addresses whose mapping (category, action, public) differs."""
    changes: list[Change] = []
    roles = sorted(set(old.roles) | set(new.roles))
    categories = sorted(set(old.categories) | set(new.categories))
    situations = {
        "unit_stay": situation_careteam(unit_stay=True),
        "assignment": situation_careteam(assignment="referring_physician"),
        "not_in_team": situation_careteam(),
    }
    now = 1_767_225_600.0  # fixed: the grid does not depend on the day it runs
    for role in roles:
        for category in categories:
            for action in ACTIONS:
                for name, source in situations.items():
                    results = []
                    for policy in (old, new):
                        if role not in policy.roles:
                            results.append("deny (role not declared)")
                            continue
                        d = decide_category(policy, [role], category, action, "P1", user="u", units=("UNIT-A",),
                                            careteam=source, now=now)
                        results.append(f"{d.outcome} ({d.reason})")
                    if results[0] != results[1]:
                        changes.append(Change("decision", (role, category, action, name), *results))
    for method, path in sorted(_example_requests(old) | _example_requests(new)):
        mapped = [_mapped_as(policy, method, path) for policy in (old, new)]
        if mapped[0] != mapped[1]:
            changes.append(Change("route", (method, path), *mapped))
    return changes


def _example_requests(policy: PolicySet) -> set[tuple[str, str]]:
    from dpiguard.policy.routes import ANY_ONE, ANY_REST, PATIENT

    out = set()
    for route in policy.routes.routes:
        parts = []
        for kind, text in route.segments:
            parts.append({PATIENT: "P1", ANY_ONE: "x", ANY_REST: "x"}.get(kind, text))
        path = "/" + "/".join(parts)
        if route.patient_query:
            path += f"?{route.patient_query}=P1"
        out.add((route.method, path))
    return out


def _mapped_as(policy: PolicySet, method: str, target: str) -> str:
    from dpiguard.fhir.compartment import FhirRefusal

    try:
        match = map_any(policy, method, target)
    except (HostileRequest, FhirRefusal) as exc:
        return exc.reason
    if match is None:
        return "no route"
    if match.public:
        return "public"
    return f"{match.category} {match.action}"
