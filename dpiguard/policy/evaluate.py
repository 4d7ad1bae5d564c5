"""The pure part of a decision: what the policy says of a request, before any session or care team.

The pipeline (:mod:`dpiguard.decision.pipeline`) and the policy simulator (``dpiguard policy
test|explain|diff``, :mod:`dpiguard.policy.sim`) decide through these same functions, so what the
RSSI tests is what runs.
"""

from __future__ import annotations

from dpiguard.policy.paths import HostileRequest, normalize_path, parse_query
from dpiguard.policy.routes import RouteMatch
from dpiguard.policy.table import Policy

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# -- the pure part of the decision (also used by `dpiguard policy test|explain|diff`) ---------------
def parse_target(target: str) -> tuple[str, dict[str, list[str]], str]:
    """Step 2a: (normalized path, parsed query, raw query) of a request target.

    Raises HostileRequest (reason ``hostile_path``)."""
    raw_path, _, raw_query = target.partition("?")
    if "#" in raw_query or "#" in raw_path:
        raise HostileRequest("hostile_path", "fragment in request target")
    return normalize_path(raw_path), parse_query(raw_query), raw_query


def map_request(policy: Policy, method: str, target: str) -> tuple[RouteMatch | None, str, str]:
    """Step 2: (route match or None, normalized path, raw query) of a request target.

    Raises HostileRequest (reason ``hostile_path`` or ``ambiguous_patient``)."""
    path, query, raw_query = parse_target(target)
    return policy.routes.match(method, path, query), path, raw_query


def authorize(policy: Policy, roles: tuple[str, ...] | list[str], match: RouteMatch) -> tuple[str, str] | None:
    """Step 4: None if one of ``roles`` may do the matched action on its category, else
    (refusal reason, message). The care team (step 5) is still to be checked when
    :func:`needs_care_team` says so."""
    if not policy.permits(roles, match.category, match.action):
        return "category_not_permitted", f"your role may not {match.action} {match.category} data"
    if needs_care_team(policy, match) and not match.patient:
        return "no_route", "no patient in this request"  # a route must name the patient of such a category
    return None


def needs_care_team(policy: Policy, match: RouteMatch) -> bool:
    return policy.category(match.category).care_team_required
