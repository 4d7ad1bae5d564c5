"""Checks of meaning for policy files (``dpiguard policy check``), beyond what loading refuses.

:meth:`Policy.load` already refuses anything that is wrong (syntax, unknown names, duplicates, empty
or non-UTF-8 files...) with a :class:`PolicyError` naming the file and line: such a policy never runs.
This module looks at a policy that *loads* and reports what is probably a mistake, as warnings
with file and line:

* a role with no rule (its users can do nothing at all);
* a category no role may read or write (its data is closed to everyone);
* a category no route uses (the rules about it protect nothing);
* a rule that can never match: no route gives its category with its action (e.g. a ``write`` rule
  on a category that only has ``GET`` routes);
* a route no role may use (refused for everyone);
* two routes of the same method that can match the same address while giving different data
  (category, action, or public/protected): the more precise one wins, the other is shadowed for
  those addresses. Also a protected route whose addresses a public path could take.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpiguard.policy.routes import ANY_ONE, ANY_REST, LITERAL, PATIENT, PATIENT_ID_RE, Route
from dpiguard.policy.table import CATEGORIES_FILE, POLICY_FILE, ROUTES_FILE, Policy


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning"
    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.level}: {self.message}"


def _example_segment(a: tuple[int, str], b: tuple[int, str]) -> str | None:
    """One path segment both pattern segments match, or None."""
    (ka, ta), (kb, tb) = sorted((a, b))
    if ka == LITERAL:
        if kb == LITERAL:
            return ta if ta == tb else None
        if kb == PATIENT:
            return ta if PATIENT_ID_RE.match(ta) else None
        return ta
    if ka == PATIENT:
        return "P1"
    return "x"


def overlap_example(a: Route, b: Route) -> str | None:
    """An address matched by the paths of both routes, or None if they never overlap."""
    sa, sb = list(a.segments), list(b.segments)
    parts: list[str] = []
    i = 0
    while True:
        end_a, end_b = i >= len(sa), i >= len(sb)
        if end_a and end_b:
            return "/" + "/".join(parts)
        if end_a or end_b:
            return None  # one is longer and the shorter has no '**'
        ka, kb = sa[i][0], sb[i][0]
        if ka == ANY_REST and kb == ANY_REST:
            return "/" + "/".join(parts + ["x"])
        if ka == ANY_REST or kb == ANY_REST:
            rest = sb[i:] if ka == ANY_REST else sa[i:]
            tail = [{PATIENT: "P1", ANY_ONE: "x", ANY_REST: "x"}.get(k, t) for k, t in rest]
            return "/" + "/".join(parts + tail)
        segment = _example_segment(sa[i], sb[i])
        if segment is None:
            return None
        parts.append(segment)
        i += 1


def _methods(routes: list[Route], of: Route) -> set[str]:
    """Methods of the routes.yaml entry ``of`` comes from (one Route object per method)."""
    return {r.method for r in routes if (r.pattern, r.line) == (of.pattern, of.line)}


def _describe(route: Route) -> str:
    if route.public:
        return f"public path {route.pattern}"
    return f"route '{route.name}' ({route.method} {route.pattern} -> {route.category} {route.action})"


def lint(policy: Policy, extra_routed: set[tuple[str, str]] = frozenset()) -> list[Finding]:
    """Warnings about a loaded policy (see the module docstring), sorted by file and line.

    ``extra_routed``: (category, action) pairs reachable by other means than routes.yaml, e.g. the
    FHIR resource types of policies/fhir.yaml (read, and write through create/update)."""
    found: list[Finding] = []
    cat_file, rules_file, routes_file = (policy.file(n) for n in (CATEGORIES_FILE, POLICY_FILE, ROUTES_FILE))

    def warn(file: str, line: int | None, message: str) -> None:
        found.append(Finding("warning", file, line, message))

    permitted = policy.permitted
    routes = [r for r in policy.routes.routes if not r.public]
    routed = {(r.category, r.action) for r in routes} | set(extra_routed)
    used = {r.category for r in routes} | {category for category, _ in extra_routed}
    for role in policy.roles:
        if not any(p[0] == role for p in permitted):
            warn(cat_file, policy.role_lines.get(role),
                 f"role '{role}' has no rule in {POLICY_FILE}: its users can do nothing")
    for name in policy.categories:
        line = policy.category_lines.get(name)
        if not any(p[1] == name for p in permitted):
            warn(cat_file, line, f"category '{name}': no role may read or write it ({POLICY_FILE} has no rule)")
        if name not in used:
            warn(cat_file, line, f"category '{name}': no route in {ROUTES_FILE} (nor FHIR type) uses it, "
                                 "so its rules protect nothing")
    for (role, category, action), line in sorted(policy.rule_lines.items(), key=lambda kv: kv[1]):
        if (category, action) not in routed and category in used:
            methods = "POST/PUT/PATCH/DELETE" if action == "write" else "GET/HEAD"
            warn(rules_file, line, f"rule 'p, {role}, {category}, {action}' can never match: no route "
                                   f"{action}s '{category}' (no {methods} route, or 'action: {action}', "
                                   f"in {ROUTES_FILE})")
    for route in routes:
        if not any((role, route.category, route.action) in permitted for role in policy.roles):
            warn(routes_file, route.line, f"{_describe(route)}: no role may {route.action} "
                                          f"'{route.category}', so it is refused for everyone")
    all_routes = list(policy.routes.routes)
    reported: set[tuple] = set()
    for i, a in enumerate(all_routes):
        for b in all_routes[i + 1:]:
            if a.method != b.method or a.pattern == b.pattern:
                continue
            same_data = (a.public, a.category, a.action) == (b.public, b.category, b.action)
            if same_data and a.patient_query == b.patient_query:
                continue
            example = overlap_example(a, b)
            if example is None:
                continue
            # RouteTable keeps routes sorted most precise first: a wins for the shared addresses.
            winner, loser = a, b
            key = (winner.line, loser.line, winner.pattern, loser.pattern)
            if key in reported:
                continue
            reported.add(key)
            methods = "/".join(sorted(_methods(all_routes, a) & _methods(all_routes, b)))
            warn(routes_file, loser.line,
                 f"{_describe(loser)} is shadowed by {_describe(winner)} (line {winner.line}) for "
                 f"addresses like {methods} {example}: the more precise route wins, so those addresses "
                 f"give '{winner.category or 'public'}' instead of '{loser.category or 'public'}'")
    return sorted(found, key=lambda f: (f.file, f.line or 0, f.message))
