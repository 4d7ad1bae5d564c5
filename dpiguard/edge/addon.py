"""The mitmproxy addon: adapts flows to the pipeline (dpiguard/pipeline.py) and back.

Load it with ``dpiguard run --config FILE`` or, in an existing mitmproxy setup,
``mitmdump --mode reverse:https://dpi.example.org -s addons/dpiguard_addon.py --set dpiguard_config=FILE``.

Hooks stay short: ``requestheaders`` decides every request before its body streams in (in-process
caches; a worker thread when Redis must be asked), ``request`` serves dpiguard's own portal pages,
which need the body. Any error in a hook becomes a refusal: a request is never forwarded because
dpiguard failed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Optional

from mitmproxy import ctx, exceptions, http

from dpiguard import metrics
from dpiguard.edge import ops
from dpiguard.edge import fhir as fhir_hooks
from dpiguard.audit.chain import utc_now_ms
from dpiguard.config import Config, ConfigError, load_config
from dpiguard.decision.pipeline import Incoming, NeedIO, Verdict, audit_unavailable
from dpiguard.edge.portal import PREFIX, MAX_BODY, Reply, SECURITY_HEADERS
from dpiguard.services import Services, build_services

log = logging.getLogger("dpiguard")

PORTAL_KEY = "dpiguard_portal"
FHIR_KEY = "dpiguard_fhir"  # (Incoming, Verdict) of a forwarded FHIR request: body and response checks
REQUEST_ID_KEY = "dpiguard_request_id"
REQUEST_ID_HEADER = "X-DPIGuard-Request-Id"


class DpiGuard:
    def __init__(self, config: Config | None = None):
        self._given_config = config
        self.services: Services | None = None

    # -- mitmproxy lifecycle -----------------------------------------------------------------------
    def load(self, loader) -> None:
        loader.add_option(
            "dpiguard_config", Optional[str], None,
            "Path of the dpiguard configuration file (YAML). Environment variables DPIGUARD_* override it.",
        )

    def configure(self, updated) -> None:
        if self.services is not None:
            return
        if self._given_config is None and "dpiguard_config" not in updated:
            return
        try:
            cfg = self._given_config or load_config(ctx.options.dpiguard_config)
            self.services = build_services(cfg)
        except ConfigError as exc:
            raise exceptions.OptionsError(f"dpiguard: {exc}") from exc
        except Exception as exc:
            raise exceptions.OptionsError(f"dpiguard: cannot start: {exc}") from exc

    def running(self) -> None:
        if self.services is None:
            log.error("dpiguard: no configuration (set dpiguard_config); every request will be refused")
            return
        self.services.start()
        self.services.audit.write({"event": "startup", "outcome": "allow", "reason": "ok",
                                   "policy_version": self.services.policy.version})
        log.info("dpiguard ready: policy %s, instance %s", self.services.policy.version,
                 self.services.config.instance_id)

    def done(self) -> None:
        if self.services is not None:
            self.services.stop()

    # -- hooks -------------------------------------------------------------------------------------
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            await self._requestheaders(flow)
        except Exception as exc:  # fail closed
            log.exception("dpiguard: error while deciding")
            metrics.observe_decision(False, "internal_error", 0.0, True)
            self._respond(flow, Reply(503, b'{"error":"internal_error"}', "application/json"))
            self._last_resort_trace(flow, exc)

    async def request(self, flow: http.HTTPFlow) -> None:
        pending = flow.metadata.get(FHIR_KEY)
        if pending is not None and pending[1].pending:
            await fhir_hooks.request_body(self, flow, pending)
            return
        req = flow.metadata.get(PORTAL_KEY)
        if req is None:
            return
        try:
            s = self.services
            token, _ = s.pipeline.session_token(req)
            reply = await asyncio.to_thread(s.portal.handle, req, flow.request.raw_content or b"", token)
        except Exception as exc:
            log.exception("dpiguard: portal error")
            reply = Reply(503, b'{"error":"internal_error"}', "application/json")
            self._last_resort_trace(flow, exc)
        self._respond(flow, reply)

    async def _requestheaders(self, flow: http.HTTPFlow) -> None:
        s = self.services
        if s is None:
            self._respond(flow, Reply(503, b'{"error":"not_configured"}', "application/json"))
            return
        req = self._incoming(flow)
        flow.metadata[REQUEST_ID_KEY] = req.request_id
        if req.target.startswith(PREFIX):
            op = ops.handle(req, s.monitor, s.metrics_networks)  # health/live, health/ready, metrics
            if op is not None:
                self._respond(flow, Reply(*op))
                return
        plaintext_refused = s.pipeline.require_tls and not req.tls  # no password over plain HTTP either
        if req.target.startswith(PREFIX) and not plaintext_refused:
            if not self._portal_body_ok(flow):
                verdict = Verdict(False, "body_too_large", 413, "dpiguard's pages take a body of at most "
                                  f"{MAX_BODY} bytes, with a Content-Length")
                verdict.audit = s.pipeline._trace(req, verdict, s.pipeline.policy)
                if not await self._durable(verdict, req):
                    verdict = audit_unavailable()
                self._respond(flow, s.portal.refusal(req, verdict))
                return
            flow.metadata[PORTAL_KEY] = req  # answered in the `request` hook, once the body is in
            return
        started, used_io = time.perf_counter(), False
        try:
            verdict = s.pipeline.decide(req, io=False)
        except NeedIO:
            used_io = True
            verdict = await asyncio.to_thread(s.pipeline.decide, req, io=True)
        metrics.observe_decision(verdict.allowed, verdict.reason, time.perf_counter() - started, used_io)
        # No answer and no forwarding before the decision's record is on disk (group commit).
        if not await self._durable(verdict, req):
            verdict = audit_unavailable()
        if not verdict.allowed:
            self._respond(flow, s.portal.refusal(req, verdict))
            return
        if verdict.fhir_context is not None:
            flow.metadata[FHIR_KEY] = (req, verdict)  # checked again on the body and the response
            if verdict.pending:
                return  # a FHIR write: decided in the `request` hook once the body is in
        self._forward(flow, verdict)
        session = verdict.session
        if session is not None and s.sessions.needs_touch(session, time.time()):
            asyncio.get_running_loop().run_in_executor(None, self._touch, session)

    @staticmethod
    def _portal_body_ok(flow: http.HTTPFlow) -> bool:
        """Portal bodies are small and declared: a chunked body would be buffered whole before the
        `request` hook, so one without Content-Length is refused like an oversized one."""
        headers = flow.request.headers
        if "transfer-encoding" in headers:
            return False
        length = headers.get("content-length", "0")
        return length.isdigit() and int(length) <= MAX_BODY

    async def _durable(self, verdict: Verdict, req: Incoming) -> bool:
        """Wait, without blocking the event loop, until the verdict's trace record is durable."""
        future = verdict.audit
        if future is None:  # no record could even be queued: decide() already made this a refusal
            return True
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.services.audit.write_timeout)
            return True
        except Exception as exc:
            if self.services.config.audit.on_failure == "serve":
                log.error("dpiguard: AUDIT RECORD LOST for request %s (%s %s by %s): %s; serving anyway "
                          "(audit.on_failure=serve)", req.request_id, req.method, req.target[:200], verdict.user, exc)
                return True
            log.error("dpiguard: audit record of request %s not durable (%s); refusing", req.request_id, exc)
            return False

    async def responseheaders(self, flow: http.HTTPFlow) -> None:
        if FHIR_KEY in flow.metadata and flow.response is not None:
            flow.response.stream = False  # FHIR answers are checked whole before they leave
        request_id = flow.metadata.get(REQUEST_ID_KEY)
        if request_id and flow.response is not None and REQUEST_ID_HEADER not in flow.response.headers:
            flow.response.headers[REQUEST_ID_HEADER] = request_id

    async def response(self, flow: http.HTTPFlow) -> None:
        if FHIR_KEY in flow.metadata:
            await fhir_hooks.response(self, flow, flow.metadata[FHIR_KEY])

    def _touch(self, session) -> None:
        try:
            self.services.sessions.touch(session, time.time())
        except Exception as exc:  # the next request re-reads the session; nothing is allowed by this
            log.warning("dpiguard: session touch failed: %s", exc)

    # -- adapters ----------------------------------------------------------------------------------
    @staticmethod
    def _incoming(flow: http.HTTPFlow) -> Incoming:
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

    @staticmethod
    def _forward(flow: http.HTTPFlow, v: Verdict) -> None:
        request = flow.request
        if not v.public:
            request.path = v.forward_target
            for name, value in v.set_headers.items():
                request.headers[name] = value
            if v.cookie_header is not None:
                if v.cookie_header:
                    request.headers["cookie"] = v.cookie_header
                else:
                    request.headers.pop("cookie", None)
            if v.drop_authorization:
                request.headers.pop("authorization", None)
        else:
            request.path = v.forward_target
            request.headers.pop("cookie", None)  # no session id leaves the proxy
            request.headers.pop("authorization", None)

    @staticmethod
    def _respond(flow: http.HTTPFlow, reply: Reply) -> None:
        headers = [(b"Content-Type", reply.content_type.encode())]
        request_id = flow.metadata.get(REQUEST_ID_KEY)
        if request_id:
            headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
        headers += [(k.encode(), v.encode("latin-1")) for k, v in SECURITY_HEADERS]
        headers += [(k.encode(), v.encode("latin-1")) for k, v in reply.headers]
        flow.response = http.Response.make(reply.status, reply.body, headers)

    def _last_resort_trace(self, flow: http.HTTPFlow, exc: Exception) -> None:
        try:  # queued without waiting: this runs on the event loop, and the answer is a refusal anyway
            self.services.audit.submit({
                "event": "access", "outcome": "deny", "reason": "internal_error", "time": utc_now_ms(),
                "request_id": flow.metadata.get(REQUEST_ID_KEY),
                "method": flow.request.method[:16], "target": flow.request.path[:512],
                "detail": f"{type(exc).__name__}: {exc}"[:300],
            })
        except Exception:
            log.error("dpiguard: could not trace an internal error: %s", exc)
