"""FHIR writes judged by their result: JSON Patch applied to the stored resource, conditional and local
references.

* :func:`apply_json_patch`: the resource as the DPI will store it after a JSON Patch (RFC 6902, with the
  maintained ``jsonpatch`` library); the FHIR step then checks it like a full update.
* :func:`has_conditional_reference`: ``Patient?identifier=...`` in a written resource names a patient
  dpiguard cannot check before the DPI resolves it: such writes are refused.
* :func:`local_reference_map` / :func:`resolve_local_references`: inside a transaction or batch,
  ``urn:uuid:`` references point at other entries; they are replaced by what those entries are
  (``Patient/P1`` for a PUT of Patient/P1, a new resource for a POST) before the entry is judged.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import jsonpointer

NEW_RESOURCE = "#dpiguard-new"  # a reference to a resource created by the same Bundle (no patient yet)


class PatchError(ValueError):
    """The patch is not a JSON Patch, or does not apply to the stored resource."""


def apply_json_patch(stored: dict, patch: Any) -> dict:
    if not isinstance(patch, list) or not patch or not all(isinstance(op, dict) for op in patch):
        raise PatchError("a JSON Patch is a non-empty list of operations")
    try:
        result = jsonpatch.JsonPatch(patch).apply(copy.deepcopy(stored), in_place=False)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, KeyError,
            IndexError, ValueError) as exc:
        raise PatchError(str(exc)[:200]) from None
    if not isinstance(result, dict):
        raise PatchError("the patch does not leave a resource")
    return result


def _references(node: Any):
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("reference")
            if isinstance(ref, str):
                yield item, ref
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def has_conditional_reference(resource: Any) -> bool:
    return any("?" in ref for _, ref in _references(resource))


def local_reference_map(entries: list) -> dict[str, str] | None:
    """``fullUrl`` (urn:uuid:/urn:oid:) → ``Type/id`` for PUT entries, :data:`NEW_RESOURCE` for POST
    ones; None if a fullUrl is malformed or repeated."""
    out: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        full = entry.get("fullUrl")
        if full is None:
            continue
        if not isinstance(full, str) or full in out:
            return None
        if not full.startswith(("urn:uuid:", "urn:oid:")):
            continue
        request = entry.get("request") if isinstance(entry.get("request"), dict) else {}
        method = str(request.get("method", "")).upper()
        url = str(request.get("url", "")).partition("?")[0].strip("/")
        parts = url.split("/")
        if method == "PUT" and len(parts) == 2:
            out[full] = url
        elif method == "POST" and len(parts) == 1:
            out[full] = NEW_RESOURCE
        else:
            return None
    return out


def resolve_local_references(resource: Any, local: dict[str, str]) -> Any:
    """A copy of ``resource`` with its ``urn:`` references replaced by what they point at (left as they
    are when unknown: the check then refuses them as unreadable)."""
    if not local or not isinstance(resource, (dict, list)):
        return resource
    resolved = copy.deepcopy(resource)
    for holder, ref in _references(resolved):
        if ref in local:
            holder["reference"] = local[ref]
    return resolved
