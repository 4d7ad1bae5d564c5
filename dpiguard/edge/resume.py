"""A form sent when the session had ended: kept, then sent once after its author logs in again.

1. ``requestheaders`` refused a browser form (POST, a form content type, ``Accept: text/html``, not
   FHIR) with ``session_expired``, its body declared and within ``sessions.resume_max_bytes``:
   :func:`wants_keep` says so, and the addon waits for the body instead of answering;
2. ``request``: :func:`keep` hands the body to :meth:`Portal.keep_form` (owner check, encryption,
   Redis), which answers with the login page's address and the kept form's id;
3. the person logs in (``POST /_dpiguard/login`` with ``resume``); the portal takes the kept form
   (single use, same user only) and answers with ``Reply.replay``; :func:`replay` turns this very
   flow into the original request with the new session, **decides it with the pipeline** like any
   other (trace record, refusal if it is no longer allowed) and forwards it; the DPI's answer goes to
   the browser with the new session's cookie.

The decision of the kept request is new: a form is never sent because it was allowed once.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import http

from dpiguard import metrics
from dpiguard.decision.verdict import Incoming, Verdict, audit_unavailable
from dpiguard.edge.banner import COOKIES_KEY
from dpiguard.edge.flows import REQUEST_ID_KEY, durable, forward, incoming, respond
from dpiguard.edge.pools import run_in
from dpiguard.edge.portal import Reply, is_fhir, wants_html

log = logging.getLogger("dpiguard")

KEEP_KEY = "dpiguard_keep"  # flow metadata: this refused form is to be kept once its body is in


def wants_keep(services, req: Incoming, verdict: Verdict, flow: http.HTTPFlow) -> bool:
    resume = getattr(services.portal, "resume", None)
    if resume is None or not resume.enabled or verdict.reason != "session_expired" or req.method != "POST":
        return False
    if not wants_html(req.headers, req.method) or is_fhir(req.target, req.headers):
        return False
    headers = flow.request.headers
    length = headers.get("content-length", "")
    return "transfer-encoding" not in headers and length.isdigit() and int(length) <= resume.max_bytes


async def keep(services, flow: http.HTTPFlow, req: Incoming) -> None:
    try:
        token, _ = services.pipeline.session_token(req)
        reply = await run_in(services, "portal", services.portal.keep_form, req, flow.request.raw_content or b"", token)
    except Exception as exc:  # the form is lost, but never sent: the person is asked to log in
        log.warning("dpiguard: form not kept: %s", exc)
        reply = Reply(303, b"", "text/plain", [("Location", "/_dpiguard/login?reason=session_expired")])
    respond(flow, reply)


async def replay(services, flow: http.HTTPFlow, reply: Reply) -> None:
    """Turn the login flow into the kept request, decide it, and forward it (or answer the refusal)."""
    kept, token = reply.replay
    s = services
    r = flow.request
    cookies = [part.strip() for part in r.headers.get("cookie", "").split(";") if part.strip()]
    others = [c for c in cookies if c.partition("=")[0] not in (s.pipeline.cookie_name, s.portal.csrf_cookie)]
    r.method = kept.method
    r.path = kept.target
    r.headers.pop("authorization", None)
    r.headers.pop("transfer-encoding", None)
    r.headers["content-type"] = kept.content_type
    r.headers["cookie"] = "; ".join([f"{s.pipeline.cookie_name}={token}"] + others)
    r.content = kept.body
    req = incoming(flow)
    flow.metadata[REQUEST_ID_KEY] = req.request_id
    started = time.perf_counter()
    verdict = await run_in(s, "decisions", s.pipeline.decide, req, io=True)
    metrics.observe_decision(verdict.allowed, verdict.reason, time.perf_counter() - started, True)
    if not await durable(verdict.audit, s.audit, s.config.audit.on_failure, req, verdict.user):
        verdict = audit_unavailable()
    set_cookies = [value for name, value in reply.headers if name.lower() == "set-cookie"]
    if not verdict.allowed or verdict.fhir_context is not None:
        refused = s.portal.refusal(req, verdict) if not verdict.allowed else Reply(
            403, b'{"error":"fhir_not_supported"}', "application/json")
        refused.headers += [("Set-Cookie", c) for c in set_cookies]
        respond(flow, refused)
        return
    forward(flow, verdict)
    flow.metadata[COOKIES_KEY] = set_cookies
    if s.banner is not None:
        s.banner.note(flow, verdict)
