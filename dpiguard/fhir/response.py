"""FHIR responses: which patients a returned resource is about, Bundle filtering, masking.

Pure functions over parsed JSON. The care-team question is asked through a ``Judge`` built by
:mod:`.enforce`; its ``decide`` may raise ``NeedIO`` when a decision is not cached, and the whole
processing is then re-run in a worker thread (the same pattern as the request pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

from dpiguard.fhir.compartment import patient_of_reference

NO_PATIENT = "fhir_no_patient"
_JSON_SCALARS = frozenset((str, int, float, bool, type(None)))


def patient_links(resource: Any) -> tuple[set[str], bool]:
    """(patient ids the resource refers to, whether some patient reference could not be read).

    Every ``reference`` anywhere in the resource (contained resources included) counts, which is a
    superset of the compartment links: a resource is shown only if every patient it mentions passes.
    A ``Patient`` resource is about itself.
    """
    found: set[str] = set()
    unreadable = False
    if isinstance(resource, dict) and resource.get("resourceType") == "Patient" and "id" in resource:
        patient = patient_of_reference(str(resource["id"]), bare_is_patient=True)
        if patient:
            found.add(patient)
        else:
            unreadable = True
    # Only objects and arrays go on the stack: a scalar holds no reference (and a Bundle entry has
    # hundreds of them, so walking them was most of an answer check's time). JSON scalars are told
    # apart by their exact type first (one set lookup), the isinstance check only runs for the rest.
    stack = [resource] if isinstance(resource, (dict, list)) else []
    push, pop, leaf = stack.append, stack.pop, _JSON_SCALARS
    while stack:
        item = pop()
        if isinstance(item, dict):
            if "reference" in item:
                ref = item["reference"]
                if isinstance(ref, str) and not ref.startswith("#"):
                    patient = patient_of_reference(ref, bare_is_patient=False)
                    if patient:
                        found.add(patient)
                    elif patient is False or (patient is None and item.get("type") == "Patient"):
                        unreadable = True
                elif item.get("type") == "Patient" and "identifier" in item:
                    unreadable = True  # a logical reference to a patient we cannot name
                for k, v in item.items():
                    if type(v) not in leaf and isinstance(v, (dict, list)) and k != "reference":
                        push(v)
                continue
            if item.get("type") == "Patient" and "identifier" in item:
                unreadable = True  # a logical reference to a patient we cannot name
            for v in item.values():
                if type(v) not in leaf and isinstance(v, (dict, list)):
                    push(v)
        else:
            for v in item:
                if type(v) not in leaf and isinstance(v, (dict, list)):
                    push(v)
    return found, unreadable


@dataclass
class Judgement:
    ok: bool
    reason: str
    category: str | None
    patients: tuple[str, ...] = ()


class ResourceRules(Protocol):
    """What the answer check needs of the FHIR mapping (``policies/fhir.yaml``, read by
    :class:`dpiguard.policy.fhir.FhirPolicy`): a resource's category, and the elements masked for a role."""

    def category_of(self, resource: Any) -> str | None: ...

    def masked(self, roles: Iterable[str], category: str,
               permits: Callable[[str], bool]) -> Mapping[str, list[str]]: ...


class Permissions(Protocol):
    """What the answer check needs of the role table (:class:`dpiguard.policy.snapshot.PolicySet`)."""

    def permits(self, roles: Iterable[str], category: str, action: str) -> bool: ...

    def category(self, name: str) -> Any: ...  # has .care_team_required


Access = Callable[[str, str, str, bool], tuple[bool, str]]


class Judge:
    """Decides, resource by resource, for one user.

    ``access(patient, category, action, care_team_required)`` → (allowed, refusal reason): the care-team
    step of the pipeline, asked for **every** patient a resource names, whatever its category, so that a
    patient objection (``patient_objection``) holds on administrative data too."""

    def __init__(self, *, fhir: ResourceRules, policy: Permissions, roles: tuple[str, ...], access: Access):
        self.fhir, self.policy, self.roles, self.access = fhir, policy, roles, access
        self._masks: dict[str, dict[str, list[str]]] = {}  # by category: the same for every resource

    def member(self, patient: str, category: str, action: str) -> tuple[bool, str]:
        return self.access(patient, category, action, self.policy.category(category).care_team_required)

    def resource(self, resource: Any, action: str = "read") -> Judgement:
        if not isinstance(resource, dict):
            return Judgement(False, "fhir_invalid_response", None)
        kind = resource.get("resourceType")
        if kind == "OperationOutcome":
            return Judgement(True, "allowed", None)
        category = self.fhir.category_of(resource)
        if category is None:
            return Judgement(False, "fhir_type_not_mapped", None)
        if not self.policy.permits(self.roles, category, action):
            return Judgement(False, "category_not_permitted", category)
        found, unreadable = patient_links(resource)
        patients = tuple(sorted(found))
        required = self.policy.category(category).care_team_required
        if unreadable:  # a patient that cannot be named cannot be checked (objections included)
            return Judgement(False, NO_PATIENT, category, patients)
        if required and not patients:
            return Judgement(False, NO_PATIENT, category)
        for patient in patients:
            ok, reason = self.access(patient, category, action, required)
            if not ok:
                return Judgement(False, reason, category, patients)
        return Judgement(True, "allowed", category, patients)

    def masks(self, category: str) -> dict[str, list[str]]:
        """The elements masked for this user in a resource of ``category``, by type (read-only)."""
        masks = self._masks.get(category)
        if masks is None:
            masks = self._masks[category] = self.fhir.masked(
                self.roles, category, lambda role: self.policy.permits([role], category, "read"))
        return masks


def remove_path(node: Any, path: list[str]) -> int:
    """Remove ``a.b.c`` from a resource (through lists); number of elements removed."""
    if isinstance(node, list):
        return sum(remove_path(item, path) for item in node)
    if not isinstance(node, dict) or not path:
        return 0
    head = path[0]
    removed = 0
    # FHIR primitive extensions live in "_name": remove them with the value.
    if len(path) == 1:
        for key in (head, "_" + head):
            if key in node:
                del node[key]
                removed += 1
        return removed
    return remove_path(node.get(head), path[1:])


def apply_masks(resource: dict, judge: Judge, category: str | None) -> list[str]:
    """Mask a kept resource (and its contained resources) for the user; the element names removed."""
    removed: list[str] = []
    targets = [(resource, category)]
    for contained in resource.get("contained") or []:
        if isinstance(contained, dict):
            targets.append((contained, judge.fhir.category_of(contained)))
    for target, cat in targets:
        if cat is None:
            continue
        for element in judge.masks(cat).get(target.get("resourceType"), []):
            if remove_path(target, element.split(".")):
                removed.append(f"{target.get('resourceType')}.{element}")
    return removed


@dataclass
class CheckedAnswer:
    """The result of processing one response body."""

    body: Any
    status: int
    refused_reason: str | None = None
    returned: int = 0
    hidden: int = 0
    hidden_reasons: dict[str, int] = field(default_factory=dict)
    masked: set[str] = field(default_factory=set)
    patients: set[str] = field(default_factory=set)
    request_id: str = ""
    # id() of a visible search entry built by collect_page → the patients its resource names, when no
    # mask changed it (it is then the resource the judgement walked); a masked one is walked again.
    entry_patients: dict[int, tuple[str, ...]] = field(default_factory=dict)


class BundleRewriter:
    """Rewrites links of a Bundle so they point at the proxy, never at the upstream."""

    def __init__(self, upstream_origin: str, proxy_origin: str):
        self.upstream = upstream_origin.rstrip("/")
        self.proxy = proxy_origin.rstrip("/")

    def url(self, url: Any) -> Any:
        if isinstance(url, str) and self.upstream and (url == self.upstream or url.startswith(self.upstream + "/")):
            return self.proxy + url[len(self.upstream):]
        return url


def process(body: Any, status: int, judge: Judge, rewriter: BundleRewriter, *, filtered_search: bool,
            request_id: str = "") -> CheckedAnswer:
    """Check, filter and mask a parsed FHIR response body (not a top-level search: see collect_page)."""
    out = CheckedAnswer(body, status, request_id=request_id)
    if not isinstance(body, dict) or "resourceType" not in body:
        raise ValueError("the FHIR response is not a resource")
    if body["resourceType"] == "Bundle":
        _bundle(body, judge, rewriter, out, filtered_search)
        return out
    verdict = judge.resource(body)
    if not verdict.ok:
        out.refused_reason = verdict.reason
        out.hidden = 1
        out.hidden_reasons[verdict.reason] = 1
        return out
    if body["resourceType"] != "OperationOutcome":
        out.returned = 1
        out.patients.update(verdict.patients)
        out.masked.update(apply_masks(body, judge, verdict.category))
    return out


def _bundle(bundle: dict, judge: Judge, rewriter: BundleRewriter, out: CheckedAnswer, filtered_search: bool) -> None:
    kind = bundle.get("type")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise ValueError("Bundle.entry is not a list")
    kept: list = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError("a Bundle entry is not an object")
        if "fullUrl" in entry:
            entry["fullUrl"] = rewriter.url(entry["fullUrl"])
        resource = entry.get("resource")
        response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
        if kind in ("batch-response", "transaction-response") and str(response.get("status", ""))[:3] in ("404",
                                                                                                           "410"):
            # A missing resource answers like a withheld one (no existence oracle inside Bundles either).
            kept.append({"response": {"status": "404", "outcome": not_found_outcome(out.request_id)}})
            continue
        if resource is None:
            if kind in ("batch-response", "transaction-response"):
                kept.append(entry)  # the outcome of the user's own write (status, location)
            else:
                out.hidden += 1  # a deleted version or an empty entry says whose resource existed
                out.hidden_reasons[NO_PATIENT] = out.hidden_reasons.get(NO_PATIENT, 0) + 1
            continue
        if isinstance(resource, dict) and resource.get("resourceType") == "Bundle":
            _bundle(resource, judge, rewriter, out, filtered_search=True)
            kept.append(entry)
            continue
        verdict = judge.resource(resource)
        if verdict.ok:
            if resource.get("resourceType") != "OperationOutcome":
                out.returned += 1
                out.patients.update(verdict.patients)
                out.masked.update(apply_masks(resource, judge, verdict.category))
            kept.append(entry)
            continue
        out.hidden += 1
        out.hidden_reasons[verdict.reason] = out.hidden_reasons.get(verdict.reason, 0) + 1
        if kind in ("batch-response", "transaction-response"):
            kept.append({"response": {"status": "404", "outcome": not_found_outcome(out.request_id)}})
    if kind == "searchset":
        kept = _prune_includes(kept)
    if entries:
        bundle["entry"] = kept
    if kind in ("searchset", "history"):
        # Only dpiguard's paging is followed (top-level searches); here one page, counted by nobody:
        # whether the DPI had more pages, or how many matches, would depend on hidden entries.
        bundle.pop("total", None)
        bundle["link"] = [link for link in bundle.get("link") or []
                          if isinstance(link, dict) and link.get("relation") == "self"]
        if kind == "history":
            bundle["total"] = len(kept)
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and "url" in link:
            link["url"] = rewriter.url(link["url"])


def collect_page(bundle: Any, judge: Judge, rewriter: BundleRewriter, out: CheckedAnswer) -> tuple[list, list]:
    """One page of the DPI's answer to a search: (visible match entries, visible included entries), each
    checked, masked and with its fullUrl pointing at dpiguard; hidden ones are counted in ``out``."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or bundle.get("type") != "searchset":
        raise ValueError("the DPI did not answer the search with a searchset Bundle")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise ValueError("Bundle.entry is not a list")
    matches, includes = [], []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            raise ValueError("a searchset entry without a resource")
        resource = entry["resource"]
        mode = (entry.get("search") or {}).get("mode", "match")
        verdict = judge.resource(resource)
        if not verdict.ok:
            out.hidden += 1
            out.hidden_reasons[verdict.reason] = out.hidden_reasons.get(verdict.reason, 0) + 1
            continue
        if resource.get("resourceType") == "OperationOutcome":
            continue  # the DPI's warnings about the search (may echo what it matched): not passed on
        out.returned += 1
        out.patients.update(verdict.patients)
        removed = apply_masks(resource, judge, verdict.category)
        out.masked.update(removed)
        clean = {"fullUrl": rewriter.url(entry["fullUrl"])} if "fullUrl" in entry else {}
        clean["resource"] = resource
        clean["search"] = {"mode": "match" if mode == "match" else "include"}
        if not removed:
            out.entry_patients[id(clean)] = verdict.patients
        (matches if mode == "match" else includes).append(clean)
    return matches, includes


def next_link(bundle: Any) -> str | None:
    for link in (bundle.get("link") or []) if isinstance(bundle, dict) else []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"]
    return None


def page_bundle(matches: list, includes: list, offset: int, size: int, exhausted: bool,
                links: list[dict]) -> dict:
    """The searchset dpiguard answers: visible matches [offset, offset+size) with the included entries
    linked to them, dpiguard's links only, and ``total`` only when it is the visible count (the search
    was read to its end without filling the page: the count then depends on visible entries only)."""
    page = matches[offset:offset + size]
    pool = {}
    for entry in includes:
        pool.setdefault(_key(entry["resource"]), entry)
    bundle: dict = {"resourceType": "Bundle", "type": "searchset"}
    if exhausted and len(matches) <= offset + size:
        bundle["total"] = len(matches)
    bundle["link"] = links
    bundle["entry"] = _prune_includes(page + list(pool.values()))
    return bundle


def _key(resource: Any) -> str | None:
    if isinstance(resource, dict) and "resourceType" in resource and "id" in resource:
        return f"{resource['resourceType']}/{resource['id']}"
    return None


def _references(resource: Any) -> set[str]:
    found: set[str] = set()
    stack = [resource] if isinstance(resource, (dict, list)) else []  # objects and arrays only, as above
    push, pop = stack.append, stack.pop
    while stack:
        item = pop()
        if isinstance(item, dict):
            ref = item.get("reference")
            if isinstance(ref, str) and "/" in ref:
                parts = ref.split("/")
                if len(parts) >= 4 and parts[-2] == "_history":
                    parts = parts[:-2]
                found.add("/".join(parts[-2:]))
            values = item.values()
        else:
            values = item
        for v in values:
            if isinstance(v, (dict, list)):
                push(v)
    return found


def _prune_includes(entries: list) -> list:
    """Keep an included entry only if it is linked to a match that is still there.

    Otherwise ``_include`` would show, for instance, the Patient of a hidden Observation (telling that
    this patient has such a result) and ``_revinclude`` the resources pointing at hidden matches.
    """
    matches = [e for e in entries if (e.get("search") or {}).get("mode", "match") == "match"]
    if len(matches) == len(entries):
        return entries  # no included entry to judge (the usual page): nothing to walk
    match_keys = {_key(e.get("resource")) for e in matches} - {None}
    referenced = set().union(*(_references(e.get("resource")) for e in matches)) if matches else set()
    kept = []
    for entry in entries:
        if (entry.get("search") or {}).get("mode", "match") == "match":
            kept.append(entry)
            continue
        resource = entry.get("resource")
        if _key(resource) in referenced or _references(resource) & match_keys:
            kept.append(entry)
    return kept


def operation_outcome(reason: str, status: int, message: str, request_id: str, issue: str = "forbidden") -> dict:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": "error",
            "code": issue,
            "details": {"coding": [{"system": "urn:dpiguard:reason", "code": reason}], "text": message},
            "diagnostics": f"dpiguard refused the request ({reason}); request id {request_id}",
        }],
    }


NOT_FOUND = "fhir_not_found"


def not_found_outcome(request_id: str) -> dict:
    """The one answer to a read of a resource that does not exist **or** that the user may not see: the
    same status and body, so that a refusal does not tell that the resource exists (the trace says
    which it was, under the request id)."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": "error",
            "code": "not-found",
            "details": {"coding": [{"system": "urn:dpiguard:reason", "code": NOT_FOUND}],
                        "text": "no such resource, or not one you may see"},
            "diagnostics": f"dpiguard: not found or not accessible to you; request id {request_id}",
        }],
    }


def iter_resources(bundle: dict) -> Iterable[dict]:
    for entry in bundle.get("entry") or []:
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
            yield entry["resource"]
