"""HTTP mapping: from a raw request target to (route, patient, category, action).

Pipeline step 2 (see docs/architecture.md). Three jobs, all strict and fail-closed:

* ``normalize_path`` turns the raw path into one canonical form, or refuses it
  (``HostileRequest('hostile_path')``) when it contains anything a back end could read differently
  from us: dot segments, encoded slashes, backslashes, control characters, double encoding...
  We never try to "repair" such a path.
* ``parse_query`` decodes the query string with size limits.
* ``RouteTable`` (loaded from ``policies/routes.yaml``) finds the route of a request and the patient
  it is about. Two different patient ids in one request raise ``HostileRequest('ambiguous_patient')``.

This module also hosts ``PolicyError`` and the small file/YAML readers shared with ``policy.py``
(``policy.py`` imports this module, so they live here to avoid an import cycle).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "PolicyError", "HostileRequest", "normalize_path", "parse_query", "RouteMatch", "Route",
    "RouteTable", "read_policy_file", "load_yaml",
]

MAX_PATH_BYTES = 2048
MAX_QUERY_BYTES = 4096
MAX_QUERY_PARAMS = 100

PATIENT_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# Query parameters that name a patient, compared case-insensitively and ignoring FHIR modifiers
# (``subject:Patient``) and chains (``patient.identifier``).
PATIENT_PARAM_NAMES = frozenset({"patient", "patient_id", "subject", "ipp"})

METHOD_ACTIONS = {"GET": "read", "HEAD": "read", "POST": "write", "PUT": "write", "PATCH": "write",
                  "DELETE": "write"}
PUBLIC_METHODS = ("GET", "HEAD")
ACTIONS = ("read", "write")

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters allowed raw in a path: RFC 3986 pchar + "/" + "%", minus ";" (servlet containers read
# "..;/" as ".." - a classic bypass), so no other character may appear unencoded.
_RAW_PATH_CHARS = _UNRESERVED | frozenset("!$&'()*+,=:@/%")
_HEX = frozenset("0123456789abcdefABCDEF")
# Bytes refused even when percent-encoded: "/" and "\" (segment confusion), ";" (see above).
_FORBIDDEN_ENCODED = {0x2F: "encoded slash", 0x5C: "encoded backslash", 0x3B: "encoded semicolon"}


# -- errors ----------------------------------------------------------------------------------------
class PolicyError(Exception):
    """A policy file is unreadable or invalid. ``str()`` reads ``file:line: message``."""

    def __init__(self, file: str | Path, line: int | None, message: str):
        self.file = str(file)
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


class HostileRequest(Exception):
    """The request is refused before any routing; ``reason`` is a refusal reason of the pipeline."""

    REASONS = ("hostile_path", "ambiguous_patient")

    def __init__(self, reason: str, message: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        self.reason = reason
        self.message = message
        super().__init__(message)


def _hostile(message: str) -> HostileRequest:
    return HostileRequest("hostile_path", message)


def _ambiguous(message: str) -> HostileRequest:
    return HostileRequest("ambiguous_patient", message)


# -- path normalization ----------------------------------------------------------------------------
def _decode_segment(raw: str) -> tuple[str, str]:
    """Return (canonical, fully decoded) forms of one raw segment, or raise HostileRequest.

    The canonical form decodes unreserved characters and upper-cases the remaining escapes.
    """
    canonical: list[str] = []
    decoded = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char != "%":
            canonical.append(char)
            decoded.append(ord(char))
            i += 1
            continue
        pair = raw[i + 1:i + 3]
        if len(pair) != 2 or not set(pair) <= _HEX:
            raise _hostile("invalid percent-encoding in path")
        byte = int(pair, 16)
        if byte == 0x25 and len(raw) >= i + 5 and set(raw[i + 3:i + 5]) <= _HEX:
            raise _hostile("double percent-encoding in path")
        if byte < 0x20 or byte == 0x7F:
            raise _hostile("encoded control character in path")
        if byte in _FORBIDDEN_ENCODED:
            raise _hostile(f"{_FORBIDDEN_ENCODED[byte]} in path")
        canonical.append(chr(byte) if chr(byte) in _UNRESERVED else f"%{byte:02X}")
        decoded.append(byte)
        i += 3
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise _hostile("path is not valid UTF-8 once decoded") from None
    return "".join(canonical), text


def _check_decoded_segment(text: str) -> None:
    if text.strip(".") == "":
        raise _hostile("dot segment in path")
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf"):
            raise _hostile("control or invisible character in path")
    folded = unicodedata.normalize("NFKC", text)
    if folded != text and any(c in folded for c in "./\\;%"):
        raise _hostile("look-alike of '.', '/', '\\', ';' or '%' in path")


# Paths made only of segments of unreserved ASCII characters that do not start with "." (so no dot
# segment, nothing to decode or fold): their canonical form is themselves, minus one trailing "/".
# Nearly every real request is one; anything else takes the full check below.
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)+/?")


def normalize_path(raw: str) -> str:
    """Canonical form of a request path (without query), or HostileRequest('hostile_path').

    The result starts with "/", has no trailing "/" (except "/" itself), no empty or dot segment,
    and unreserved characters percent-decoded (``%41`` -> ``A``); other escapes are kept, upper-cased.
    """
    if len(raw) <= MAX_PATH_BYTES and _PLAIN_PATH.fullmatch(raw):
        return raw[:-1] if raw.endswith("/") else raw
    return _normalize_path_full(raw)


def _normalize_path_full(raw: str) -> str:
    if not raw.startswith("/"):
        raise _hostile("path must start with '/'")
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise _hostile("path too long")
    for char in raw:
        if char not in _RAW_PATH_CHARS:
            if char == "\\":
                raise _hostile("backslash in path")
            if ord(char) < 0x20 or ord(char) == 0x7F:
                raise _hostile("control character in path")
            raise _hostile(f"character {char!r} not allowed unencoded in path")
    if raw == "/":
        return "/"
    segments = raw[1:].split("/")
    if segments[-1] == "":
        segments.pop()  # one trailing slash is dropped: /patients/P1/ == /patients/P1
    canonical: list[str] = []
    for segment in segments:
        if segment == "":
            raise _hostile("empty path segment ('//')")
        canon, text = _decode_segment(segment)
        _check_decoded_segment(text)
        canonical.append(canon)
    return "/" + "/".join(canonical)


# -- query -----------------------------------------------------------------------------------------
def _decode_query_part(raw: str) -> str:
    data = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "%":
            pair = raw[i + 1:i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise _hostile("invalid percent-encoding in query")
            data.append(int(pair, 16))
            i += 3
            continue
        if ord(char) > 0x7E:
            raise _hostile("non-ASCII character not encoded in query")
        data.extend(b" " if char == "+" else char.encode("ascii"))
        i += 1
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _hostile("query is not valid UTF-8 once decoded") from None
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise _hostile("control character in query")
    return text


def parse_query(raw_query: str) -> dict[str, list[str]]:
    """Decode ``a=1&b=2&a=3`` into ``{"a": ["1", "3"], "b": ["2"]}`` (``+`` is a space).

    Refused (``hostile_path``) beyond 4096 bytes or 100 parameters, or on bad encoding.
    """
    if len(raw_query.encode("utf-8", "surrogatepass")) > MAX_QUERY_BYTES:
        raise _hostile("query string too long")
    result: dict[str, list[str]] = {}
    pieces = [piece for piece in raw_query.split("&") if piece]
    if len(pieces) > MAX_QUERY_PARAMS:
        raise _hostile("too many query parameters")
    for piece in pieces:
        raw_name, _, raw_value = piece.partition("=")
        result.setdefault(_decode_query_part(raw_name), []).append(_decode_query_part(raw_value))
    return result


# -- policy file readers (shared with policy.py) ---------------------------------------------------
def read_policy_file(path: str | Path) -> tuple[bytes, str]:
    """Read a policy file: (raw bytes, text). PolicyError if unreadable, empty or not UTF-8."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError(path, None, f"cannot read file ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise PolicyError(path, line, "file is not valid UTF-8 text (save it as UTF-8)") from None
    if not text.strip():
        raise PolicyError(path, None, "file is empty")
    return data, text


class LineDict(dict):
    """A YAML mapping that remembers its line and the line of each key."""

    line: int = 0
    key_lines: dict

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class LineList(list):
    """A YAML sequence that remembers its line and the line of each item."""

    line: int = 0
    item_lines: list


class _LineLoader(yaml.SafeLoader):
    """Safe YAML loader that records line numbers and refuses duplicate keys."""

    label = ""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            duplicate = key in result
        except TypeError:
            raise PolicyError(loader.label, line, "this key is not a simple name") from None
        if duplicate:
            raise PolicyError(loader.label, line,
                              f"{key!r} is written twice (first on line {result.key_lines[key]})")
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


def load_yaml(text: str, label: str | Path) -> LineDict:
    """Parse a YAML policy file whose top level must be a mapping; errors name file and line."""
    loader = _LineLoader(text)
    loader.label = str(label)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise PolicyError(label, line, f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(label, None, f"YAML syntax error: {exc}") from None
    finally:
        loader.dispose()
    if data is None:
        raise PolicyError(label, None, "file is empty (only comments)")
    if not isinstance(data, LineDict):
        raise PolicyError(label, 1, "the file must be made of 'name: value' sections")
    return data


# -- routes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RouteMatch:
    """What a request is about: the route, and for protected routes (category, action, patient)."""

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
        for route in self._routes:
            if route.method != method:
                continue
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
