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
import re
import secrets
from concurrent.futures import Future

import orjson
from mitmproxy import http
from mitmproxy.net.http import http1, url
from mitmproxy.utils import strutils

from dpiguard.audit.chain import AuditLog
from dpiguard.decision.headers import FORWARDING_HEADERS
from dpiguard.decision.verdict import Incoming, Verdict
from dpiguard.edge.portal import SECURITY_HEADERS, Reply
from dpiguard.times import iso_ms

log = logging.getLogger("dpiguard")

REQUEST_ID_KEY = "dpiguard_request_id"
STRIP_KEY = "dpiguard_strip_headers"
TRACED_KEY = "dpiguard_traced_refusal"  # a refusal record exists: the error hook adds none
DECIDED_KEY = "dpiguard_decided"  # the request was decided (and so traced) by dpiguard
REQUEST_ID_HEADER = "X-DPIGuard-Request-Id"
FHIR_JSON = "application/fhir+json"


def incoming(flow: http.HTTPFlow) -> Incoming:
    headers: dict[str, str] = {}
    size = 0
    strip = []
    for raw_name, raw_value in flow.request.headers.fields:
        size += len(raw_name) + len(raw_value) + 4
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if (name.replace("_", "-") if "_" in name else name) in FORWARDING_HEADERS:
            strip.append(raw_name)  # never forwarded (dpiguard/decision/headers.py)
        if name in headers:
            headers[name] += ("; " if name == "cookie" else ", ") + value
        else:
            headers[name] = value
    if strip:
        flow.metadata[STRIP_KEY] = strip
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
    """Apply an allowed verdict to the request: its path, the headers it loses (forwarding headers the
    client sent, the verdict's own drops, dpiguard's credentials) and the identity headers it gains.
    The header list is rebuilt in one pass (each ``headers[name] = ...`` or ``pop`` of mitmproxy's
    Headers walks every field): a name that is set loses every copy the client sent and is added
    once, at the end."""
    request = flow.request
    request.path = v.forward_target
    drop = {raw_name.lower() for raw_name in flow.metadata.get(STRIP_KEY, ())}
    drop.update(_header_bytes(name).lower() for name in v.drop_headers)
    added: dict[bytes, tuple[bytes, bytes]] = {}  # case-folded name → field; a later edit wins
    if v.public:
        drop.update((b"cookie", b"authorization"))  # no session id leaves the proxy
    else:
        for name, value in v.set_headers.items():
            raw = _header_bytes(name)
            added[raw.lower()] = (raw, _header_bytes(value))
        if v.cookie_header is not None:
            added.pop(b"cookie", None)
            if v.cookie_header:
                added[b"cookie"] = (b"cookie", _header_bytes(v.cookie_header))
            else:
                drop.add(b"cookie")
        if v.drop_authorization:
            added.pop(b"authorization", None)
            drop.add(b"authorization")
        drop.update(added)
    headers = request.headers
    if drop:
        headers.fields = tuple(f for f in headers.fields if f[0].lower() not in drop) + tuple(added.values())


def _header_bytes(text: str) -> bytes:
    """A header name or value as mitmproxy's Headers stores a ``str`` (UTF-8, surrogates escaped)."""
    return strutils.always_bytes(text, "utf-8", "surrogateescape")


def respond(flow: http.HTTPFlow, reply: Reply) -> None:
    headers = [(b"Content-Type", reply.content_type.encode())]
    request_id = flow.metadata.get(REQUEST_ID_KEY)
    if request_id:
        headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
    own = {k.lower() for k, _ in reply.headers}  # a page's own Content-Security-Policy replaces the default
    headers += [(k.encode(), v.encode("latin-1")) for k, v in SECURITY_HEADERS if k.lower() not in own]
    headers += [(k.encode(), v.encode("latin-1")) for k, v in reply.headers]
    # An answer to HEAD has no body (one would be read as the start of the next answer on the connection).
    body = b"" if flow.request.method.upper() == "HEAD" else reply.body
    flow.response = http.Response.make(reply.status, body, headers)


def origin_form(flow: http.HTTPFlow, accepted: frozenset[str], upstream: tuple[str, str, int]) -> bool:
    """An absolute-form request target (``GET http://host/path``) is accepted only when it names the DPI
    or dpiguard itself (``accepted``: lower-case ``host:port``), and is then forwarded in origin form
    with the DPI's own Host. False: refuse it."""
    request = flow.request
    if not request.authority or request.is_http2 or request.is_http3:
        return True  # origin form (HTTP/2 always has :authority; mitmproxy sets the DPI's)
    try:  # the authority as sent: mitmproxy has already put the DPI's address in request.host
        host, port = url.parse_authority(request.authority, check=True)
    except ValueError:
        return False
    port = port or (443 if request.scheme == "https" else 80)
    if f"{host.lower()}:{port}" not in accepted:
        return False
    scheme, host, upstream_port = upstream
    request.authority = ""
    request.scheme, request.host, request.port = scheme, host, upstream_port
    request.host_header = host if upstream_port == (443 if scheme == "https" else 80) else f"{host}:{upstream_port}"
    return True


def respond_fhir(flow: http.HTTPFlow, status: int, outcome: dict) -> None:
    """Answer with an OperationOutcome of dpiguard's (the DPI's answer, if any, is dropped whole)."""
    respond(flow, Reply(status, orjson.dumps(outcome), FHIR_JSON))


class _BatchWait(asyncio.Future):
    """The event loop's side of one group-commit batch: every request whose record is in the batch
    awaits this one future, settled by one loop wake-up when the batch is on disk (or failed, or past
    ``write_timeout``). A request task being cancelled must not cancel its batch-mates' wait: ``cancel``
    refuses, so the cancelled task alone gets CancelledError once the batch is settled."""

    def cancel(self, msg=None) -> bool:
        return False


_batches: dict[Future, _BatchWait] = {}  # batch future → its waiter on the loop (loop thread only)


def _settle(batch: Future, waiter: _BatchWait, timer: asyncio.TimerHandle) -> None:
    if _batches.get(batch) is waiter:
        del _batches[batch]
    timer.cancel()
    if waiter.done():
        return
    exc = batch.exception()
    if exc is None:
        waiter.set_result(True)
    else:
        waiter.set_exception(exc)


def _expire(batch: Future, waiter: _BatchWait) -> None:
    if _batches.get(batch) is waiter:
        del _batches[batch]
    if not waiter.done():
        waiter.set_exception(TimeoutError("audit record not durable in time"))


def durable_wait(future: Future, timeout: float) -> asyncio.Future | None:
    """None if the record behind ``future`` is already on disk; else a future of the running loop that
    completes when it is (shared by every record of the batch: one wake-up of the loop per batch), or
    fails (the batch failed: AuditError; not on disk within ``timeout``: TimeoutError)."""
    if future.done():
        exc = future.exception()
        if exc is not None:
            raise exc
        return None
    waiter = _batches.get(future)
    loop = asyncio.get_running_loop()
    if waiter is not None and waiter.get_loop() is loop:
        return waiter
    if waiter is not None:  # another loop waits on this batch (tests): a wait of this loop's own
        return asyncio.ensure_future(asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout))
    waiter = _BatchWait(loop=loop)
    _batches[future] = waiter
    timer = loop.call_later(timeout, _expire, future, waiter)

    def done(_f: Future) -> None:  # writer thread: one call into the loop per batch
        try:
            loop.call_soon_threadsafe(_settle, future, waiter, timer)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    future.add_done_callback(done)
    return waiter


async def durable(future: Future | None, audit: AuditLog, on_failure: str, req: Incoming,
                  user: str | None = None) -> bool:
    """True once the record behind ``future`` is on disk; False if it cannot be made durable in
    ``audit.write_timeout`` (then the caller refuses), unless ``on_failure`` is ``serve``."""
    ok = durable_now(future, audit, on_failure, req, user)
    if ok is not None:
        return ok
    try:
        waiting = durable_wait(future, audit.write_timeout)
        if waiting is not None:  # None: on disk since durable_now looked
            await waiting
        return True
    except Exception as exc:
        return _not_durable(exc, on_failure, req, user)


def durable_now(future: Future | None, audit: AuditLog, on_failure: str, req: Incoming,
                user: str | None = None) -> bool | None:
    """:func:`durable` without waiting: True or False when already known (no record, or the record's
    batch is already on disk or failed), None when the caller must await :func:`durable`."""
    if future is None:  # no record could even be queued: the decision is already a refusal
        return True
    if not future.done():
        return None
    exc = future.exception()
    return True if exc is None else _not_durable(exc, on_failure, req, user)


def _not_durable(exc: BaseException, on_failure: str, req: Incoming, user: str | None) -> bool:
    if on_failure == "serve":
        log.error("dpiguard: AUDIT RECORD LOST for request %s (%s %s by %s): %s; serving anyway "
                  "(audit.on_failure=serve)", req.request_id, req.method, req.target[:200], user, exc)
        return True
    log.error("dpiguard: audit record of request %s not durable (%s); refusing", req.request_id, exc)
    return False


def framing_error(flow: http.HTTPFlow, req: Incoming) -> str | None:
    """Why mitmproxy refused this request itself (it answers 400 and closes), or None. mitmproxy still
    runs the requestheaders hook for some of these: they must be traced as refusals, never decided."""
    if flow.error is not None:
        return flow.error.msg
    if "transfer-encoding" in req.headers or "content-length" in req.headers:
        try:
            http1.expected_http_body_size(flow.request)
        except ValueError as exc:
            return str(exc)
    return None


def trace_http_error(audit: AuditLog | None, flow: http.HTTPFlow, message: str) -> None:
    """One record for a request mitmproxy refused or that failed on the way (error hook): a refusal
    never decided by dpiguard is an ``access`` record (``http_protocol_error``); the failure of a
    request dpiguard had decided is an ``http_error`` record with the same request id."""
    if audit is None or flow.metadata.get(TRACED_KEY):
        return
    flow.metadata[TRACED_KEY] = True
    decided = DECIDED_KEY in flow.metadata
    request_id = flow.metadata.get(REQUEST_ID_KEY) or secrets.token_hex(8)
    flow.metadata.setdefault(REQUEST_ID_KEY, request_id)
    peer = flow.client_conn.peername if flow.client_conn else None
    request = flow.request
    try:
        audit.submit({
            "event": "http_error" if decided else "access", "outcome": "deny",
            "reason": ("upstream_error" if flow.server_conn and flow.server_conn.error else "connection_error")
            if decided else "http_protocol_error",
            "time": iso_ms(), "request_id": request_id, "client": peer[0] if peer else None,
            "method": request.method[:16] if request else None,
            "target": request.path[:512] if request else None, "detail": str(message)[:300],
        })
    except Exception as exc:
        log.error("dpiguard: could not trace an HTTP error: %s", exc)


# mitmproxy's own messages for request heads it cannot parse: no flow exists, only this log line.
_UNPARSED = re.compile(r"^(?P<peer>\S+): (?P<error>(Bad HTTP request line|Invalid header line|Invalid headers|"
                       r"Unknown HTTP version|Invalid HTTP version|Invalid request|Malformed).*)$", re.S)


class UnparsedRequestTracer(logging.Handler):
    """Turns mitmproxy's log line about a request head it could not parse (malformed request line,
    invalid header line...) into a refusal record with a request id (reason ``http_protocol_error``)."""

    def __init__(self, audit: AuditLog):
        super().__init__(logging.INFO)
        self.audit = audit

    def emit(self, record: logging.LogRecord) -> None:
        try:
            match = _UNPARSED.match(record.getMessage())
            if match is None:
                return
            client = getattr(record, "client", None)
            self.audit.submit({
                "event": "access", "outcome": "deny", "reason": "http_protocol_error", "time": iso_ms(),
                "request_id": secrets.token_hex(8), "client": client[0] if client else match["peer"],
                "method": None, "target": None, "detail": match["error"][:300],
            })
        except Exception:  # a logging handler never raises into mitmproxy
            pass


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
