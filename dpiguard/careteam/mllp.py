"""MLLP listener for the ADT feed: HL7 v2 messages framed ``0x0B message 0x1C 0x0D`` over TCP.

One asyncio server; each connection is served on its own, one message at a time (MLLP is
request/acknowledgement). For each frame:

1. size limit (``max_message_bytes``): a larger frame gets an AR acknowledgement and the connection
   is closed (its framing can no longer be trusted);
2. decoding (MSH-18), delimiters, parsing (dpiguard/adt.py): AR with the reason when unusable;
3. applying (dpiguard/movements.py, in a worker thread): AA, or AE with the reason; a Redis failure
   gives AE (HL7 code 207) so that the sender retries later; nothing is half-applied;
4. one trace record (``event: adt_message``) per message, applied or not.

Bytes outside a frame (garbage, HTTP...), or a frame not completed within ``read_timeout`` seconds,
close that connection with a logged error; a connection closed mid-frame applies nothing. Other
connections are never affected.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

from dpiguard.careteam import adt
from dpiguard.careteam.adt import AdtError, Header, ParseOptions
from dpiguard.careteam.movements import MovementResult, MovementStore

log = logging.getLogger("dpiguard.adt")

START = b"\x0b"
END = b"\x1c\x0d"


def frame(message: str | bytes) -> bytes:
    """Wrap one HL7 message in MLLP framing."""
    data = message.encode() if isinstance(message, str) else message
    return START + data + END


@dataclass
class ListenerSettings:
    host: str = "127.0.0.1"
    port: int = 2575
    max_message_bytes: int = 1_048_576
    read_timeout: float = 30.0
    application: str = "DPIGUARD"
    parse: ParseOptions = ParseOptions()


class AdtProcessor:
    """Bytes of one frame → (ACK text, trace record). Blocking (Redis): run it in a thread."""

    def __init__(self, store: MovementStore, audit, options: ParseOptions, application: str = "DPIGUARD"):
        self.store = store
        self.audit = audit
        self.options = options
        self.application = application
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(3).upper()
        # Called with (message text, patient) for each applied message (privacy learner: demographics of
        # PID; a queue append, no I/O). Set by the composition root.
        self.on_applied = None

    def _ack(self, header: Header, outcome: MovementResult) -> bytes:
        ack = adt.build_ack(header, outcome.ack, outcome.text, outcome.code, application=self.application,
                            control_id=f"DPG{self._id_prefix}{next(self._ids)}",
                            timestamp=time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "+0000")
        return ack.encode("utf-8")

    def handle(self, raw: bytes, client: str = "") -> bytes:
        """Process one framed message; always returns an ACK and writes one trace record."""
        header = Header()
        mv = None
        try:
            text = adt.decode(raw)
            header = adt.read_header(text)
            mv = adt.parse_message(text, self.options)
            outcome = self.store.apply(mv)
            if self.on_applied is not None and outcome.ack == "AA":
                self.on_applied(text, mv.patient)
        except AdtError as exc:
            outcome = MovementResult(exc.ack, exc.message, exc.code)
        except redis.RedisError as exc:
            log.error("dpiguard adt: Redis error while applying %s: %s", header.control_id, exc)
            outcome = MovementResult("AE", "temporary failure of the care-team store; resend later", adt.ERR_INTERNAL)
        except Exception as exc:  # never let one message kill the listener
            log.exception("dpiguard adt: unexpected error on message %s", header.control_id)
            outcome = MovementResult("AE", f"internal error ({type(exc).__name__}); resend later", adt.ERR_INTERNAL)
        self.trace(header, mv, outcome, client)
        return self._ack(header, outcome)

    def reject_frame(self, reason: str, client: str, raw_head: bytes = b"") -> bytes:
        """ACK (AR) for a frame that could not even be read (too large...)."""
        header = adt.read_header(raw_head.decode("latin-1")) if raw_head.startswith(b"MSH") else Header()
        outcome = MovementResult("AR", reason, adt.ERR_DATA_TYPE)
        self.trace(header, None, outcome, client)
        return self._ack(header, outcome)

    def trace(self, header: Header, mv, outcome: MovementResult, client: str) -> None:
        record = {
            "event": "adt_message",
            "outcome": "duplicate" if outcome.duplicate else ("applied" if outcome.ack == "AA" else "rejected"),
            "reason": outcome.text[:300],
            "ack": outcome.ack,
            "hl7_error": outcome.code,
            "message_control_id": (mv.control_id if mv else header.control_id) or None,
            "sender": mv.sender if mv else (header.sending_application or None),
            "event_type": mv.trigger if mv else (header.trigger or None),
            "patient": mv.patient if mv else None,
            "visit": outcome.visit or (mv.visit if mv else None),
            "unit": mv.unit if mv else None,
            "event_time": mv.time if mv else None,
            "client": client,
        }
        try:
            self.audit.write(record)
        except Exception as exc:  # the movement is in the Redis journal; say it loudly
            log.error("dpiguard adt: trace write failed for %s: %s", record["message_control_id"], exc)


class MllpServer:
    """The asyncio MLLP server. ``await start()``, then ``port`` is bound; ``await stop()``."""

    def __init__(self, processor: AdtProcessor, settings: ListenerSettings, executor: Any = None):
        self.processor = processor
        self.settings = settings
        self.executor = executor  # where messages are applied (a bounded pool; None: asyncio's default)
        self._server: asyncio.AbstractServer | None = None
        self.port: int | None = None
        self.connections = 0
        self.messages = 0

    async def start(self) -> "MllpServer":
        self._server = await asyncio.start_server(self._serve, self.settings.host, self.settings.port,
                                                  limit=64 * 1024)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("dpiguard adt: MLLP listener on %s:%s", self.settings.host, self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if peer else ""
        self.connections += 1
        pending = bytearray()
        connected = time.monotonic()
        try:
            while True:
                raw = await self._next_frame(reader, pending, client, writer, connected)
                connected = None  # later frames: the clock starts at their first byte
                if raw is None:
                    return
                self.messages += 1
                ack = await asyncio.get_running_loop().run_in_executor(self.executor, self.processor.handle, raw, client)
                writer.write(frame(ack))
                await writer.drain()
        except ConnectionError:
            log.warning("dpiguard adt: connection %s lost", client)
        except Exception:
            log.exception("dpiguard adt: error on connection %s", client)
        finally:
            self.connections -= 1
            writer.close()
            try:
                await writer.wait_closed()
            except Exception:
                pass

    async def _next_frame(self, reader, pending: bytearray, client: str, writer,
                          connected: float | None = None) -> bytes | None:
        """The next frame's content, or None when the connection must end (after logging why).

        ``read_timeout`` bounds the time to a complete frame: from ``connected`` for the first frame of
        a connection (a sender connects to send), otherwise from the first byte after the previous
        frame, whitespace included (so a peer sending only whitespace is closed). Silence between two
        frames of a persistent connection is allowed."""
        limit = self.settings.max_message_bytes
        deadline = None if connected is None else connected + self.settings.read_timeout
        while True:
            skip = 0
            while skip < len(pending) and pending[skip] in b"\r\n \t":
                skip += 1  # only whitespace is tolerated between frames
            del pending[:skip]
            if skip and deadline is None:
                deadline = time.monotonic() + self.settings.read_timeout
            if pending:
                if pending[0] != 0x0B:
                    log.error("dpiguard adt: %s sent data outside an MLLP frame (0x%02x); closing",
                              client, pending[0])
                    return None
                if deadline is None:
                    deadline = time.monotonic() + self.settings.read_timeout
                end = pending.find(b"\x1c", 1)
                if end >= 0 and end + 1 < len(pending):
                    if pending[end + 1] != 0x0D:
                        log.error("dpiguard adt: %s: frame end 0x1C not followed by 0x0D; closing", client)
                        return None
                    body = bytes(pending[1:end])
                    del pending[:end + 2]
                    if len(body) > limit:
                        return await self._too_large(body, client, writer)
                    if b"\x0b" in body:
                        log.error("dpiguard adt: %s: start block inside a frame; closing", client)
                        await self._reply_reject("start block 0x0B inside a message", client, body, writer)
                        return None
                    return body
                if len(pending) > limit + 2:
                    return await self._too_large(bytes(pending[1:]), client, writer)
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                log.error("dpiguard adt: %s: frame not completed within %.0f s; closing",
                          client, self.settings.read_timeout)
                return None
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout)
            except asyncio.TimeoutError:
                continue  # the deadline check above logs and closes
            if not chunk:
                if pending:
                    log.error("dpiguard adt: %s closed the connection inside a frame (%d bytes); "
                              "nothing applied", client, len(pending))
                return None
            pending += chunk

    async def _too_large(self, body: bytes, client: str, writer) -> None:
        log.error("dpiguard adt: %s: message larger than %d bytes; rejected, closing",
                  client, self.settings.max_message_bytes)
        await self._reply_reject(f"message larger than {self.settings.max_message_bytes} bytes",
                                 client, body, writer)
        return None

    async def _reply_reject(self, reason: str, client: str, body: bytes, writer) -> None:
        ack = await asyncio.get_running_loop().run_in_executor(self.executor, self.processor.reject_frame, reason,
                                                               client, body[:512])
        writer.write(frame(ack))
        await writer.drain()


def listener_settings(cfg) -> ListenerSettings:
    """The listener settings of the ``adt`` section of a configuration."""
    a = cfg.adt
    return ListenerSettings(
        host=a.listen_host, port=a.listen_port, max_message_bytes=a.max_message_bytes,
        read_timeout=a.read_timeout, application=a.application,
        parse=ParseOptions(patient_id_authority=a.patient_id_authority, timezone=a.timezone),
    )
