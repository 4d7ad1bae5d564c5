"""Exports: FHIR AuditEvent (validated with fhir.resources), syslog RFC 5424 over a real TCP socket."""

from __future__ import annotations

import base64
import re
import socket
import threading

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
