"""The mitmproxy side of FHIR enforcement (the decision itself is dpiguard/decision/fhir.py).

* ``request_body``: a pending FHIR write is decided once its body is in (worker thread: it may read the
  stored resource from the DPI); refused → OperationOutcome, nothing is forwarded.
* ``response``: the whole FHIR answer is checked, filtered and masked before it leaves; any error →
  OperationOutcome 503, never the original body.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from mitmproxy import http

from dpiguard.decision.verdict import NeedIO, audit_unavailable
from dpiguard.edge.flows import FHIR_JSON, durable, durable_wait, forward, respond, respond_fhir, trace_internal_error
from dpiguard.edge.pools import run_in
from dpiguard.edge.portal import Reply
from dpiguard.fhir.response import BundleRewriter, not_found_outcome, operation_outcome

log = logging.getLogger("dpiguard")
FHIR_KEY = "dpiguard_fhir"


async def request_body(s: Any, flow: http.HTTPFlow, pending) -> None:
    """``s``: the proxy's components (dpiguard.services.Services)."""
    req, verdict = pending
    try:
        body = flow.request.get_content(strict=True) or b""
        verdict = await run_in(s, "fhir", s.pipeline.fhir.decide_body, s.pipeline, req, verdict, body)
    except Exception as exc:  # fail closed
        log.exception("dpiguard: error while checking a FHIR write")
        flow.metadata.pop(FHIR_KEY, None)
        respond_fhir(flow, 503, operation_outcome("internal_error", 503, "dpiguard could not check this request",
                                                  req.request_id, "exception"))
        trace_internal_error(s.audit, flow, exc)
        return
    # Nothing is forwarded before its record is on disk.
    if not await durable(verdict.audit, s.audit, s.config.audit.on_failure, req, verdict.user):
        verdict = audit_unavailable()
    if not verdict.allowed:
        flow.metadata.pop(FHIR_KEY, None)
        if verdict.conceal:  # answered like a missing resource (no existence oracle); traced with its reason
            respond(flow, Reply(404, s.portal.localize_outcome(req, orjson.dumps(not_found_outcome(req.request_id))),
                                FHIR_JSON))
        else:
            respond(flow, s.portal.refusal(req, verdict))
        return
    forward(flow, verdict)
    if verdict.forward_method is not None:  # POST _search, decided: a plain search for the DPI
        flow.request.method = verdict.forward_method
        flow.request.headers.pop("content-type", None)
    if verdict.forward_body is not None:
        flow.request.content = verdict.forward_body
        if not verdict.forward_body:
            flow.request.headers.pop("content-length", None)


async def response(s: Any, flow: http.HTTPFlow, pending) -> None:
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
            status, out, record = await run_in(s, "fhir", enforcer.process_response, s.pipeline, req, verdict,
                                                          code, ctype, body, io=True)
        # The answer leaves only once its record is on disk (group commit), without blocking the loop.
        waiting = durable_wait(s.audit.submit(record), s.audit.write_timeout)  # None: on disk already
        if waiting is not None:
            await waiting
    except Exception as exc:  # fail closed: the original body never leaves
        log.exception("dpiguard: error while checking a FHIR response")
        respond_fhir(flow, 503, operation_outcome("internal_error", 503, "dpiguard could not check this answer",
                                                  req.request_id, "exception"))
        trace_internal_error(s.audit, flow, exc)
        return
    if status != flow.response.status_code or record.get("reason") in ("not_found", "fhir_upstream_error") or \
            record.get("concealed") or verdict.fhir_context.request.interaction in ("search", "operation"):
        # dpiguard's own answer (a refusal, a missing resource, a page of dpiguard's), with its own headers
        # only: nothing of the DPI's (ETag, Last-Modified, counts or paging in headers) tells about hidden data.
        respond(flow, Reply(status, s.portal.localize_outcome(req, out) if status >= 400 else out, FHIR_JSON))
        return
    flow.response.status_code = status
    rewriter = BundleRewriter(enforcer.upstream_origin, verdict.fhir_context.proxy_origin)
    for name in ("location", "content-location"):
        if name in flow.response.headers:
            flow.response.headers[name] = rewriter.url(flow.response.headers[name])
    flow.response.headers.pop("content-encoding", None)
    flow.response.content = out
    flow.response.headers["content-length"] = str(len(out))
