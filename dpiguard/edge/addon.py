"""The mitmproxy addon: adapts flows to the pipeline (dpiguard/decision/pipeline.py) and back.

Load it with ``dpiguard run --config FILE`` or, in an existing mitmproxy setup,
``mitmdump --mode reverse:https://dpi.example.org -s addons/dpiguard_addon.py --set dpiguard_config=FILE``.

Hooks stay short: ``requestheaders`` decides every request before its body streams in (in-process
caches; a worker thread when Redis must be asked), ``request`` serves dpiguard's own portal pages,
which need the body, and completes FHIR writes; ``response`` checks FHIR answers. Any error in a hook
becomes a refusal: a request is never forwarded because dpiguard failed.

The addon is handed its components (``services``, built by :mod:`dpiguard.services`, the composition
root), or a ``build`` function that builds them from the ``dpiguard_config`` option.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http

from dpiguard import metrics
from dpiguard.config import Config, ConfigError, load_config
from dpiguard.decision.verdict import NeedIO, Verdict, audit_unavailable
from dpiguard.edge import fhir as fhir_hooks
from dpiguard.edge import ops, resume
from dpiguard.edge.flows import (
    DECIDED_KEY,
    REQUEST_ID_HEADER,
    REQUEST_ID_KEY,
    UnparsedRequestTracer,
    durable,
    durable_now,
    forward,
    framing_error,
    incoming,
    origin_form,
    respond,
    trace_http_error,
    trace_internal_error,
)
from dpiguard.edge.pools import run_in
from dpiguard.edge.portal import MAX_BODY, PREFIX, Reply

log = logging.getLogger("dpiguard")

PORTAL_KEY = "dpiguard_portal"
MAX_LOOP_READS = 4  # care-team reads the event loop makes for one request (a FHIR request may name several patients)
FHIR_KEY = fhir_hooks.FHIR_KEY  # (Incoming, Verdict) of a forwarded FHIR request: body and response checks


def _over_limits(pipeline: Any, req) -> Verdict | None:
    """The URL and header size limits of the pipeline (``limits.*``), for the reserved prefix, which the
    pipeline does not decide."""
    if len(req.target) > pipeline.max_url_bytes:
        return Verdict(False, "hostile_path", 414, "request URL too long")
    if req.header_bytes > pipeline.max_header_bytes:
        return Verdict(False, "header_too_large", 431, "request headers too large")
    return None


class DpiGuard:
    def __init__(self, services: Any = None, *, build: Callable[[Config], Any] | None = None):
        self.services = services  # dpiguard.services.Services
        self._build = build
        self.unsafe: str | None = None  # an option makes enforcement unsafe: every request is refused
        self._unparsed: UnparsedRequestTracer | None = None
        self._authorities: tuple[frozenset[str], tuple[str, str, int]] | None = None

    # -- mitmproxy lifecycle -----------------------------------------------------------------------
    def load(self, loader) -> None:
        loader.add_option(
            "dpiguard_config", Optional[str], None,
            "Path of the dpiguard configuration file (YAML). Environment variables DPIGUARD_* override it.",
        )

    def configure(self, updated) -> None:
        self._refuse_unsafe_options(updated)
        if self.services is not None or self._build is None or "dpiguard_config" not in updated:
            return
        try:
            self.services = self._build(load_config(ctx.options.dpiguard_config))
        except ConfigError as exc:
            raise exceptions.OptionsError(f"dpiguard: {exc}") from exc
        except Exception as exc:
            raise exceptions.OptionsError(f"dpiguard: cannot start: {exc}") from exc

    def _refuse_unsafe_options(self, updated) -> None:
        """mitmproxy options under which requests would leave unchecked or unclean: bodies dpiguard decides
        on (FHIR writes, its own pages) must be whole before anything is forwarded (``stream_large_bodies``),
        the DPI must get its own Host (``keep_host_header``), smuggling checks stay on
        (``validate_inbound_headers``) and the DPI's certificate is verified (``ssl_insecure``)."""
        unsafe = {"stream_large_bodies": "request bodies would reach the DPI before dpiguard checks them",
                  "keep_host_header": "the client's Host header would reach the DPI",
                  "validate_inbound_headers": "request smuggling checks would be off",
                  "ssl_insecure": "the DPI's certificate would not be verified"}
        for name, why in unsafe.items():
            if name not in updated or not hasattr(ctx.options, name):
                continue
            value = getattr(ctx.options, name)
            if (not value) if name == "validate_inbound_headers" else value:
                self.unsafe = f"{name} is {'off' if name == 'validate_inbound_headers' else 'set'}: {why}; " \
                              "remove this option"
                break
        if self.unsafe:
            log.error("dpiguard: cannot start: %s", self.unsafe)
            try:  # as a script (mitmdump -s), an error in configure is only logged: stop mitmproxy itself
                ctx.master.shutdown()
            except Exception:
                pass
            raise exceptions.OptionsError(f"dpiguard: {self.unsafe}")

    def running(self) -> None:
        if self.services is None:
            log.error("dpiguard: no configuration (set dpiguard_config); every request will be refused")
            return
        if self._unparsed is None:
            self._unparsed = UnparsedRequestTracer(self.services.audit)
            server_log = logging.getLogger("mitmproxy.proxy.server")
            server_log.addHandler(self._unparsed)
            if server_log.getEffectiveLevel() > logging.INFO:  # its unparsable-request lines are INFO
                server_log.setLevel(logging.INFO)
        self.services.start()
        try:  # records queued by this loop wake the audit writer once per loop round (group commit)
            self.services.audit.wake_later(asyncio.get_running_loop().call_soon)
        except RuntimeError:  # not on an event loop (tests calling the hook directly)
            pass
        version = self.services.policies.version
        self.services.audit.write({"event": "startup", "outcome": "allow", "reason": "ok", "policy_version": version})
        log.info("dpiguard ready: policy %s, instance %s", version, self.services.config.instance_id)

    def done(self) -> None:
        if self._unparsed is not None:
            logging.getLogger("mitmproxy.proxy.server").removeHandler(self._unparsed)
        if self.services is not None:
            self.services.stop()

    # -- hooks -----------------------------------------------------------------------------------------
    # The hooks are plain functions: mitmproxy awaits what a hook returns only when it is awaitable, so a
    # hook returns a coroutine only when it must wait (Redis, a record not on disk yet, a body); the
    # others (responseheaders, the response of a non-FHIR answer, error, a decided request whose record
    # is already on disk) create none.
    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        try:
            rest = self._requestheaders(flow)
        except Exception as exc:  # fail closed
            self._internal_error(flow, exc)
            return None
        return None if rest is None else self._guarded(flow, rest)

    async def _guarded(self, flow: http.HTTPFlow, rest: Awaitable[None]) -> None:
        try:
            await rest
        except Exception as exc:  # fail closed
            self._internal_error(flow, exc)

    def _internal_error(self, flow: http.HTTPFlow, exc: Exception) -> None:
        log.error("dpiguard: error while deciding", exc_info=exc)
        metrics.observe_decision(False, "internal_error", 0.0, True)
        respond(flow, Reply(503, b'{"error":"internal_error"}', "application/json"))
        trace_internal_error(self.services and self.services.audit, flow, exc)

    def error(self, flow: http.HTTPFlow) -> None:
        """mitmproxy refused the request itself (invalid framing or headers, CONNECT...), or it failed
        on the way: one trace record, with the request id."""
        trace_http_error(self.services and self.services.audit, flow, flow.error.msg if flow.error else "error")

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        pending = flow.metadata.get(FHIR_KEY)
        if pending is not None and pending[1].pending:
            return fhir_hooks.request_body(self.services, flow, pending)
        kept = flow.metadata.pop(resume.KEEP_KEY, None)
        if kept is not None:  # a form sent with an ended session: kept for its author (edge/resume.py)
            return resume.keep(self.services, flow, kept)
        req = flow.metadata.get(PORTAL_KEY)
        if req is None:
            return None
        return self._portal(flow, req)

    async def _portal(self, flow: http.HTTPFlow, req) -> None:
        try:
            s = self.services
            token, _ = s.pipeline.session_token(req)
            reply = await run_in(s, "portal", s.portal.handle, req, flow.request.raw_content or b"", token)
            if reply.replay is not None:  # logged in again: the kept form goes on, decided anew
                await resume.replay(s, flow, reply)
                return
        except Exception as exc:
            log.exception("dpiguard: portal error")
            reply = Reply(503, b'{"error":"internal_error"}', "application/json")
            trace_internal_error(self.services.audit, flow, exc)
        respond(flow, reply)

    def _requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Decide the request; returns None when done, or the coroutine that finishes it."""
        s = self.services
        if s is None:
            respond(flow, Reply(503, b'{"error":"not_configured"}', "application/json"))
            return None
        req = incoming(flow)
        flow.metadata[REQUEST_ID_KEY] = req.request_id
        if self.unsafe:
            return self._refuse(req, flow, Verdict(False, "internal_error", 503, self.unsafe))
        broken = framing_error(flow, req)
        if broken is not None:  # mitmproxy answers it (400) and closes; traced, never decided
            trace_http_error(s.audit, flow, broken)
            return None
        if not origin_form(flow, *self._targets()):
            return self._refuse(req, flow, Verdict(False, "absolute_target_refused", 400,
                                                   "an absolute request target must name this service"))
        if req.target.startswith(PREFIX):
            oversized = _over_limits(s.pipeline, req)  # dpiguard's own pages get the same size limits
            if oversized is not None:
                return self._portal_refusal(req, flow, oversized)
            op = ops.handle(req, s.monitor, s.metrics_networks)  # health/live, health/ready, metrics
            if op is not None:
                respond(flow, Reply(*op))
                return None
            if not (s.pipeline.require_tls and not req.tls):  # no password over plain HTTP either
                if not self._portal_body_ok(flow):
                    return self._portal_refusal(req, flow, Verdict(
                        False, "body_too_large", 413,
                        f"dpiguard's pages take a body of at most {MAX_BODY} bytes, with a Content-Length"))
                flow.metadata[PORTAL_KEY] = req  # answered in the `request` hook, once the body is in
                flow.request.stream = False
                return None
        started = time.perf_counter()
        try:
            verdict = s.pipeline.decide(req, io=False)
        except NeedIO as need:
            return self._decide_io(flow, req, started, need)
        return self._decided(flow, req, verdict, started, False)

    async def _decide_io(self, flow: http.HTTPFlow, req, started: float, need: NeedIO) -> None:
        s = self.services
        verdict = await self._read_facts_and_decide(req, need)
        if verdict is None:  # something else is missing, or the facts could not be kept: a worker decides
            verdict = await run_in(s, "decisions", s.pipeline.decide, req, io=True)
        rest = self._decided(flow, req, verdict, started, True)
        if rest is not None:
            await rest

    async def _read_facts_and_decide(self, req, need: NeedIO) -> Verdict | None:
        """The decision once the event loop has read the missing care-team facts itself (edge/prefetch.py),
        a FHIR request's patients one after the other (at most :data:`MAX_LOOP_READS`); None when a worker
        must decide (no reader, a session or other data missing, the facts not kept). A failed read is a
        refusal, as in a worker."""
        s = self.services
        reader = s.facts_reader
        for _ in range(MAX_LOOP_READS):
            if reader is None or need.facts is None:
                return None
            try:
                if not await reader.read(s.pipeline, *need.facts):
                    return None
            except Exception as exc:  # fail closed, as the worker's read would
                log.warning("dpiguard: care-team read of request %s failed: %s", req.request_id, exc)
                return s.pipeline.failed(req, exc)
            try:
                return s.pipeline.decide(req, io=False)
            except NeedIO as again:
                need = again
        return None

    def _decided(self, flow: http.HTTPFlow, req, verdict: Verdict, started: float,
                 used_io: bool) -> Awaitable[None] | None:
        s = self.services
        metrics.observe_decision(verdict.allowed, verdict.reason, time.perf_counter() - started, used_io)
        flow.metadata[DECIDED_KEY] = True
        # No answer and no forwarding before the decision's record is on disk (group commit).
        ok = durable_now(verdict.audit, s.audit, s.config.audit.on_failure, req, verdict.user)
        if ok is None:
            return self._conclude_when_durable(flow, req, verdict)
        self._conclude(flow, req, verdict if ok else audit_unavailable())
        return None

    async def _conclude_when_durable(self, flow: http.HTTPFlow, req, verdict: Verdict) -> None:
        if not await self._durable(verdict, req):
            verdict = audit_unavailable()
        self._conclude(flow, req, verdict)

    def _conclude(self, flow: http.HTTPFlow, req, verdict: Verdict) -> None:
        """Apply a decision whose record is on disk: answer the refusal, or forward."""
        s = self.services
        if not verdict.allowed:
            if resume.wants_keep(s, req, verdict, flow):
                flow.metadata[resume.KEEP_KEY] = req  # answered in `request`, once the body is in
                return
            respond(flow, s.portal.refusal(req, verdict))
            return
        s.banner.note(flow, verdict)  # no-store, and the session bar on HTML pages (edge/banner.py)
        if verdict.fhir_context is not None:
            flow.metadata[FHIR_KEY] = (req, verdict)  # checked again on the body and the response
            if verdict.pending:
                flow.request.stream = False  # the whole body is checked before anything is forwarded
                return  # a FHIR write: decided in the `request` hook once the body is in
        forward(flow, verdict)
        session = verdict.session
        if session is not None and s.sessions.needs_touch(session, time.time()):
            asyncio.get_running_loop().run_in_executor(s.pools and s.pools["decisions"], self._touch, session)

    async def _refuse(self, req, flow: http.HTTPFlow, verdict: Verdict) -> None:
        s = self.services
        verdict.audit = s.pipeline.trace(req, verdict, s.pipeline.policies)
        flow.metadata[DECIDED_KEY] = True
        if not await self._durable(verdict, req):
            verdict = audit_unavailable()
        respond(flow, s.portal.refusal(req, verdict))

    async def _portal_refusal(self, req, flow: http.HTTPFlow, verdict: Verdict) -> None:
        """A refusal of a request to dpiguard's own pages (size limits), answered as a page of theirs."""
        s = self.services
        verdict.audit = s.pipeline.trace(req, verdict, s.pipeline.policies)
        if not await self._durable(verdict, req):
            verdict = audit_unavailable()
        respond(flow, s.portal.refusal(req, verdict))

    def _targets(self) -> tuple[frozenset[str], tuple[str, str, int]]:
        """(host:port an absolute-form target may name, the DPI's scheme, host and port)."""
        if self._authorities is None:
            cfg = self.services.config
            upstream = urlsplit(cfg.upstream.url)
            default = 443 if upstream.scheme == "https" else 80
            dpi = (upstream.scheme, upstream.hostname or "", upstream.port or default)
            public = urlsplit(self.services.pipeline.fhir.public_origin) if self.services.pipeline.fhir else None
            names = {f"{dpi[1].lower()}:{dpi[2]}", f"{cfg.listen.host.lower()}:{cfg.listen.port}"}
            if public is not None and public.hostname:
                names.add(f"{public.hostname.lower()}:{public.port or (443 if public.scheme == 'https' else 80)}")
            self._authorities = (frozenset(names), dpi)
        return self._authorities

    @staticmethod
    def _portal_body_ok(flow: http.HTTPFlow) -> bool:
        """Portal bodies are small and declared: a chunked body would be buffered whole before the
        `request` hook, so one without Content-Length is refused like an oversized one."""
        headers = flow.request.headers
        if "transfer-encoding" in headers:
            return False
        length = headers.get("content-length", "0")
        return length.isdigit() and int(length) <= MAX_BODY

    async def _durable(self, verdict: Verdict, req) -> bool:
        s = self.services
        return await durable(verdict.audit, s.audit, s.config.audit.on_failure, req, verdict.user)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if FHIR_KEY in flow.metadata and flow.response is not None:
            flow.response.stream = False  # FHIR answers are checked whole before they leave
        request_id = flow.metadata.get(REQUEST_ID_KEY)
        if request_id and flow.response is not None and REQUEST_ID_HEADER not in flow.response.headers:
            flow.response.headers[REQUEST_ID_HEADER] = request_id
        if self.services is not None:
            self.services.banner.on_headers(flow)

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if FHIR_KEY in flow.metadata:
            return fhir_hooks.response(self.services, flow, flow.metadata[FHIR_KEY])
        if self.services is not None:
            self.services.banner.on_response(flow)
        return None

    def _touch(self, session) -> None:
        try:
            self.services.sessions.touch(session, time.time())
        except Exception as exc:  # the next request re-reads the session; nothing is allowed by this
            log.warning("dpiguard: session touch failed: %s", exc)
