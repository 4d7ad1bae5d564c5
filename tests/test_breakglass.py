"""Emergency access and objections below the proxy: policy file validation, the pure decision order,
the stores and the request service, against a real Redis-protocol server."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import orjson
import pyotp
import pytest

from dpiguard.audit.chain import AuditLog, read_records
from dpiguard.auth.login import Authenticator
from dpiguard.auth.users import SecretBox, UserDirectory
from dpiguard.careteam.breakglass import BreakGlassDataError, BreakGlassStore, Grant
from dpiguard.careteam.objections import ImportReport, ObjectionDataError, ObjectionStore, find_objection
from dpiguard.careteam.store import CareTeamStore
from dpiguard.config import Login
from dpiguard.decision.access import AccessDecider, decide_from
from dpiguard.decision.breakglass import BreakGlassService
from dpiguard.policy.breakglass import BreakGlassPolicy
from dpiguard.policy.snapshot import PolicySet
from dpiguard.policy.table import PolicyError

ROOT = Path(__file__).resolve().parents[1]
POLICIES = PolicySet.load(ROOT / "policies")
POLICY = POLICIES.table
BG = BreakGlassPolicy.load(ROOT / "policies", POLICY.roles, POLICY.categories)
assert POLICIES.breakglass == BG  # the set holds the same rules as the file read alone
T0 = 1_700_000_010.0
TEXT = "Unconscious patient brought in by the SAMU"


# -- policies/breakglass.yaml ----------------------------------------------------------------------

def test_shipped_file_loads_with_documented_defaults():
    assert BG.enabled and "urgence_vitale" in BG.reasons
    assert BG.duration_seconds == 4 * 3600 and BG.justification_min_length == 20
    assert BG.never_roles == {"reception", "secretary"} and BG.override_patient_objection is False
    assert not BG.roles_allowed(["doctor", "secretary"]) and BG.roles_allowed(["nurse"])
    assert BG.reachable("biology", "read") and not BG.reachable("administrative", "read")


def test_missing_file_means_emergency_access_off(tmp_path):
    p = BreakGlassPolicy.load(tmp_path, POLICY.roles, POLICY.categories)
    assert not p.enabled and not p.reachable("biology", "read")


@pytest.mark.parametrize("old, new, offset, message", [
    ("  - imaging", "  - radiology", 0, "unknown category 'radiology'"),
    ("  - secretary", "  - secretaire", 0, "unknown role 'secretaire'"),
    ("duration_seconds: 14400", "duration_seconds: 0", 0, "'duration_seconds' must be a whole number"),
    ("override_patient_objection: false", "override_patient_objection: maybe", 0, "true or false"),
    ("enabled: true", "enabled: true\nenable_alerts: true", 1, "unknown setting 'enable_alerts'"),
    ("  garde: On-call", "  Garde: On-call", 0, "reason code 'Garde'"),
    ("  - write", "  - delete", 0, "unknown action 'delete'"),
    ("  - reception\n", "  - reception\n  - reception\n", 1, "written twice"),
])
def test_mistakes_are_named_with_file_and_line(tmp_path, old, new, offset, message):
    text = (ROOT / "policies" / "breakglass.yaml").read_text()
    assert old in text
    line = text[:text.index(old)].count("\n") + 1 + offset
    (tmp_path / "breakglass.yaml").write_text(text.replace(old, new))
    with pytest.raises(PolicyError) as err:
        BreakGlassPolicy.load(tmp_path, POLICY.roles, POLICY.categories)
    assert err.value.file.endswith("breakglass.yaml") and err.value.line == line, str(err.value)
    assert message in str(err.value)


# -- the decision order (pure) ---------------------------------------------------------------------

def grant(**kw) -> Grant:
    values = dict(id="BG0123456789abcdef", user="nina", patient="P1", reason="garde", text=TEXT,
                  categories=("biology",), actions=("read",), start=T0 - 10, end=T0 + 100)
    values.update(kw)
    return Grant(**values)


def decide(units=None, stays=None, assignment=None, objections=None, g=None, category="biology",
           action="read", required=True, policy=BG):
    return decide_from("nina", "P1", category, action, required, T0, units or {}, stays or {}, assignment,
                       objections or {}, None if g is None else g.dumps(), 0, policy)


MEMBER = {"units": {b"CARDIO": b"|"}, "stays": {b"S1": orjson.dumps({"unit": "CARDIO", "start": T0 - 50, "end": None})}}
OBJ_UNIT = {b"unit:CARDIO": orjson.dumps({"date": T0, "source": "dpo", "comment": ""})}
OBJ_USER = {b"user:nina": orjson.dumps({"date": T0, "source": "dpo", "comment": ""})}


def test_order_objection_then_care_team_then_grant():
    d, _ = decide(**MEMBER)
    assert d.member and d.source.startswith("unit:CARDIO") and d.break_glass is None
    d, _ = decide(**MEMBER, objections=OBJ_UNIT)  # the unit nurse, refused anyway
    assert not d.member and d.reason == "patient_objection" and d.source == "objection:unit:CARDIO"
    d, _ = decide(objections=OBJ_USER, required=False)  # non care-team data too
    assert not d.member and d.reason == "patient_objection"
    d, until = decide(g=grant())
    assert d.member and d.break_glass.id == "BG0123456789abcdef" and until == T0 + 100
    d, _ = decide()
    assert not d.member and d.reason == "not_in_care_team"


def test_grant_limited_to_its_categories_actions_and_window():
    assert not decide(g=grant(), category="imaging")[0].member
    assert not decide(g=grant(), action="write")[0].member
    assert not decide(g=grant(end=T0 - 1))[0].member
    off = BreakGlassPolicy(**{**BG.__dict__, "enabled": False})
    assert not decide(g=grant(), policy=off)[0].member  # switched off: grants stop working at once


def test_objection_override_is_a_setting():
    d, _ = decide(objections=OBJ_USER, g=grant())
    assert not d.member and d.reason == "patient_objection"
    override = BreakGlassPolicy(**{**BG.__dict__, "override_patient_objection": True})
    d, _ = decide(objections=OBJ_USER, g=grant(), policy=override)
    assert d.member and d.break_glass is not None and d.objection_overridden == "user:nina"


def test_malformed_data_raises_never_allows():
    with pytest.raises(ObjectionDataError):
        decide(**MEMBER, objections={b"user:x": b"{not json"})
    with pytest.raises(BreakGlassDataError):
        decide_from("nina", "P1", "biology", "read", True, T0, {}, {}, None, {}, b"[]", 0, BG)
    with pytest.raises(ValueError):
        decide(g=grant(user="someone-else"))


def test_unit_objection_follows_unit_membership_window():
    units = {b"CARDIO": f"|{T0 + 30:.0f}".encode()}
    d, until = decide(units=units, objections=OBJ_UNIT, required=False)
    assert not d.member and until == T0 + 30
    assert find_objection("P1", OBJ_UNIT, "nina", []) is None


# -- stores against Redis --------------------------------------------------------------------------

def test_decider_one_round_trip_and_grant_lifecycle(r):
    ct, obj, store = CareTeamStore(r), ObjectionStore(r), BreakGlassStore(r)
    decider = AccessDecider(ct, obj, store)
    ct.add_unit_member("nina", "CARDIO")
    ct.add_stay("P1", "PNEUMO", start=T0 - 100)
    assert decider.decide("nina", "P1", "biology", "read", True, T0, POLICIES)[0].reason == "not_in_care_team"
    pubsub = r.pubsub()
    pubsub.subscribe("dpiguard:events")
    g = grant()
    store.create(g)
    d, until = decider.decide("nina", "P1", "biology", "read", True, T0, POLICIES)
    assert d.member and d.break_glass == g and until == g.end
    assert r.ttl(store.keys.grants_of("nina")) > 0  # the key goes away after its last grant
    rec = store.get(g.id)
    assert rec["status"] == "pending" and rec["grant"] == g
    assert [x["grant"].id for x in store.review_queue(pending_only=True)] == [g.id]
    with pytest.raises(ValueError):
        store.mark(g.id, "justified", "  ", by="rssi")
    store.mark(g.id, "abusive", "no emergency on that day", by="rssi")
    assert store.review_queue(pending_only=True) == []
    store.revoke(g.id, by="rssi")
    assert store.current("nina", "P1") is None
    assert decider.decide("nina", "P1", "biology", "read", True, T0, POLICIES)[0].reason == "not_in_care_team"
    assert store.get(g.id)["revoked_by"] == "rssi"
    messages = []
    deadline = time.monotonic() + 2
    while len(messages) < 4 and time.monotonic() < deadline:
        m = pubsub.get_message(timeout=0.2)
        if m and m["type"] == "message":
            messages.append(m["data"].decode())
    assert messages == ["patient:P1", "user:nina", "patient:P1", "user:nina"]
    with pytest.raises(KeyError):
        store.get("BGffffffffffffffff")
    with pytest.raises(KeyError):
        store.revoke("not-an-id", by="x")


def test_objection_store_and_csv_import(r, tmp_path):
    obj = ObjectionStore(r)
    obj.add("P1", "user", "Dr.Martin", comment="asked by letter")
    assert [o.field for o in obj.list()] == ["user:dr.martin"]
    assert obj.find("P1", "dr.martin", []).source == "cli"
    csv_file = tmp_path / "obj.csv"
    csv_file.write_text("\ufeffpatient,type,target,date,comment\n"
                        "# comment line\n"
                        "P2,unit,cardio,2026-01-15,phone\n"
                        "P3,service,X,,\n"
                        "P4,user,bad login!,,\n"
                        "P5,user,ok.user,yesterday,\n"
                        "P2,unit,CARDIO,,\n"
                        "P6,user\n", encoding="utf-8")
    report = obj.import_csv(csv_file)
    assert report.added == 0 and len(report.errors) == 5
    assert f"{csv_file}:4: column 'type'" in report.errors[0]
    assert f"{csv_file}:5: column 'target'" in report.errors[1]
    assert f"{csv_file}:6: column 'date'" in report.errors[2]
    assert f"{csv_file}:7: column 'target': same objection as line 3" in report.errors[3]
    assert f"{csv_file}:8: expected 5 columns" in report.errors[4]
    assert [o.patient for o in obj.list()] == ["P1"]  # all or nothing
    csv_file.write_text("patient,type,target\nP2,unit,cardio\nP3,user,ok.user\n")
    assert obj.import_csv(csv_file, dry_run=True).errors == [] and len(obj.list()) == 1
    report = obj.import_csv(csv_file)
    assert report.added == 2 and not report.errors
    assert obj.find("P2", "anyone", ["CARDIO"]).target == "CARDIO"
    assert obj.remove("P2", "unit", "CARDIO") and not obj.remove("P2", "unit", "CARDIO")
    bad = ImportReport()
    obj.validate_csv("patient,type\nP1,user\n", "x.csv", bad, "csv")
    assert bad.errors == ["x.csv:1: column 'target': required column missing from the header"]


# -- the request service ----------------------------------------------------------------------------

@pytest.fixture
def service(r, tmp_path):
    users = UserDirectory(r, SecretBox(os.urandom(32)))
    _, uri = users.add("nina", "Correct-Horse-42", ["nurse"])
    users.add("sam", "Correct-Horse-42", ["secretary"])
    totp = pyotp.TOTP(parse_qs(urlparse(uri).query)["secret"][0])
    audit = AuditLog(tmp_path / "audit.jsonl", "t").open()
    granted = []
    svc = BreakGlassService(store=BreakGlassStore(r), objections=ObjectionStore(r),
                            careteam=CareTeamStore(r), authenticator=Authenticator(r, users, Login()),
                            audit=audit, on_grant=lambda u, p: granted.append((u, p)))
    svc.totp, svc.audit_path, svc.granted = totp, tmp_path / "audit.jsonl", granted
    return svc


def ask(svc, user="nina", roles=("nurse",), patient="P1", reason="urgence_vitale", text=TEXT, code=None, now=T0):
    return svc.request(BG, user=user, roles=roles, patient=patient, reason=reason, text=text,
                       totp=code if code is not None else svc.totp.at(now), client_ip="192.0.2.1",
                       request_id="r1", now=now)


def test_service_grants_and_traces_the_alert_first(service):
    out = ask(service)
    assert out.ok and out.status == 201 and out.grant.end == T0 + 14400
    assert service.granted == [("nina", "P1")]
    (alert,) = [x for x in read_records(service.audit_path) if x["event"] == "break_glass"]
    assert alert["alert"] is True and alert["break_glass_id"] == out.grant.id and alert["break_glass_text"] == TEXT
    assert service.store.current("nina", "P1") == out.grant
    # The same code again: refused (single use), but a correct code is never counted as a failure.
    again = ask(service)
    assert again.status == 401 and again.error == "totp_reused" and 0 < again.retry_after <= 30
    assert service.store.current("nina", "P1") == out.grant
    assert [x["reason"] for x in read_records(service.audit_path) if x["event"] == "break_glass_request"] == [
        "totp_reused"]


def test_the_login_code_serves_once_more_in_its_session(service, r):
    """Break-glass at 3 a.m.: the code she just logged in with works, no wait for the next step; once."""
    from dpiguard.auth.sessions import SessionStore

    sessions = SessionStore(r)
    auth = service.authenticator
    code = service.totp.at(T0)
    login = auth.login("nina", "Correct-Horse-42", code, "192.0.2.1", now=T0)
    assert login.ok and login.totp_step == int(T0) // 30
    _, session = sessions.create("nina", ["nurse"], login_step=login.totp_step)
    other_token, other = sessions.create("nina", ["nurse"], login_step=None)  # a session opened otherwise

    def ask_in(sess, patient):
        return service.request(BG, user="nina", roles=("nurse",), patient=patient, reason="urgence_vitale",
                               text=TEXT, totp=code, client_ip="192.0.2.1", request_id="r", now=T0 + 20,
                               login_step=sess.login_step, claim_login_code=lambda: sessions.claim_login_code(sess))

    assert ask_in(other, "P1").error == "totp_reused"  # not this session's login code
    first = ask_in(session, "P1")
    assert first.ok, first
    second = ask_in(session, "P2")
    assert second.error == "totp_reused" and second.status == 401  # once only, on every instance
    assert r.get("dpiguard:authfail:{nina}") is None  # correct codes never count as failures
    (alert,) = [x for x in read_records(service.audit_path) if x["event"] == "break_glass"]
    assert alert["step_up"] == "login_code_step_up"


def test_user_ends_own_grant_early(service):
    out = ask(service)
    assert service.end(out.grant.id, user="sam", client_ip="192.0.2.1", request_id="r2") is None
    assert service.store.current("nina", "P1") == out.grant  # not someone else's to end
    ended = service.end(out.grant.id, user="nina", client_ip="192.0.2.1", request_id="r3")
    assert ended == out.grant and service.store.current("nina", "P1") is None
    assert service.store.get(out.grant.id)["revoked_by"] == "nina"
    events = [(x["event"], x["outcome"]) for x in read_records(service.audit_path) if x["event"] == "break_glass_end"]
    assert events == [("break_glass_end", "deny"), ("break_glass_end", "allow")]


def test_service_refusals(service, r):
    assert ask(service, user="sam", roles=("secretary",)).error == "break_glass_forbidden"
    assert ask(service, roles=("nurse", "reception")).error == "break_glass_forbidden"
    assert ask(service, reason="boredom").status == 400
    assert ask(service, text="x" * 19).status == 400
    assert ask(service, patient="../P1").status == 400
    ObjectionStore(r).add("P9", "user", "nina")
    assert ask(service, patient="P9").error == "patient_objection"
    assert r.get("dpiguard:authfail:{nina}") is None  # none of these touched the code or the counters
    reasons = [x["reason"] for x in read_records(service.audit_path) if x["event"] == "break_glass_request"]
    assert reasons == ["break_glass_forbidden", "break_glass_forbidden", "invalid_request", "invalid_request",
                       "invalid_request", "patient_objection"]


def test_wrong_codes_count_as_login_failures_and_lock(service):
    first = ask(service, code="000000")
    assert (first.status, first.error, first.attempts_left) == (401, "invalid_totp", 2)
    assert ask(service, code="000001").attempts_left == 1
    third = ask(service, code="000002")
    assert third.status == 429 and third.error == "locked" and third.retry_after > 0
    assert ask(service).status == 429  # even the right code, while locked
    assert service.store.current("nina", "P1") is None


def test_concurrent_grants_keep_one_current_grant_per_patient(service):
    store = service.store
    grants = [grant(id=f"BG{i:016x}", start=T0 + i, end=T0 + 1000 + i) for i in range(8)]
    threads = [threading.Thread(target=store.create, args=(g,)) for g in grants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.current("nina", "P1").id in {g.id for g in grants}
    assert len(store.review_queue()) == 8


def test_copy_of_policies_with_breakglass_off(tmp_path):
    shutil.copytree(ROOT / "policies", tmp_path / "p")
    f = tmp_path / "p" / "breakglass.yaml"
    f.write_text(f.read_text().replace("enabled: true", "enabled: false"))
    p = BreakGlassPolicy.load(tmp_path / "p", POLICY.roles, POLICY.categories)
    assert not p.enabled and p.reasons  # still validated
