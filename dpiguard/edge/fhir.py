"""The mitmproxy side of FHIR enforcement, called from dpiguard/addon.py (kept here to keep the addon short).

* ``request_body``: a pending FHIR write is decided once its body is in (worker thread: it may read the
  stored resource from the DPI); refused → OperationOutcome, nothing is forwarded.
* ``response``: the whole FHIR answer is checked, filtered and masked before it leaves; any error →
  OperationOutcome 503, never the original body.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from mitmproxy import http

from dpiguard.decision.pipeline import NeedIO, audit_unavailable
from dpiguard.edge.portal import SECURITY_HEADERS
from dpiguard.fhir.response import operation_outcome

log = logging.getLogger("dpiguard")
FHIR_JSON = "application/fhir+json"


async def request_body(addon, flow: http.HTTPFlow, pending) -> None:
    s = addon.services
    req, verdict = pending
    try:
        body = flow.request.get_content(strict=True) or b""
        verdict = await asyncio.to_thread(s.pipeline.fhir.decide_body, s.pipeline, req, verdict, body)
    except Exception as exc:  # fail closed
        log.exception("dpiguard: error while checking a FHIR write")
        flow.metadata.pop("dpiguard_fhir", None)
        _replace(flow, 503, operation_outcome("internal_error", 503, "dpiguard could not check this request",
                                              req.request_id, "exception"))
        addon._last_resort_trace(flow, exc)
        return
    if not await addon._durable(verdict, req):  # nothing forwarded before its record is on disk
        verdict = audit_unavailable()
    if not verdict.allowed:
        flow.metadata.pop("dpiguard_fhir", None)
        addon._respond(flow, s.portal.refusal(req, verdict))
        return
    addon._forward(flow, verdict)


async def response(addon, flow: http.HTTPFlow, pending) -> None:
    s = addon.services
    req, verdict = pending
    if flow.response is None:
        return
    enforcer = s.pipeline.fhir
    try:
        body = flow.response.get_content(strict=True) or b""
        ctype = flow.response.headers.get("content-type", "")
        code = flow.response.status_code
        try:
            status, out, record = enforcer.process_response(s.pipeline, req, verdict, code, ctype, body, io=False)
        except NeedIO:
            status, out, record = await asyncio.to_thread(enforcer.process_response, s.pipeline, req, verdict,
                                                          code, ctype, body, io=True)
        # The answer leaves only once its record is on disk (group commit), without blocking the loop.
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(s.audit.submit(record))), s.audit.write_timeout)
    except Exception as exc:  # fail closed: the original body never leaves
        log.exception("dpiguard: error while checking a FHIR response")
        _replace(flow, 503, operation_outcome("internal_error", 503, "dpiguard could not check this answer",
                                              req.request_id, "exception"))
        addon._last_resort_trace(flow, exc)
        return
    refused = status != flow.response.status_code
    flow.response.status_code = status
    for name in ("location", "content-location"):
        if name in flow.response.headers:
            flow.response.headers[name] = _rewrite(enforcer, verdict, flow.response.headers[name])
    flow.response.headers.pop("content-encoding", None)
    if refused:
        flow.response.headers.pop("etag", None)
        flow.response.headers["content-type"] = FHIR_JSON
    flow.response.content = out
    flow.response.headers["content-length"] = str(len(out))


def _rewrite(enforcer, verdict, url: str) -> str:
    from dpiguard.fhir.response import BundleRewriter

    return BundleRewriter(enforcer.upstream_origin, verdict.fhir_context.proxy_origin).url(url)


def _replace(flow: http.HTTPFlow, status: int, outcome: dict) -> None:
    body = orjson.dumps(outcome)
    headers = [(b"Content-Type", FHIR_JSON.encode())] + [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS]
    flow.response = http.Response.make(status, body, headers)
