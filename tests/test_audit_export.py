"""Exports: FHIR AuditEvent (validated with fhir.resources), syslog RFC 5424 over a real TCP socket."""

from __future__ import annotations

import base64
import re
import socket
import threading
from pathlib import Path

import orjson
import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from dpiguard.audit.chain import AuditLog
from dpiguard.audit.export import to_audit_event, to_syslog
from dpiguard.cli import main


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("export") / "audit"
    base = {"event": "access", "roles": ["doctor"], "units": ["URG"], "category": "fhir_clinical", "action": "read",
            "client": "10.1.2.3", "policy_version": "abc", "break_glass": None, "break_glass_reason": None}
    with AuditLog(root, "px1") as log:
        log.write(dict(base, user="dr.martin", patient="P0001", outcome="allow", reason="allowed", method="GET",
                       path="/fhir/Patient/P0001", fhir_type="Patient", fhir_id="P0001", request_id="r1"))
        log.write(dict(base, user="dr.martin", patient="P0002", outcome="deny", reason="not_in_care_team",
                       method="GET", path="/fhir/Observation", target="/fhir/Observation?patient=P0002",
                       fhir_type="Observation", fhir_id=None, request_id="r2"))
        log.write(dict(base, user="dr.blanchard", patient="P0003", outcome="allow", reason="allowed", method="GET",
                       path="/api/patients/P0003/notes", fhir_type=None, fhir_id=None, request_id="r3",
                       break_glass=True, break_glass_reason="unconscious patient, \"urgent\" ]"))
        log.write({"event": "login", "user": "dr.martin", "outcome": "allow", "reason": "ok", "client": "10.1.2.3"})
        log.write({"event": "admin", "action": "user_add", "user": "inf.x", "outcome": "allow", "reason": "ok"})
    return root


def test_fhir_audit_events_validate_and_follow_balp(store, capsys):
    assert main(["audit", "export", "--source", str(store), "--format", "fhir"]) == 0
    events = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(events) == 5
    for ev in events:
        AuditEvent.model_validate(ev)  # raises on any structural error
    read, search, bg = [e for e in events if e.get("type", {}).get("code") == "rest"]
    assert read["subtype"][0]["code"] == "read" and read["action"] == "R" and read["outcome"] == "0"
    assert read["meta"]["profile"][0].endswith("IHE.BasicAudit.PatientRead")
    patient = [e for e in read["entity"] if e.get("role", {}).get("code") == "1"][0]
    assert patient["what"]["reference"] == "Patient/P0001"
    assert any(e.get("what", {}).get("reference") == "Patient/P0001" and e["role"]["code"] == "4" for e in read["entity"])
    user = [a for a in read["agent"] if a.get("requestor")][0]
    assert user["who"]["identifier"]["value"] == "dr.martin"
    assert {a["type"]["coding"][0]["code"] for a in read["agent"]} == {"humanuser", "110153", "110152"}
    assert search["subtype"][0]["code"] == "search-type" and search["outcome"] == "4"
    assert search["outcomeDesc"] == "not_in_care_team"
    query = [e for e in search["entity"] if e.get("role", {}).get("code") == "24"][0]
    assert base64.b64decode(query["query"]) == b"/fhir/Observation?patient=P0002"
    codes = {c["code"] for c in bg["purposeOfEvent"][0]["coding"]}
    assert codes == {"ETREAT", "BTG"} and "unconscious" in bg["purposeOfEvent"][0]["text"]
    login = [e for e in events if e["type"]["code"] == "110114"][0]
    assert login["subtype"][0]["code"] == "110122"


def test_fhir_bundle(store, tmp_path):
    out = tmp_path / "bundle.json"
    assert main(["audit", "export", "--source", str(store), "--format", "fhir-bundle", "--out", str(out)]) == 0
    bundle = orjson.loads(out.read_bytes())
    assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) == 5


class SyslogServer:
    """A TCP receiver that splits RFC 6587 octet-counted frames."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            buf = b""
            with conn:
                while chunk := conn.recv(65536):
                    buf += chunk
            while buf:
                length, _, rest = buf.partition(b" ")
                n = int(length)
                self.messages.append(rest[:n])
                buf = rest[n:]

    def close(self):
        self.sock.close()


def test_syslog_rfc5424_over_tcp_sends_each_record_once(store, tmp_path):
    server = SyslogServer()
    state = tmp_path / "syslog.state"
    try:
        args = ["audit", "export", "--source", str(store), "--format", "syslog",
                "--target", f"127.0.0.1:{server.port}", "--state", str(state)]
        assert main(args) == 0
        assert main(args) == 0  # nothing new: nothing sent twice
        import time
        deadline = time.monotonic() + 5
        while len(server.messages) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        server.close()
    assert len(server.messages) == 5
    pattern = re.compile(rb'^<(\d+)>1 (\S+) (\S+) dpiguard (\S+) (\S+) (\[.*?[^\\]\]|-) \xef\xbb\xbf(\{.*\})$', re.S)
    parsed = [pattern.match(m) for m in server.messages]
    assert all(parsed), server.messages[0][:200]
    deny = [p for p in parsed if b'outcome="deny"' in p.group(6)][0]
    assert int(deny.group(1)) == 10 * 8 + 4 and deny.group(5) == b"access"
    assert orjson.loads(deny.group(7))["reason"] == "not_in_care_team"
    allow = parsed[0]
    assert int(allow.group(1)) == 10 * 8 + 6
    bg = [p for p in parsed if b"r3" in p.group(6)][0]
    assert orjson.loads(bg.group(7))["break_glass"] is True


def test_syslog_escapes_structured_data():
    msg = to_syslog({"event": "access", "outcome": "deny", "reason": 'a"b]c\\', "time": "2026-01-01T00:00:00.000Z",
                     "instance": "px 1"}, hostname="h")
    assert b'reason="a\\"b\\]c\\\\"' in msg and b" px1 access " in msg


def test_every_event_kind_maps_to_a_valid_audit_event():
    for rec in ({"event": "startup", "outcome": "allow"}, {"event": "lockout", "outcome": "deny", "user": "x"},
                {"event": "audit_gap", "outcome": "error", "lost": 3}, {"event": "logout", "outcome": "allow"}):
        AuditEvent.model_validate(to_audit_event(dict(rec, time="2026-01-01T00:00:00.000Z", instance="px1", seq=1)))


# -- syslog over TLS (RFC 5425) ----------------------------------------------------------------------

class TlsSyslogServer:
    """A real RFC 5425 receiver: TLS server socket (certificate from tests/certs.py), octet-counted
    frames; optionally asks for a client certificate signed by ``client_ca``."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None):
        import ssl
        import threading

        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(client_ca)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        self.peer_certs: list = []
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        import ssl

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.peer_certs.append(tls.getpeercert())
                    buf = b""
                    while True:
                        chunk = tls.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                        while b" " in buf:
                            length, _, rest = buf.partition(b" ")
                            n = int(length)
                            if len(rest) < n:
                                break
                            self.messages.append(rest[:n])
                            buf = rest[n:]
            except (ssl.SSLError, OSError) as exc:
                self.errors.append(str(exc))

    def wait(self, count: int, timeout: float = 5.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self):
        self.sock.close()


@pytest.fixture
def pki(tmp_path):
    from tests.certs import make_ca, make_leaf

    ca_key, ca_cert, ca_path = make_ca(tmp_path)
    server_cert, server_key = make_leaf(tmp_path, "siem", ca_key, ca_cert)
    client_cert, client_key = make_leaf(tmp_path, "proxy", ca_key, ca_cert, client=True)
    other_key, other_cert, other_ca = make_ca(tmp_path, "Other CA")
    return {"ca": ca_path, "server": (server_cert, server_key), "client": (client_cert, client_key), "other_ca": other_ca}


def export(*argv) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["audit", "export", "--format", "syslog", *argv])
    return code, err.getvalue()


def test_syslog_over_tls_verifies_the_receiver_and_sends_octet_counted_frames(store, tmp_path, pki):
    server = TlsSyslogServer(*pki["server"])
    try:
        state = tmp_path / "tls.state"
        code, err = export("--source", str(store), "--target", f"127.0.0.1:{server.port}", "--tls",
                           "--ca-file", str(pki["ca"]), "--state", str(state))
        assert code == 0, err
        assert "sent 5 record(s)" in err and "TLS" in err
        server.wait(5)
        assert len(server.messages) == 5 and all(m.startswith(b"<") for m in server.messages)
        assert b"not_in_care_team" in b"".join(server.messages)
        assert export("--source", str(store), "--target", f"127.0.0.1:{server.port}", "--ca-file", str(pki["ca"]),
                      "--state", str(state))[0] == 0
        server.wait(6, timeout=0.5)
        assert len(server.messages) == 5  # the state file: nothing sent twice
    finally:
        server.close()


def test_syslog_over_tls_with_a_client_certificate(store, pki):
    server = TlsSyslogServer(*pki["server"], client_ca=pki["ca"])
    try:
        code, err = export("--source", str(store), "--target", f"127.0.0.1:{server.port}", "--ca-file",
                           str(pki["ca"]), "--cert-file", str(pki["client"][0]), "--key-file", str(pki["client"][1]))
        assert code == 0, err
        server.wait(5)
        assert len(server.messages) == 5
        assert server.peer_certs and dict(x[0] for x in server.peer_certs[0]["subject"])["commonName"] == "localhost"
        # Without the client certificate the receiver refuses the handshake: a clear error, exit 1.
        code, err = export("--source", str(store), "--target", f"127.0.0.1:{server.port}", "--ca-file", str(pki["ca"]))
        assert code == 1 and "nothing sent" in err and "Traceback" not in err
    finally:
        server.close()


def test_syslog_refuses_an_untrusted_receiver_and_keeps_the_state(store, tmp_path, pki):
    server = TlsSyslogServer(*pki["server"])
    state = tmp_path / "s.state"
    try:
        code, err = export("--source", str(store), "--target", f"127.0.0.1:{server.port}",
                           "--ca-file", str(pki["other_ca"]), "--state", str(state))
        assert code == 1 and "not trusted" in err and "--ca-file" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not state.exists()  # nothing counted as sent
        assert server.messages == []
    finally:
        server.close()


def test_syslog_plain_tcp_to_the_tls_port_is_refused_unless_asked(store):
    code, err = export("--source", str(store), "--target", "127.0.0.1:6514")
    assert code == 1 and "RFC 5425" in err and "--tls" in err and "--plain-tcp" in err
    # Explicitly asked: it tries (nothing listens on 6514 here: a clear one-line error, not a traceback).
    code, err = export("--source", str(store), "--target", "127.0.0.1:6514", "--plain-tcp")
    assert code == 1 and "nothing sent" in err and "Traceback" not in err


def test_syslog_refused_connection_is_one_line_and_exit_1(store):
    from tests.redis_server import free_port

    code, err = export("--source", str(store), "--target", f"127.0.0.1:{free_port()}")
    assert code == 1 and "connection refused" in err and len(err.strip().splitlines()) == 1
    code, err = export("--source", str(store), "--target", "no-port")
    assert code == 1 and "HOST:PORT" in err
