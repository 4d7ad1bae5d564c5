"""Builds HL7 v2.5 ADT messages like a patient administration system would (IHE PAM, France)."""

from __future__ import annotations

import itertools
import socket
import time

_ids = itertools.count(1)


def hl7_time(epoch: float) -> str:
    """Epoch seconds → HL7 DTM with an explicit UTC offset."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(epoch)) + "+0000"


def adt(trigger: str, patient: str = "P0001", unit: str | None = "CARDIO", visit: str | None = "V1",
        at: float | None = None, control_id: str | None = None, *, pid3: str | None = None,
        extra: list[str] | None = None, mrg: str | None = None, charset: str = "UNICODE UTF-8") -> str:
    at = time.time() if at is None else at
    control_id = control_id or f"MSG{next(_ids):06d}"
    structure = {"A01": "ADT_A01", "A04": "ADT_A01", "A05": "ADT_A05", "A08": "ADT_A01", "A02": "ADT_A02",
                 "A03": "ADT_A03", "A40": "ADT_A39"}.get(trigger, "ADT_A09")
    pid3 = pid3 if pid3 is not None else f"{patient}^^^HOPITAL&1.2.250.1.71.4.2.2&ISO^PI~1850375123456^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^NH"
    pv1 = ["PV1", "1", "I", f"{unit}^101^1^HOPITAL" if unit else ""] + [""] * 15 + [f"{visit}^^^HOPITAL^VN" if visit else ""]
    segments = [
        f"MSH|^~\\&|SIH-GAM|HOPITAL|DPIGUARD|HOPITAL|{hl7_time(time.time())}||ADT^{trigger}^{structure}|{control_id}|P|2.5|||||FRA|{charset}|||IHE_FR",
        f"EVN||{hl7_time(time.time())}|||opera^DUPONT^JEAN|{hl7_time(at)}",
        f"PID|||{pid3}||MARTIN^ALICE^^^^^L||19700101|F",
    ]
    if mrg:
        segments.append(f"MRG|{mrg}^^^HOPITAL&1.2.250.1.71.4.2.2&ISO^PI")
    segments.append("|".join(pv1))
    segments += extra or []
    return "\r".join(segments) + "\r"


def mllp_exchange(port: int, message: str | bytes, timeout: float = 10) -> str:
    """Send one framed message on a fresh connection, return the ACK text."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        return send_on(sock, message)


def send_on(sock: socket.socket, message: str | bytes) -> str:
    data = message.encode() if isinstance(message, str) else message
    sock.sendall(b"\x0b" + data + b"\x1c\r")
    return read_ack(sock)


def read_ack(sock: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\x1c\r"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full ACK: {buf!r}")
        buf += chunk
    assert buf.startswith(b"\x0b"), buf
    return buf[1:-2].decode()


def msa(ack: str) -> list[str]:
    """Fields of the MSA segment: [MSA, code, control id, text]."""
    seg = [s for s in ack.split("\r") if s.startswith("MSA|")][0]
    return seg.split("|")
