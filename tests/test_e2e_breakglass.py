"""Emergency access (bris de glace) and patient objections, end to end: real Redis process, real demo
DPI, real mitmproxy processes running dpiguard (tests/stack.py).

Proxy ``a`` uses the repository's policies (4 h window, objections not overridable); proxy ``b`` uses
a copy whose breakglass.yaml has a 4 s window and ``override_patient_objection: true``. The window
is set by the instance that grants; the override is decided by the instance that serves the request.
Each test uses its own accounts, so that TOTP steps never need waiting for.
"""

from __future__ import annotations

import html
import re
import shutil
import time

import httpx
import orjson
import pytest

from dpiguard.audit.chain import read_records
from dpiguard.careteam.breakglass import BreakGlassStore
from dpiguard.careteam.objections import ObjectionStore
from dpiguard.cli import main as cli_main
from dpiguard.services import redis_client
from tests.policyseal import seal

from .stack import ROOT, build_stack

pytestmark = pytest.mark.timeout(180)

JUSTIFICATION = "Patient admitted in cardiac arrest, usual team unreachable"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("bg-stack")
    short = work / "policies-short"
    shutil.copytree(ROOT / "policies", short)
    text = (short / "breakglass.yaml").read_text()
    text = text.replace("duration_seconds: 14400", "duration_seconds: 4")
    text = text.replace("override_patient_objection: false", "override_patient_objection: true")
    (short / "breakglass.yaml").write_text(text)
    seal(short)
    s = build_stack(work)
    s.start_proxy("a")
    s.start_proxy("b", env={"DPIGUARD_POLICIES__DIR": str(short)})
    yield s
    s.close()


def records(stack, **match):
    return [r for r in read_records(stack.audit_path) if all(r.get(k) == v for k, v in match.items())]


def twin(client: httpx.Client, proxy) -> httpx.Client:
    """The same session on another instance (sessions live in Redis): no second login, no TOTP step."""
    return httpx.Client(base_url=proxy.url, timeout=10, cookies=client.cookies)


def request_bg(stack, client, patient, login, reason="urgence_vitale", text=JUSTIFICATION, totp=None):
    code = totp if totp is not None else stack.totp(login)
    return client.post("/_dpiguard/api/breakglass",
                       json={"patient": patient, "reason": reason, "text": text, "totp": code})


def cli(capsys, stack, *argv) -> str:
    capsys.readouterr()
    assert cli_main([*argv, "--config", str(stack.config_path)]) == 0
    return capsys.readouterr().out


def wait_status(client, path, status, within=1.0):
    deadline = time.monotonic() + within
    while (r := client.get(path)).status_code != status:
        assert time.monotonic() < deadline, f"{path}: still {r.status_code}, expected {status}"
    return r


# -- the "how we will check" scenario --------------------------------------------------------------

def test_break_glass_end_to_end(stack, capsys):
    a, b = stack.proxies[0], stack.proxies[1]
    user, path = "inf.durand", "/api/patients/P0002/biology"  # P0002 stays in PNEUMO, she is in CARDIO
    ca = stack.client(a, user)
    cb = twin(ca, b)

    # 1. Refused, and the API client is told that emergency access is possible.
    for c in (ca, cb):  # both instances cache the refusal
        r = c.get(path)
        assert r.status_code == 403
        assert r.json()["error"] == "not_in_care_team"
        assert r.json()["break_glass"] == "/_dpiguard/api/breakglass"

    # 2. Request with a reason, a justification and a fresh TOTP code.
    r = request_bg(stack, ca, "P0002", user)
    assert r.status_code == 201, r.text
    grant = r.json()
    grant_id = grant["break_glass_id"]
    assert re.fullmatch(r"BG[0-9a-f]{16}", grant_id)
    assert grant["patient"] == "P0002" and "biology" in grant["categories"]
    assert 14390 < grant["expires_at"] - grant["start"] <= 14400

    # 3. Allowed for the window (4 h, set by a), on both instances (b had the refusal cached).
    stack.upstream_app.clear()
    r = ca.get(path)
    assert r.status_code == 200, r.text
    assert stack.upstream_app.seen[-1]["headers"]["x-dpiguard-break-glass"] == grant_id
    wait_status(cb, path, 200)
    # Only the configured categories: administrative data is not care-team data anyway, and a
    # category outside the list stays refused - here the grant covers biology but not another patient.
    assert ca.get("/api/patients/P0005/biology").status_code == 403

    # 4. Flagged in the trace: every request under it, plus one alert line for the grant.
    allowed = records(stack, event="access", user=user, patient="P0002", outcome="allow")
    assert allowed and all(rec["break_glass"] is True and rec["break_glass_id"] == grant_id
                           and rec["break_glass_reason"] == "urgence_vitale" for rec in allowed)
    assert {rec["instance"] for rec in allowed} == {"a", "b"}
    (alert,) = records(stack, event="break_glass", break_glass_id=grant_id)
    assert alert["alert"] is True and alert["user"] == user and alert["patient"] == "P0002"
    assert alert["break_glass_text"] == JUSTIFICATION
    assert "EMERGENCY ACCESS" in a.log() and grant_id in a.log()

    # 5. Listed for review.
    rows = orjson.loads(cli(capsys, stack, "breakglass", "review", "--pending", "--json"))
    row = next(r for r in rows if r["id"] == grant_id)
    assert row["user"] == user and row["patient"] == "P0002" and row["status"] == "pending" and row["active"]
    assert grant_id in cli(capsys, stack, "breakglass", "review")

    # 6. Revoked: refused at once on both instances.
    assert "revoked" in cli(capsys, stack, "breakglass", "review", "--revoke", grant_id)
    wait_status(cb, path, 403)
    assert ca.get(path).status_code == 403

    # 7. Reviewed: no longer pending.
    cli(capsys, stack, "breakglass", "review", "--mark", grant_id, "justified", "--comment", "cardiac arrest, ok")
    rows = orjson.loads(cli(capsys, stack, "breakglass", "review", "--pending", "--json"))
    assert grant_id not in [r["id"] for r in rows]
    rows = orjson.loads(cli(capsys, stack, "breakglass", "review", "--json"))
    row = next(r for r in rows if r["id"] == grant_id)
    assert row["status"] == "justified" and row["review_comment"] == "cardiac arrest, ok" and row["revoked_at"]
    assert records(stack, event="admin", action="break_glass_revoke", break_glass_id=grant_id)


def test_grant_expires_after_the_window_on_every_instance(stack):
    a, c = stack.proxies[0], stack.proxies[1]  # b grants for 4 s
    user, path = "dr.brunet", "/api/patients/P0002/notes"  # ONCO doctor, PNEUMO patient
    ca = stack.client(a, user)
    cc = twin(ca, c)
    assert cc.get(path).status_code == 403
    assert ca.get(path).status_code == 403
    r = request_bg(stack, cc, "P0002", user, reason="garde")
    assert r.status_code == 201, r.text
    end = r.json()["expires_at"]
    assert end - r.json()["start"] == pytest.approx(4)
    assert cc.get(path).status_code == 200
    assert wait_status(ca, path, 200).status_code == 200  # cached on a, bounded by the grant end
    time.sleep(max(0.0, end - time.time()) + 0.2)
    # Expired: no message was published, yet both instances refuse.
    assert cc.get(path).status_code == 403
    assert ca.get(path).status_code == 403
    last = records(stack, event="access", user=user, patient="P0002")[-1]
    assert last["reason"] == "not_in_care_team" and not last.get("break_glass")


# -- who may use it, and how ----------------------------------------------------------------------

def test_role_that_may_never_use_it_gets_403(stack):
    a = stack.proxies[0]
    c = stack.client(a, "sec.bernard")  # secretary: may read notes, but never break the glass
    r = c.get("/api/patients/P0002/notes")
    assert r.status_code == 403 and r.json()["error"] == "not_in_care_team"
    assert "break_glass" not in r.json()
    page = c.get("/patients/P0002/notes", headers={"accept": "text/html"})
    assert page.status_code == 403 and "Emergency access" not in page.text
    r = c.post("/_dpiguard/api/breakglass",
               json={"patient": "P0002", "reason": "urgence_vitale", "text": JUSTIFICATION, "totp": "123456"})
    assert r.status_code == 403 and r.json()["error"] == "break_glass_forbidden"
    assert records(stack, event="break_glass_request", user="sec.bernard", reason="break_glass_forbidden")
    assert c.get("/api/patients/P0002/notes").status_code == 403


def test_invalid_requests_and_wrong_totp(stack):
    a = stack.proxies[0]
    user = "inf.guerin"
    c = stack.client(a, user)
    c.headers["accept-language"] = "en"
    r = request_bg(stack, c, "P0002", user, reason="because", totp="000000")
    assert r.status_code == 400 and "reason" in r.json()["message"]
    r = request_bg(stack, c, "P0002", user, text="too short", totp="000000")
    assert r.status_code == 400 and "20 characters" in r.json()["message"]
    del c.headers["accept-language"]
    r = request_bg(stack, c, "P0002", user, text="too short", totp="000000")
    assert r.status_code == 400 and r.json()["message"] == "La justification doit compter au moins 20 caractères."
    r = c.post("/_dpiguard/api/breakglass", content=b"patient=P0002")
    assert r.status_code == 415
    assert httpx.post(f"{a.url}/_dpiguard/api/breakglass", json={"patient": "P0002"}).status_code == 401
    # A wrong code is refused and counts as a failed login (the account lock counter).
    r = request_bg(stack, c, "P0002", user, totp="000000")
    assert r.status_code == 401 and r.json()["error"] == "invalid_totp" and r.json()["attempts_left"] == 2
    client = redis_client(stack.config)
    assert int(client.get(f"dpiguard:authfail:{{{user}}}")) == 1
    client.delete(f"dpiguard:authfail:{{{user}}}")
    assert c.get("/api/patients/P0002/biology").status_code == 403
    # The code she logged in with serves once more in this session (no wait for the next step at 3 a.m.),
    # on any instance; a third use is refused as already used, and not counted as a failure.
    used = stack.last_step[user]
    import pyotp
    login_code = pyotp.TOTP(stack.accounts[user].totp_secret).at(used * 30)
    r = request_bg(stack, twin(c, stack.proxies[1]), "P0002", user, totp=login_code)
    assert r.status_code == 201, r.text
    r = request_bg(stack, c, "P0003", user, totp=login_code)
    assert r.status_code == 401 and r.json()["error"] == "totp_reused"
    assert records(stack, event="break_glass_request", user=user, reason="totp_reused")[-1]["detail"] == "totp_reused"
    assert client.get(f"dpiguard:authfail:{{{user}}}") is None
    BreakGlassStore(client).revoke(records(stack, event="break_glass", user=user)[-1]["break_glass_id"], by="test")


def test_refusal_page_form_opens_access(stack):
    a = stack.proxies[0]
    user = "dr.dupont"  # PNEUMO doctor; P0001 stays in CARDIO
    c = stack.client(a, user)
    page = c.get("/patients/P0001/biology", headers={"accept": "text/html"})
    assert page.status_code == 403 and "Accès d'urgence (bris de glace)" in page.text
    assert 'type="radio" id="bg-r-1" name="reason" value="urgence_vitale"' in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    assert csrf == c.get("/_dpiguard/api/session").json()["csrf"]
    # Wrong CSRF token: refused.
    r = c.post("/_dpiguard/breakglass", data={"csrf": "forged", "patient": "P0001", "reason": "garde",
                                              "text": JUSTIFICATION, "totp": "000000"})
    assert r.status_code == 403
    r = c.post("/_dpiguard/breakglass", data={"csrf": csrf, "patient": "P0001", "reason": "garde",
                                              "text": JUSTIFICATION, "totp": stack.totp(user),
                                              "next": "/patients/P0001/biology"})
    # A confirmation: until when, a link back to the record, and a button to end it early.
    assert r.status_code == 201 and "Accès d'urgence ouvert" in r.text
    rec = records(stack, event="break_glass", user=user)[-1]
    assert f'href="/patients/P0001/biology"' in r.text and rec["break_glass_id"] in r.text
    assert 'action="/_dpiguard/breakglass/end"' in r.text and "jusqu'à" in r.text
    assert c.get("/patients/P0001/biology", headers={"accept": "text/html"}).status_code == 200
    # Ended early by the user, traced, on every instance.
    end_csrf = re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)
    r = c.post("/_dpiguard/breakglass/end", data={"csrf": end_csrf, "id": rec["break_glass_id"]})
    assert r.status_code == 200 and "Accès d'urgence terminé" in html.unescape(r.text)
    wait_status(c, "/api/patients/P0001/biology", 403)
    wait_status(twin(c, stack.proxies[1]), "/api/patients/P0001/biology", 403)
    assert records(stack, event="break_glass_end", user=user, outcome="allow")


# -- patient objections ----------------------------------------------------------------------------

def test_objection_refuses_even_the_unit_nurse_and_override_setting_is_respected(stack, capsys):
    a, c = stack.proxies[0], stack.proxies[1]  # b: override_patient_objection true
    user, path = "inf.noel", "/api/patients/P0011/biology"  # CARDIO nurse, CARDIO patient
    ca = stack.client(a, user)
    cc = twin(ca, c)
    assert ca.get(path).status_code == 200
    assert cc.get(path).status_code == 200
    out = cli(capsys, stack, "objections", "add", "P0011", "--unit", "cardio", "--comment", "asked at admission")
    assert "objection recorded" in out
    try:
        r = wait_status(ca, path, 403)
        assert r.json()["error"] == "patient_objection"
        assert "break_glass" not in r.json()  # a's policy: cannot be overridden
        assert ca.get("/api/patients/P0011").json()["error"] == "patient_objection"  # administrative too
        assert wait_status(cc, path, 403).json()["break_glass"] == "/_dpiguard/api/breakglass"
        rec = records(stack, event="access", user=user, reason="patient_objection")[-1]
        assert rec["care_team"] == "objection:unit:CARDIO"
        assert rec["idp"] == "local" and rec["rpps"] is None  # a session of dpiguard's own directory
        # Through a (override off), emergency access is refused.
        r = request_bg(stack, ca, "P0011", user, totp="000000")  # refused before the code is even checked
        assert r.status_code == 403 and r.json()["error"] == "patient_objection"
        # Through b (override on), it is granted and overrides the objection on b only.
        r = request_bg(stack, cc, "P0011", user)
        assert r.status_code == 201, r.text
        assert cc.get(path).status_code == 200
        rec = records(stack, event="access", user=user, patient="P0011", outcome="allow")[-1]
        assert rec["break_glass"] is True and rec["objection_overridden"] == "unit:CARDIO"
        assert ca.get(path).json()["error"] == "patient_objection"
        listed = orjson.loads(cli(capsys, stack, "objections", "list", "--patient", "P0011", "--json"))
        assert listed == [{"patient": "P0011", "type": "unit", "target": "CARDIO", "date": listed[0]["date"],
                           "source": listed[0]["source"], "comment": "asked at admission"}]
    finally:
        cli(capsys, stack, "objections", "remove", "P0011", "--unit", "CARDIO")
    wait_status(ca, path, 200)


def test_objection_to_a_named_professional_from_csv(stack, tmp_path, capsys):
    a = stack.proxies[1]
    user = "dr.gaillard"  # CARDIO doctor
    c = stack.client(a, user)
    assert c.get("/api/patients/P0014/notes").status_code == 200
    bad = tmp_path / "bad.csv"
    bad.write_text("patient,type,target\nP0014,user,dr.gaillard\nP0001,service,CARDIO\n")
    assert cli_main(["objections", "import", str(bad), "--config", str(stack.config_path)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:3: column 'type'" in err and "nothing imported" in err
    assert c.get("/api/patients/P0014/notes").status_code == 200  # all or nothing
    good = tmp_path / "good.csv"
    good.write_text("patient,type,target,date,source,comment\nP0014,user,dr.gaillard,2026-01-15,DPO,letter\n")
    assert "1 objection(s) imported" in cli(capsys, stack, "objections", "import", str(good))
    try:
        assert wait_status(c, "/api/patients/P0014/notes", 403).json()["error"] == "patient_objection"
        assert c.get("/api/patients/P0001/notes").status_code == 200  # other patients unaffected
    finally:
        ObjectionStore(redis_client(stack.config)).remove("P0014", "user", "dr.gaillard")
    wait_status(c, "/api/patients/P0014/notes", 200)
