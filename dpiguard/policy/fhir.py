"""``policies/fhir.yaml``: how FHIR resources map to dpiguard's data categories, and what each role sees.

The file is edited by the RSSI (see docs/fhir.md and the comments in the file). It says:

* ``base_path``: where the FHIR API lives (``/fhir``);
* ``types``: each FHIR resource type open through dpiguard, its data category, its search mode
  (``refuse``: a search must name the patient; ``filter``: an unscoped search is answered with a Bundle
  filtered to the patients the user may see) and optional ``rules`` choosing another category from a
  code of the resource (``Observation.category`` vital-signs, ``DocumentReference.type``...);
* ``allow_parameters``: search parameters refused by default that the hospital accepts (``_has``...);
* ``operations``: operations allowed (``$everything``, always patient-scoped);
* ``masks``: per role and category, elements removed from returned resources (minimum necessary).

Everything is validated at load time against categories.yaml (roles, categories); a mistake is a
``PolicyError`` naming the file and line, and dpiguard does not start.
"""

from __future__ import annotations

import hashlib
import re
from collections import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from dpiguard.fhir.compartment import PATIENT_COMPARTMENT, PROBING_CONTROLS, R4_TYPES
from dpiguard.policy.files import LineDict, LineList, PolicyError, load_yaml, read_policy_file

FHIR_FILE = "fhir.yaml"
SEARCH_MODES = ("refuse", "filter")
ELEMENT_RE = re.compile(r"^[a-z][A-Za-z0-9]*(\.[a-z][A-Za-z0-9]*)*$")
PROTECTED_ELEMENTS = frozenset({"id", "meta", "resourceType", "contained"})
OPERATIONS = frozenset({"$everything"})


@dataclass(frozen=True)
class CodeRule:
    element: str
    system: str | None
    code: str
    category: str


@dataclass(frozen=True)
class TypeRule:
    name: str
    category: str
    search: str
    rules: tuple[CodeRule, ...]

    @property
    def categories(self) -> frozenset[str]:
        return frozenset({self.category} | {r.category for r in self.rules})


class FhirPolicy:
    """A loaded, validated fhir.yaml. Immutable."""

    def __init__(self, *, base_path: str, types: Mapping[str, TypeRule], allow_parameters: frozenset[str],
                 operations: frozenset[str], masks: Mapping[tuple[str, str], tuple[tuple[str, str], ...]],
                 version: str, path: str):
        self.base_path = base_path
        self.types = dict(types)
        self.allow_parameters = allow_parameters
        self.operations = operations
        self.masks = dict(masks)  # (role, category) -> ((type, element path), ...)
        self.version = version
        self.path = path

    @classmethod
    def load(cls, path: str | Path, roles: Iterable[str], categories: Mapping[str, Any]) -> FhirPolicy:
        data, text = read_policy_file(path)
        return cls.from_text(text, str(path), roles, categories, hashlib.sha256(data).hexdigest()[:16])

    @classmethod
    def from_text(cls, text: str, label: str, roles: Iterable[str], categories: Mapping[str, Any],
                  version: str) -> FhirPolicy:
        """Validate the text of a fhir.yaml (``label`` names it in errors; ``version`` identifies it)."""
        return _Reader(label, set(roles), categories).read(text, version)

    # -- questions -------------------------------------------------------------------------------
    def owns(self, path: str) -> bool:
        return path == self.base_path or path.startswith(self.base_path + "/")

    def segments(self, path: str) -> list[str]:
        rest = path[len(self.base_path):].strip("/")
        return rest.split("/") if rest else []

    def category_of(self, resource: Mapping[str, Any]) -> str | None:
        """The category of a resource (first matching code rule, else the type's), None if unmapped."""
        rule = self.types.get(resource.get("resourceType"))
        if rule is None:
            return None
        for code_rule in rule.rules:
            if _has_code(resource.get(code_rule.element), code_rule.system, code_rule.code):
                return code_rule.category
        return rule.category

    def masked(self, roles: Iterable[str], category: str, permitted) -> dict[str, list[str]]:
        """Elements to remove, by type, for a user with ``roles`` reading ``category``.

        A user with several roles sees what any of their roles that may read the category sees: an
        element is removed only if every such role masks it.
        """
        sets = [set(self.masks.get((role, category), ())) for role in roles if permitted(role)]
        if not sets:
            return {}
        common = set.intersection(*sets)
        out: dict[str, list[str]] = {}
        for kind, element in sorted(common):
            out.setdefault(kind, []).append(element)
        return out


def _has_code(element: Any, system: str | None, code: str) -> bool:
    if isinstance(element, list):
        return any(_has_code(e, system, code) for e in element)
    if isinstance(element, str):
        return element == code and system is None
    if not _is_mapping(element):
        return False
    codings = element.get("coding") if "coding" in element else [element]
    for coding in codings or []:
        if _is_mapping(coding) and coding.get("code") == code and (
                system is None or coding.get("system") == system):
            return True
    return False


def _is_mapping(value: Any) -> bool:
    """JSON objects are dicts (the fast check); any other mapping still counts (collections.abc's C check,
    not typing.Mapping's, which is written in Python)."""
    return isinstance(value, dict) or isinstance(value, abc.Mapping)


class _Reader:
    TOP_KEYS = {"base_path", "types", "allow_parameters", "operations", "masks"}
    TYPE_KEYS = {"category", "search", "rules"}
    RULE_KEYS = {"element", "system", "code", "category"}

    def __init__(self, label: str, roles: set[str], categories: Mapping[str, Any]):
        self.label, self.roles, self.categories = label, roles, categories

    def fail(self, line: int | None, message: str) -> PolicyError:
        return PolicyError(self.label, line, message)

    def read(self, text: str, version: str) -> FhirPolicy:
        data = load_yaml(text, self.label)
        for key in data:
            if key not in self.TOP_KEYS:
                raise self.fail(data.line_of(key), f"unknown section {key!r} "
                                                    f"(allowed: {', '.join(sorted(self.TOP_KEYS))})")
        base = data.get("base_path", "/fhir")
        if not isinstance(base, str) or not re.match(r"^(/[A-Za-z0-9._~-]+)+$", base):
            raise self.fail(data.line_of("base_path"), "'base_path' must be a path like /fhir (no trailing '/')")
        types = data.get("types")
        if not isinstance(types, LineDict) or not types:
            raise self.fail(data.line_of("types") if "types" in data else None,
                            "the 'types' section is missing or empty")
        rules = {name: self.type_rule(name, value, types.line_of(name)) for name, value in types.items()}
        allow = self.name_list(data, "allow_parameters")
        for name, line in allow:
            if not (name in PROBING_CONTROLS or name == "_revinclude" or re.match(r"^[a-z][a-z0-9-]*\.$", name)):
                raise self.fail(line, f"allow_parameters: {name!r} is not a parameter that can be allowed "
                                      f"(one of {', '.join(sorted(PROBING_CONTROLS | {'_revinclude'}))}, "
                                      "or a chain prefix like 'encounter.')")
        operations = self.name_list(data, "operations")
        for name, line in operations:
            if name not in OPERATIONS:
                raise self.fail(line, f"operations: {name!r} is not supported (supported: "
                                      f"{', '.join(sorted(OPERATIONS))})")
        masks = self.masks(data.get("masks"), data.line_of("masks"), rules) if "masks" in data else {}
        return FhirPolicy(base_path=base, types=rules, allow_parameters=frozenset(n for n, _ in allow),
                          operations=frozenset(n for n, _ in operations), masks=masks, version=version,
                          path=self.label)

    def name_list(self, data: LineDict, key: str) -> list[tuple[str, int]]:
        value = data.get(key)
        if value is None:
            return []
        if not isinstance(value, LineList) or not all(isinstance(v, str) for v in value):
            raise self.fail(data.line_of(key), f"'{key}' must be a list of names, like [_has]")
        return list(zip(value, value.item_lines))

    def category(self, name: Any, line: int, what: str, kind: str) -> str:
        if not isinstance(name, str) or name not in self.categories:
            raise self.fail(line, f"{what}: unknown category {name!r} (categories are declared in "
                                  "categories.yaml)")
        bound = getattr(self.categories[name], "patient_bound", True)
        in_compartment = bool(PATIENT_COMPARTMENT.get(kind))
        if in_compartment and not bound:
            raise self.fail(line, f"{what}: {kind} is about a patient; its category must be patient_bound")
        if not in_compartment and bound:
            raise self.fail(line, f"{what}: {kind} is never about one patient; give it a category with "
                                  "patient_bound: false")
        return name

    def type_rule(self, name: Any, value: Any, line: int) -> TypeRule:
        if not isinstance(name, str) or name not in R4_TYPES:
            raise self.fail(line, f"unknown FHIR R4 resource type {name!r}")
        what = f"type {name}"
        if not isinstance(value, LineDict):
            raise self.fail(line, f"{what}: expected 'category:' and 'search:' below the name")
        for key in value:
            if key not in self.TYPE_KEYS:
                raise self.fail(value.line_of(key), f"{what}: unknown setting {key!r} "
                                                    f"(allowed: {', '.join(sorted(self.TYPE_KEYS))})")
        if "category" not in value:
            raise self.fail(line, f"{what}: 'category' is missing")
        category = self.category(value["category"], value.line_of("category"), what, name)
        search = value.get("search", "refuse")
        if search not in SEARCH_MODES:
            raise self.fail(value.line_of("search"), f"{what}: 'search' must be refuse or filter")
        code_rules = []
        raw_rules = value.get("rules", [])
        if not isinstance(raw_rules, list):
            raise self.fail(value.line_of("rules"), f"{what}: 'rules' must be a list")
        lines = getattr(raw_rules, "item_lines", [line] * len(raw_rules))
        for raw, rule_line in zip(raw_rules, lines):
            if not isinstance(raw, LineDict):
                raise self.fail(rule_line, f"{what}: a rule needs 'element:', 'code:' and 'category:'")
            for key in raw:
                if key not in self.RULE_KEYS:
                    raise self.fail(raw.line_of(key), f"{what}: unknown rule setting {key!r}")
            for key in ("element", "code", "category"):
                if not isinstance(raw.get(key), str) or not raw[key].strip():
                    raise self.fail(raw.line_of(key) if key in raw else rule_line,
                                    f"{what}: rule setting {key!r} must be a text")
            if not ELEMENT_RE.match(raw["element"]) or "." in raw["element"]:
                raise self.fail(raw.line_of("element"), f"{what}: 'element' must be a top-level element name")
            system = raw.get("system")
            if system is not None and not isinstance(system, str):
                raise self.fail(raw.line_of("system"), f"{what}: 'system' must be a text")
            code_rules.append(CodeRule(raw["element"], system, raw["code"],
                                       self.category(raw["category"], raw.line_of("category"), what, name)))
        return TypeRule(name, category, search, tuple(code_rules))

    def masks(self, value: Any, line: int, rules: Mapping[str, TypeRule]):
        if not isinstance(value, LineDict):
            raise self.fail(line, "'masks' must map roles to categories to element lists")
        out: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
        for role, per_category in value.items():
            role_line = value.line_of(role)
            if role not in self.roles:
                raise self.fail(role_line, f"masks: unknown role {role!r} (roles are declared in categories.yaml)")
            if not isinstance(per_category, LineDict):
                raise self.fail(role_line, f"masks: {role}: expected categories below the role")
            for category, elements in per_category.items():
                cat_line = per_category.line_of(category)
                if category not in self.categories:
                    raise self.fail(cat_line, f"masks: {role}: unknown category {category!r}")
                if not isinstance(elements, LineList) or not elements:
                    raise self.fail(cat_line, f"masks: {role}: {category}: expected a list like "
                                              "[Patient.address, Patient.telecom]")
                parsed = []
                for element, el_line in zip(elements, elements.item_lines):
                    kind, dot, path = str(element).partition(".")
                    if not dot or kind not in rules or not ELEMENT_RE.match(path):
                        raise self.fail(el_line, f"masks: {element!r} must be Type.element with a type of "
                                                 "the 'types' section")
                    if path.split(".")[0] in PROTECTED_ELEMENTS:
                        raise self.fail(el_line, f"masks: {element!r} cannot be masked")
                    if category not in rules[kind].categories:
                        raise self.fail(el_line, f"masks: {element!r}: {kind} is never in category {category}")
                    parsed.append((kind, path))
                out[(role, category)] = tuple(parsed)
        return out
