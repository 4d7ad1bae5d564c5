"""Authorization policy: who (role) may do what (read/write) on which data category.

Pipeline step 4 (see docs/architecture.md). The policy lives in four files of one directory
(``policies/`` by default), written by the hospital's security officers (see docs/policies.md):

* ``model.conf``      - the Casbin model: how a request (role, category, action) is compared to rules;
* ``policy.csv``      - the rules, one ``p, role, category, action`` line per permission;
* ``categories.yaml`` - the declared roles and data categories (and which ones need the care team);
* ``routes.yaml``     - which web addresses belong to which category (see ``httpmap.py``).

``Policy.load`` reads each file once, validates everything (any mistake is a ``PolicyError`` naming
the file and line), then asks Casbin once for every role x category x action and keeps the answers
as an immutable set. Deciding a request is then a few set lookups: Casbin never runs per request.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import casbin

from dpiguard.policy.files import LineDict, PolicyError, decode_policy_file, load_yaml, read_policy_file
from dpiguard.policy.routes import ACTIONS, RouteTable

__all__ = ["ACTIONS", "Category", "Policy", "PolicyError", "POLICY_FILES", "COMPANION_FILES", "VERSIONED_FILES"]

MODEL_FILE = "model.conf"
POLICY_FILE = "policy.csv"
CATEGORIES_FILE = "categories.yaml"
ROUTES_FILE = "routes.yaml"
POLICY_FILES = (CATEGORIES_FILE, MODEL_FILE, POLICY_FILE, ROUTES_FILE)
#: Other RSSI files of the same folder, loaded by their own modules (FHIR, emergency access, transversal
#: units, privacy detectors, directory groups, OpenID Connect claims). They are part of the policy version and of hot reload; each is optional.
COMPANION_FILES = ("fhir.yaml", "breakglass.yaml", "careteam.yaml", "privacy.yaml", "directory.yaml", "oidc.yaml")
VERSIONED_FILES = POLICY_FILES + COMPANION_FILES


def read_policy_files(directory: str | Path) -> dict[str, bytes]:
    """The bytes of every versioned file of ``directory``, read once: the four policy files (required)
    and the companion files that exist. PolicyError naming the file if one cannot be read."""
    directory = Path(directory)
    contents: dict[str, bytes] = {}
    for name in VERSIONED_FILES:
        path = directory / name
        if name in COMPANION_FILES and not path.exists():
            continue
        contents[name] = read_policy_file(path)[0]
    return contents

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_CASBIN_LINE_RE = re.compile(r"line (\d+)")


@dataclass(frozen=True)
class Category:
    """A kind of data, declared in categories.yaml."""

    name: str
    description: str
    care_team_required: bool
    patient_bound: bool


# -- categories.yaml -------------------------------------------------------------------------------
class _CategoriesReader:
    """Validates categories.yaml: the ``roles`` and ``categories`` sections."""

    CATEGORY_KEYS = {"description", "care_team_required", "patient_bound"}

    def __init__(self, label: str):
        self.label = label
        self.role_lines: dict[str, int] = {}
        self.category_lines: dict[str, int] = {}

    def fail(self, line: int | None, message: str) -> PolicyError:
        return PolicyError(self.label, line, message)

    def read(self, text: str) -> tuple[dict[str, str], dict[str, Category]]:
        data = load_yaml(text, self.label)
        for key in data:
            if key not in ("roles", "categories"):
                raise self.fail(data.line_of(key), f"unknown section {key!r} "
                                                    "(expected 'roles' and 'categories')")
        for section in ("roles", "categories"):
            if not isinstance(data.get(section), LineDict) or not data[section]:
                raise self.fail(data.line_of(section) if section in data else None,
                                f"the '{section}' section is missing or empty")
        roles = {name: self.role(name, value, data["roles"].line_of(name))
                 for name, value in data["roles"].items()}
        categories = {name: self.category(name, value, data["categories"].line_of(name))
                      for name, value in data["categories"].items()}
        self.role_lines = {name: data["roles"].line_of(name) for name in roles}
        self.category_lines = {name: data["categories"].line_of(name) for name in categories}
        return roles, categories

    def check_name(self, name: object, line: int, what: str) -> None:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise self.fail(line, f"{what} name {name!r} must be lowercase letters, digits or '_'")

    def description(self, value: LineDict, what: str) -> str:
        description = value.get("description")
        if not isinstance(description, str) or not description.strip():
            raise self.fail(value.line, f"{what} needs a 'description' text")
        return description.strip()

    def role(self, name: object, value: object, line: int) -> str:
        self.check_name(name, line, "role")
        if not isinstance(value, LineDict):
            raise self.fail(line, f"role {name!r}: expected 'description: ...' below the name")
        for key in value:
            if key != "description":
                raise self.fail(value.line_of(key), f"role {name!r}: unknown setting {key!r}")
        return self.description(value, f"role {name!r}")

    def category(self, name: object, value: object, line: int) -> Category:
        self.check_name(name, line, "category")
        what = f"category {name!r}"
        if not isinstance(value, LineDict):
            raise self.fail(line, f"{what}: expected 'description:' and 'care_team_required:' below")
        for key in value:
            if key not in self.CATEGORY_KEYS:
                raise self.fail(value.line_of(key), f"{what}: unknown setting {key!r} "
                                                    f"(allowed: {', '.join(sorted(self.CATEGORY_KEYS))})")
        description = self.description(value, what)
        if "care_team_required" not in value:
            raise self.fail(value.line, f"{what}: 'care_team_required: true' or 'false' is missing")
        care_team = value["care_team_required"]
        patient_bound = value.get("patient_bound", True)
        for key, setting in (("care_team_required", care_team), ("patient_bound", patient_bound)):
            if not isinstance(setting, bool):
                raise self.fail(value.line_of(key), f"{what}: '{key}' must be true or false")
        if care_team and not patient_bound:
            raise self.fail(value.line_of("care_team_required"),
                            f"{what}: the care team can only be checked for data about one patient "
                            "(patient_bound: true)")
        return Category(name, description, care_team, patient_bound)


# -- model.conf and policy.csv ---------------------------------------------------------------------
def _load_model(text: str, label: str) -> casbin.Model:
    """Parse the Casbin model; it must compare requests and rules of exactly (role, category, action)."""
    model = casbin.Model()
    try:
        model.load_model_from_text(text)
    except Exception as exc:  # Casbin raises plain RuntimeError/ValueError on syntax errors
        found = _CASBIN_LINE_RE.search(str(exc))
        raise PolicyError(label, int(found.group(1)) if found else None,
                          f"Casbin model does not parse: {exc}") from None
    for section, key, title in (("r", "r", "request_definition"), ("p", "p", "policy_definition"),
                                ("e", "e", "policy_effect"), ("m", "m", "matchers")):
        if section not in model.keys() or key not in model[section]:
            raise PolicyError(label, None, f"the [{title}] section with '{key} = ...' is missing")
    for key, title in (("r", "request_definition"), ("p", "policy_definition")):
        if len(model[key][key].tokens) != 3:
            raise PolicyError(label, _line_of(text, f"{key} ="),
                              f"[{title}] must have exactly 3 fields (role, category, action)")
    return model


def _line_of(text: str, prefix: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip().replace(" ", "").startswith(prefix.replace(" ", "")):
            return number
    return None


def _read_rules(text: str, label: str, roles: Mapping[str, str],
                categories: Mapping[str, Category]) -> dict[tuple[str, str, str], int]:
    """policy.csv lines as {(role, category, action): line number}, fully validated."""
    rules: dict[tuple[str, str, str], int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "#" in line:
            raise PolicyError(label, number, "a comment must be on its own line (starting with #)")
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 4:
            raise PolicyError(label, number, f"expected 4 fields 'p, role, category, action', "
                                             f"found {len(fields)}")
        kind, role, category, action = fields
        if kind != "p":
            raise PolicyError(label, number, f"a rule line must start with 'p', not {kind!r}")
        if role not in roles:
            raise PolicyError(label, number, f"unknown role {role!r} (roles are declared in "
                                             f"{CATEGORIES_FILE})")
        if category not in categories:
            raise PolicyError(label, number, f"unknown category {category!r} (categories are "
                                             f"declared in {CATEGORIES_FILE})")
        if action not in ACTIONS:
            raise PolicyError(label, number, f"unknown action {action!r} (use read or write)")
        rule = (role, category, action)
        if rule in rules:
            raise PolicyError(label, number, f"duplicate rule (same as line {rules[rule]})")
        rules[rule] = number
    if not rules:
        raise PolicyError(label, None, "no rule line found: nobody could do anything")
    return rules


def _permitted_triples(model: casbin.Model, rules: Mapping[tuple[str, str, str], int],
                       roles: Iterable[str], categories: Iterable[str], model_label: str,
                       matcher_line: int | None, policy_label: str) -> frozenset[tuple[str, str, str]]:
    """Ask Casbin about every role x category x action; the answers must equal the rule lines."""
    try:
        enforcer = casbin.Enforcer(model)
        enforcer.add_policies([list(rule) for rule in rules])
        permitted = frozenset(
            (role, category, action)
            for role in roles for category in categories for action in ACTIONS
            if enforcer.enforce(role, category, action))
    except Exception as exc:  # e.g. a matcher naming a field that does not exist
        raise PolicyError(model_label, matcher_line, f"Casbin cannot evaluate this model: {exc}") from None
    for rule in sorted(permitted - rules.keys()):
        raise PolicyError(model_label, matcher_line, f"the model permits {' '.join(rule)} although no line of "
                                             f"{policy_label} says so")
    for rule in sorted(rules.keys() - permitted, key=rules.get):
        raise PolicyError(policy_label, rules[rule], f"this rule has no effect with {model_label}")
    return permitted


def policy_version(contents: Mapping[str, bytes]) -> str:
    """First 16 hex characters of a sha256 over the files (name, length, bytes), in name order."""
    digest = hashlib.sha256()
    for name in sorted(contents):
        digest.update(name.encode() + b"\0" + str(len(contents[name])).encode() + b"\0")
        digest.update(contents[name])
    return digest.hexdigest()[:16]


# -- the policy ------------------------------------------------------------------------------------
class Policy:
    """A loaded, validated, immutable policy. Build it with ``Policy.load(directory)``."""

    def __init__(self, *, directory: Path, roles: Mapping[str, str], categories: Mapping[str, Category],
                 permitted: frozenset[tuple[str, str, str]], routes: RouteTable, version: str,
                 rule_lines: Mapping[tuple[str, str, str], int] | None = None,
                 role_lines: Mapping[str, int] | None = None,
                 category_lines: Mapping[str, int] | None = None):
        self._directory = directory
        # Where each rule / declaration is written (for `dpiguard policy check|explain`).
        self.rule_lines = MappingProxyType(dict(rule_lines or {}))
        self.role_lines = MappingProxyType(dict(role_lines or {}))
        self.category_lines = MappingProxyType(dict(category_lines or {}))
        self._roles = MappingProxyType(dict(roles))
        self._categories = MappingProxyType(dict(categories))
        self._permitted = permitted
        self._routes = routes
        self._version = version

    @classmethod
    def load(cls, directory: str | Path) -> Policy:
        """Read and validate the four policy files; PolicyError (file, line) on any mistake."""
        return cls.from_files(directory, read_policy_files(directory))

    @classmethod
    def from_files(cls, directory: str | Path, contents: Mapping[str, bytes]) -> Policy:
        """Validate the four policy files from their bytes (``contents``: file name -> bytes, as read by
        :func:`read_policy_files`); the version covers every file of ``contents``."""
        directory = Path(directory)
        labels = {name: str(directory / name) for name in POLICY_FILES}
        texts = {name: decode_policy_file(labels[name], contents.get(name)) for name in POLICY_FILES}
        reader = _CategoriesReader(labels[CATEGORIES_FILE])
        roles, categories = reader.read(texts[CATEGORIES_FILE])
        model = _load_model(texts[MODEL_FILE], labels[MODEL_FILE])
        rules = _read_rules(texts[POLICY_FILE], labels[POLICY_FILE], roles, categories)
        permitted = _permitted_triples(model, rules, roles, categories, labels[MODEL_FILE],
                                       _line_of(texts[MODEL_FILE], "m ="), labels[POLICY_FILE])
        routes = RouteTable.from_text(texts[ROUTES_FILE], labels[ROUTES_FILE],
                                      {name: c.patient_bound for name, c in categories.items()})
        return cls(directory=directory, roles=roles, categories=categories, permitted=permitted,
                   routes=routes, version=policy_version(contents), rule_lines=rules,
                   role_lines=reader.role_lines, category_lines=reader.category_lines)

    def permits(self, roles: Iterable[str], category: str, action: str) -> bool:
        """True if at least one of ``roles`` may do ``action`` on ``category``."""
        if isinstance(roles, str):
            raise TypeError("roles must be a collection of role names, not one string")
        return any((role, category, action) in self._permitted for role in roles)

    def category(self, name: str) -> Category:
        """The declared category ``name``; KeyError if unknown."""
        return self._categories[name]

    @property
    def roles(self) -> Mapping[str, str]:
        """Declared roles: name -> description (read-only)."""
        return self._roles

    @property
    def categories(self) -> Mapping[str, Category]:
        """Declared categories: name -> Category (read-only)."""
        return self._categories

    @property
    def permitted(self) -> frozenset[tuple[str, str, str]]:
        """Every permitted (role, category, action)."""
        return self._permitted

    @property
    def routes(self) -> RouteTable:
        return self._routes

    @property
    def version(self) -> str:
        """First 16 hex chars of a sha256 over all policy files: carried by every decision record."""
        return self._version

    @property
    def directory(self) -> Path:
        return self._directory

    def file(self, name: str) -> str:
        """The path of one policy file as shown in messages (``policies/policy.csv``)."""
        return str(self._directory / name)
