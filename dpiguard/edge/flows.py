"""mitmproxy flows to and from the decision: the adapters every hook of the proxy edge uses.

* :func:`incoming` reads a flow's request into :class:`~dpiguard.decision.verdict.Incoming`;
* :func:`forward` applies an allowed verdict to the request (path, identity headers, credentials out);
* :func:`respond` / :func:`respond_fhir` answer the flow from dpiguard, never from the DPI;
* :func:`durable` waits, without blocking the event loop, until a decision's trace record is on disk;
* :func:`trace_internal_error` leaves a refusal record when a hook failed before deciding.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from concurrent.futures import Future

import orjson
from mitmproxy import http

from dpiguard.audit.chain import AuditLog
from dpiguard.decision.verdict import Incoming, Verdict
from dpiguard.edge.portal import SECURITY_HEADERS, Reply
from dpiguard.times import iso_ms

log = logging.getLogger("dpiguard")

REQUEST_ID_KEY = "dpiguard_request_id"
REQUEST_ID_HEADER = "X-DPIGuard-Request-Id"
FHIR_JSON = "application/fhir+json"


def incoming(flow: http.HTTPFlow) -> Incoming:
    headers: dict[str, str] = {}
    size = 0
    for raw_name, raw_value in flow.request.headers.fields:
        size += len(raw_name) + len(raw_value) + 4
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name in headers:
            headers[name] += ("; " if name == "cookie" else ", ") + value
        else:
            headers[name] = value
    peer = flow.client_conn.peername
    return Incoming(
        method=flow.request.method.upper(),
        target=flow.request.path,
        headers=headers,
        client_ip=peer[0] if peer else "",
        tls=flow.client_conn.tls_established,
        header_bytes=size,
        request_id=secrets.token_hex(8),
    )


def forward(flow: http.HTTPFlow, v: Verdict) -> None:
    request = flow.request
    request.path = v.forward_target
    if v.public:
        request.headers.pop("cookie", None)  # no session id leaves the proxy
        request.headers.pop("authorization", None)
        return
    for name, value in v.set_headers.items():
        request.headers[name] = value
    if v.cookie_header is not None:
        if v.cookie_header:
            request.headers["cookie"] = v.cookie_header
        else:
            request.headers.pop("cookie", None)
    if v.drop_authorization:
        request.headers.pop("authorization", None)


def respond(flow: http.HTTPFlow, reply: Reply) -> None:
    headers = [(b"Content-Type", reply.content_type.encode())]
    request_id = flow.metadata.get(REQUEST_ID_KEY)
    if request_id:
        headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
    headers += [(k.encode(), v.encode("latin-1")) for k, v in SECURITY_HEADERS]
    headers += [(k.encode(), v.encode("latin-1")) for k, v in reply.headers]
    flow.response = http.Response.make(reply.status, reply.body, headers)


def respond_fhir(flow: http.HTTPFlow, status: int, outcome: dict) -> None:
    """Answer with an OperationOutcome of dpiguard's (the DPI's answer, if any, is dropped whole)."""
    respond(flow, Reply(status, orjson.dumps(outcome), FHIR_JSON))


async def durable(future: Future | None, audit: AuditLog, on_failure: str, req: Incoming,
                  user: str | None = None) -> bool:
    """True once the record behind ``future`` is on disk; False if it cannot be made durable in
    ``audit.write_timeout`` (then the caller refuses), unless ``on_failure`` is ``serve``."""
    if future is None:  # no record could even be queued: the decision is already a refusal
        return True
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), audit.write_timeout)
        return True
    except Exception as exc:
        if on_failure == "serve":
            log.error("dpiguard: AUDIT RECORD LOST for request %s (%s %s by %s): %s; serving anyway "
                      "(audit.on_failure=serve)", req.request_id, req.method, req.target[:200], user, exc)
            return True
        log.error("dpiguard: audit record of request %s not durable (%s); refusing", req.request_id, exc)
        return False


def trace_internal_error(audit: AuditLog | None, flow: http.HTTPFlow, exc: Exception) -> None:
    """Queue a refusal record for a hook that failed (no wait: this runs on the event loop, and the
    answer is a refusal anyway)."""
    try:
        audit.submit({
            "event": "access", "outcome": "deny", "reason": "internal_error", "time": iso_ms(),
            "request_id": flow.metadata.get(REQUEST_ID_KEY),
            "method": flow.request.method[:16], "target": flow.request.path[:512],
            "detail": f"{type(exc).__name__}: {exc}"[:300],
        })
    except Exception:
        log.error("dpiguard: could not trace an internal error: %s", exc)
