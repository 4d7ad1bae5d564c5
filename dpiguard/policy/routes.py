"""Routes: from a normalized path and query to (route, patient, category, action).

Pipeline step 2 (see docs/architecture.md). ``RouteTable`` (loaded from ``policies/routes.yaml``) finds
the route of a request and the patient it is about. Two different patient ids in one request raise
``HostileRequest('ambiguous_patient')``. Path normalisation is in :mod:`dpiguard.policy.paths`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from dpiguard.policy.files import LineDict, LineList, PolicyError, load_yaml, read_policy_file
from dpiguard.policy.paths import HostileRequest

PATIENT_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# Query parameters that name a patient, compared case-insensitively and ignoring FHIR modifiers
# (``subject:Patient``) and chains (``patient.identifier``).
PATIENT_PARAM_NAMES = frozenset({"patient", "patient_id", "subject", "ipp"})

METHOD_ACTIONS = {"GET": "read", "HEAD": "read", "POST": "write", "PUT": "write", "PATCH": "write",
                  "DELETE": "write"}
PUBLIC_METHODS = ("GET", "HEAD")
ACTIONS = ("read", "write")


def _ambiguous(message: str) -> HostileRequest:
    return HostileRequest("ambiguous_patient", message)


# -- routes ----------------------------------------------------------------------------------------
class RouteMatch(NamedTuple):
    """What a request is about: the route, and for protected routes (category, action, patient).

    A named tuple, not a frozen dataclass: one is built per request, and a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__`` (about three times slower)."""

    route_name: str
    public: bool
    category: str | None
    action: str | None
    patient: str | None
    fhir: bool


# Segment kinds, in matching priority (lower = more specific).
LITERAL, PATIENT, ANY_ONE, ANY_REST = 0, 1, 2, 3
_LITERAL_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._~!$&'()+,=:@-]+$")


def _pattern_segments(pattern: str) -> tuple[tuple[int, str], ...]:
    """Split a route pattern into (kind, text) segments; ValueError with a plain message if bad."""
    if not isinstance(pattern, str) or not pattern.startswith("/"):
        raise ValueError("a path must start with '/'")
    if pattern == "/":
        return ()
    if pattern.endswith("/"):
        raise ValueError("a path must not end with '/'")
    segments: list[tuple[int, str]] = []
    parts = pattern[1:].split("/")
    for index, part in enumerate(parts):
        if part == "{patient}":
            segments.append((PATIENT, part))
        elif part == "*":
            segments.append((ANY_ONE, part))
        elif part == "**":
            if index != len(parts) - 1:
                raise ValueError("'**' may only be the last part of a path")
            segments.append((ANY_REST, part))
        elif part == "":
            raise ValueError("a path must not contain '//'")
        elif part.strip(".") == "":
            raise ValueError("a path must not contain '.' or '..' parts")
        elif not _LITERAL_SEGMENT_RE.match(part):
            raise ValueError(f"'{part}' is not allowed in a path (only letters, digits, '-', '.', "
                             "'_', '{patient}', '*' and '**')")
        else:
            segments.append((LITERAL, part))
    if sum(1 for kind, _ in segments if kind == PATIENT) > 1:
        raise ValueError("'{patient}' may appear only once in a path")
    return tuple(segments)


@dataclass(frozen=True)
class Route:
    """One entry of routes.yaml, for one HTTP method."""

    name: str
    pattern: str
    method: str
    public: bool
    category: str | None
    action: str | None
    patient_query: str | None
    fhir: bool
    segments: tuple[tuple[int, str], ...]
    line: int

    @property
    def specificity(self) -> tuple:
        """Sort key: literal < {patient} < * < **, segment by segment; longer wins on a tie."""
        return tuple(kind for kind, _ in self.segments) + (99,)

    def match_path(self, path_segments: list[str]) -> tuple[bool, str | None]:
        """(matched, captured patient id) for an already normalized path."""
        patient = None
        for index, (kind, text) in enumerate(self.segments):
            if kind == ANY_REST:
                return len(path_segments) > index, patient
            if index >= len(path_segments):
                return False, None
            actual = path_segments[index]
            if kind == LITERAL and actual != text:
                return False, None
            if kind == PATIENT:
                if not PATIENT_ID_RE.match(actual):
                    return False, None
                patient = actual
        return len(path_segments) == len(self.segments), patient


def _patient_param_values(query: Mapping[str, list[str]], extra_name: str | None) -> list[tuple[str, str]]:
    """All (parameter name, value) pairs of the query that name a patient."""
    names = PATIENT_PARAM_NAMES | ({extra_name.lower()} if extra_name else set())
    found = []
    for key, values in query.items():
        base = re.split(r"[:.]", key, maxsplit=1)[0].lower()
        if base in names:
            found.extend((key, value) for value in values)
    return found


def _patient_reference(value: str) -> str:
    """``Patient/P1`` (FHIR reference) -> ``P1``; other values unchanged."""
    return value[len("Patient/"):] if value.startswith("Patient/") else value


def _resolve_patient(route: Route, captured: str | None, query: Mapping[str, list[str]]) -> str | None:
    """The one patient of the request, or HostileRequest('ambiguous_patient'), or None if none."""
    if not query:  # nothing in the query can name a patient, or another one
        return captured
    pairs = _patient_param_values(query, route.patient_query)
    for key, value in pairs:
        if "," in value:
            raise _ambiguous(f"query parameter {key!r} lists several patients")
    if len(pairs) > 1:
        raise _ambiguous("the query names a patient more than once")
    if captured is not None:
        if pairs and _patient_reference(pairs[0][1]) != captured:
            raise _ambiguous("the query names another patient than the path")
        return captured
    if route.patient_query is None or not pairs:
        return None
    key, value = pairs[0]
    if key != route.patient_query:
        return None  # only the parameter named by the route may carry the patient
    patient = _patient_reference(value)
    return patient if PATIENT_ID_RE.match(patient) else None


class RouteTable:
    """The routes of routes.yaml, sorted most specific first. Immutable once built."""

    def __init__(self, routes: Iterable[Route], patient_bound: Mapping[str, bool]):
        self._routes = tuple(sorted(routes, key=lambda r: (r.specificity, r.line)))
        self._patient_bound = dict(patient_bound)
        self._candidates = _candidates(self._routes)

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    @classmethod
    def from_file(cls, path: str | Path, known_categories: Mapping[str, bool]) -> RouteTable:
        """Load and validate routes.yaml. ``known_categories``: category name -> patient_bound."""
        _, text = read_policy_file(path)
        return cls.from_text(text, path, known_categories)

    @classmethod
    def from_text(cls, text: str, label: str | Path, known_categories: Mapping[str, bool]) -> RouteTable:
        return cls(_RouteFileReader(label, known_categories).read(text), known_categories)

    def match(self, method: str, path: str, query: Mapping[str, list[str]]) -> RouteMatch | None:
        """The route of a normalized request, or None (refused as ``no_route`` by the caller)."""
        path_segments = [] if path == "/" else path[1:].split("/")
        by_first = self._candidates.get(method)
        if by_first is None:
            return None
        by_literal, others = by_first
        for route in by_literal.get(path_segments[0], others) if path_segments else others:
            matched, captured = route.match_path(path_segments)
            if not matched:
                continue
            if route.public:
                return RouteMatch(route.name, True, None, None, None, False)
            patient = _resolve_patient(route, captured, query)
            if patient is None and self._patient_bound.get(route.category, True):
                return None
            return RouteMatch(route.name, False, route.category, route.action, patient, route.fhir)
        return None


def _candidates(routes: tuple[Route, ...]) -> dict[str, tuple[dict[str, tuple[Route, ...]], tuple[Route, ...]]]:
    """Per method: (for each literal first segment of its routes, the routes that can match a path
    beginning with it; the routes that can match any other path, "/" included), each in table order.

    A route is left out of a list only when no path the list serves can match it: its first segment is a
    literal other than the path's (or, for "/", it has a first segment at all). So the first route of a
    list that matches is the first route of the table that matches (tests/test_fast_paths.py compares
    the two)."""
    out = {}
    for method in {r.method for r in routes}:
        mine = tuple(r for r in routes if r.method == method)
        others = tuple(r for r in mine if not r.segments or r.segments[0][0] != LITERAL)
        by_literal = {lit: tuple(r for r in mine if r in others or r.segments[0][1] == lit)
                      for lit in {r.segments[0][1] for r in mine if r not in others}}
        out[method] = (by_literal, others)
    return out


class _RouteFileReader:
    """Validates the content of routes.yaml and turns it into Route objects."""

    ROUTE_KEYS = {"name", "path", "methods", "category", "action", "patient_query", "fhir"}
    REQUIRED_KEYS = ("name", "path", "methods", "category")

    def __init__(self, label: str | Path, known_categories: Mapping[str, bool]):
        self.label = str(label)
        self.known_categories = known_categories
        self.seen: dict[tuple[str, str], tuple[int, str]] = {}
        self.names: dict[str, int] = {}

    def fail(self, line: int | None, message: str) -> PolicyError:
        return PolicyError(self.label, line, message)

    def read(self, text: str) -> list[Route]:
        data = load_yaml(text, self.label)
        unknown = set(data) - {"public", "routes"}
        if unknown:
            key = sorted(map(str, unknown))[0]
            raise self.fail(data.line_of(key), f"unknown section {key!r} (expected 'public' and 'routes')")
        if "routes" not in data:
            raise self.fail(None, "the 'routes' section is missing")
        routes: list[Route] = []
        public = data.get("public")
        if public is not None and not isinstance(public, LineList):
            raise self.fail(data.line_of("public"), "'public' must be a list of paths")
        for pattern, line in zip(public or [], public.item_lines if public else []):
            routes.extend(self.public_routes(pattern, line))
        entries = data["routes"]
        if not isinstance(entries, LineList) or not entries:
            raise self.fail(data.line_of("routes"), "'routes' must be a non-empty list of routes")
        for number, (entry, line) in enumerate(zip(entries, entries.item_lines), start=1):
            routes.extend(self.protected_routes(number, entry, line))
        return routes

    def segments(self, pattern: Any, line: int, what: str):
        try:
            return _pattern_segments(pattern)
        except ValueError as exc:
            raise self.fail(line, f"{what}: bad path {pattern!r}: {exc}") from None

    def register(self, pattern: str, method: str, line: int, what: str) -> None:
        key = (pattern, method)
        if key in self.seen:
            first_line, first_what = self.seen[key]
            raise self.fail(line, f"{what}: {method} {pattern} is already defined by {first_what} "
                                  f"(line {first_line})")
        self.seen[key] = (line, what)

    def public_routes(self, pattern: Any, line: int) -> list[Route]:
        what = f"public path {pattern!r}"
        segments = self.segments(pattern, line, what)
        if any(kind == PATIENT for kind, _ in segments):
            raise self.fail(line, f"{what}: a public path cannot contain '{{patient}}'")
        routes = []
        for method in PUBLIC_METHODS:
            self.register(pattern, method, line, what)
            routes.append(Route(f"public {pattern}", pattern, method, True, None, None, None, False,
                                segments, line))
        return routes

    def protected_routes(self, number: int, entry: Any, line: int) -> list[Route]:
        if not isinstance(entry, LineDict):
            raise self.fail(line, f"route #{number}: expected 'name:', 'path:', 'methods:'...")
        what = f"route #{number}" + (f" {entry['name']!r}" if isinstance(entry.get("name"), str) else "")
        for key in entry:
            if key not in self.ROUTE_KEYS:
                raise self.fail(entry.line_of(key), f"{what}: unknown setting {key!r} "
                                                    f"(allowed: {', '.join(sorted(self.ROUTE_KEYS))})")
        for key in self.REQUIRED_KEYS:
            if key not in entry:
                raise self.fail(line, f"{what}: the setting {key!r} is missing")
        name = entry["name"]
        if not isinstance(name, str) or not name.strip():
            raise self.fail(entry.line_of("name"), f"{what}: 'name' must be a text")
        if name in self.names:
            raise self.fail(entry.line_of("name"), f"{what}: the name is already used on line "
                                                   f"{self.names[name]}")
        self.names[name] = entry.line_of("name")
        pattern = entry["path"]
        segments = self.segments(pattern, entry.line_of("path"), what)
        category = entry["category"]
        if not isinstance(category, str) or category not in self.known_categories:
            raise self.fail(entry.line_of("category"), f"{what}: unknown category {category!r} "
                                                       "(categories are declared in categories.yaml)")
        action = entry.get("action")
        if action is not None and action not in ACTIONS:
            raise self.fail(entry.line_of("action"), f"{what}: unknown action {action!r} "
                                                     "(use read or write)")
        patient_query = entry.get("patient_query")
        if patient_query is not None and (not isinstance(patient_query, str)
                                          or not re.match(r"^[A-Za-z_][A-Za-z0-9_-]*$", patient_query)):
            raise self.fail(entry.line_of("patient_query"), f"{what}: 'patient_query' must be the "
                                                            "name of a query parameter")
        has_patient = patient_query is not None or any(kind == PATIENT for kind, _ in segments)
        if self.known_categories[category] and not has_patient:
            raise self.fail(line, f"{what}: category {category!r} is about one patient, so the path "
                                  "needs '{patient}' or the route needs 'patient_query'")
        fhir = entry.get("fhir", False)
        if not isinstance(fhir, bool):
            raise self.fail(entry.line_of("fhir"), f"{what}: 'fhir' must be true or false")
        methods = entry["methods"]
        if not isinstance(methods, LineList) or not methods:
            raise self.fail(entry.line_of("methods"), f"{what}: 'methods' must be a list like [GET]")
        routes = []
        for method in methods:
            if not isinstance(method, str) or method not in METHOD_ACTIONS:
                raise self.fail(entry.line_of("methods"), f"{what}: unknown method {method!r} "
                                                          f"(allowed: {', '.join(METHOD_ACTIONS)})")
            self.register(pattern, method, line, what)
            routes.append(Route(name, pattern, method, False, category, action or METHOD_ACTIONS[method],
                                patient_query, fhir, segments, line))
        return routes
