"""LDAP / Active Directory end to end: a real slapd (tests/ldap_server.py), a real Redis, the demo DPI and
``dpiguard run`` (mitmproxy) configured with the ``directory`` section and a sealed policies/directory.yaml."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import httpx
import pyotp
import pytest

from dpiguard.audit.chain import read_records
from dpiguard.services import user_directory

from .ldap_server import BASE, SERVICE_DN, SERVICE_PW, USER_PW, close_ldap, start_ldap
from .policyseal import seal
from .stack import ROOT, build_stack

pytestmark = pytest.mark.timeout(240)

MAPPING = f"""# test mapping
groups:
  "cn=GG-DPI-Infirmiers,ou=groups,{BASE}":
    roles: [nurse]
  "cn=GG-DPI-Medecins,ou=groups,{BASE}":
    roles: [doctor]
  "cn=GG-Cardio,ou=groups,{BASE}":
    units: [CARDIO]
"""


@pytest.fixture(scope="module")
def ldap():
    server = start_ldap()
    yield server
    close_ldap(server)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, ldap):
    work = tmp_path_factory.mktemp("ldapstack")
    policies = work / "policies"
    shutil.copytree(ROOT / "policies", policies)
    (policies / "directory.yaml").write_text(MAPPING)
    seal(policies)
    (work / "ldap-service.pw").write_text(SERVICE_PW + "\n")
    s = build_stack(work, config_extra={
        "policies": {"dir": str(policies)},
        "directory": {"enabled": True, "url": ldap.url, "start_tls": True, "ca_file": str(ldap.ca_file),
                      "bind_dn": SERVICE_DN, "bind_password_file": str(work / "ldap-service.pw"), "base_dn": BASE,
                      "user_filter": "(uid={login})", "recheck_seconds": 1, "down_grace_seconds": 3600,
                      "timeout": 2.0}})
    users = user_directory(s.config)
    s.ldap_secrets = {}
    for login in ("inf.ldap", "med.ldap", "sans.role", "inf.off", "gone.ldap"):
        _, uri = users.add_external(login, "ldap")
        s.ldap_secrets[login] = pyotp.parse_uri(uri).secret
    s.start_proxy("a")
    yield s
    s.close()


@pytest.fixture
def proxy(stack):
    return stack.proxies[0]


_last_step: dict[str, int] = {}


def code(stack, login: str) -> str:
    totp = pyotp.TOTP(stack.ldap_secrets[login])
    while True:
        now_step = int(time.time()) // 30
        for step in (now_step, now_step + 1):
            if step > _last_step.get(login, -1):
                _last_step[login] = step
                return totp.at(step * 30)
        time.sleep(1)


def login(proxy, stack, user: str, password: str = USER_PW, totp: str | None = None, **kw):
    client = httpx.Client(base_url=proxy.url, timeout=15, headers={"accept-language": "fr"}, **kw)
    r = client.post("/_dpiguard/api/login", json={"username": user, "password": password,
                                                  "totp": totp if totp is not None else code(stack, user)})
    return client, r


def records(stack, **match):
    return [rec for rec in read_records(stack.audit_path) if all(rec.get(k) == v for k, v in match.items())]


def wait_for(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    return predicate()


def test_ldap_login_end_to_end_roles_units_and_idp_in_the_trace(stack, proxy):
    client, r = login(proxy, stack, "inf.ldap")
    assert r.status_code == 200, r.text
    assert r.json()["roles"] == ["nurse"]
    me = client.get("/_dpiguard/api/session").json()
    assert "CARDIO" in me["units"]  # the group GG-Cardio gave the unit: the care team follows
    r = client.get("/api/patients/P0001/biology")
    assert r.status_code == 200, r.text
    seen = stack.upstream_app.seen[-1]["headers"]
    assert seen["x-dpiguard-user"] == "inf.ldap" and seen["x-dpiguard-roles"] == "nurse"
    assert wait_for(lambda: [rec for rec in records(stack, user="inf.ldap") if rec.get("idp") == "ldap"
                             and rec.get("path") == "/api/patients/P0001/biology"])
    assert [rec["idp"] for rec in records(stack, event="login_success", user="inf.ldap")] == ["ldap"]


def test_wrong_ldap_password_refused_and_traced(stack, proxy):
    _, r = login(proxy, stack, "med.ldap", password="not-the-password")
    assert r.status_code == 401 and r.json()["error"] == "invalid_credentials"
    assert wait_for(lambda: records(stack, event="login_failure", user="med.ldap", detail="bad_password"))


@pytest.mark.parametrize("name", ["*", "inf.ldap)(uid=*", "*)(|(uid=*", "inf.ldap\x00", "inf.l*"])
def test_injection_in_the_user_name_is_a_clean_refusal(stack, proxy, name):
    client = httpx.Client(base_url=proxy.url, timeout=15)
    r = client.post("/_dpiguard/api/login", json={"username": name, "password": USER_PW, "totp": "123456"})
    assert r.status_code == 401 and r.json()["error"] == "invalid_credentials"


def test_disabled_in_the_directory_refused(stack, proxy):
    _, r = login(proxy, stack, "inf.off")
    assert r.status_code == 401
    assert wait_for(lambda: records(stack, event="login_failure", user="inf.off", detail="directory_disabled"))


def test_no_mapped_group_no_access_with_a_clear_french_message(stack, proxy):
    _, r = login(proxy, stack, "sans.role")
    assert r.status_code == 403 and r.json()["error"] == "no_role"
    assert "groupes" in r.json()["message"]
    assert wait_for(lambda: records(stack, event="login_failure", user="sans.role", reason="no_role"))


def test_mapping_file_edit_is_hot_reloaded(stack, proxy):
    policies = stack.config.path(stack.config.policies.dir)
    original = (policies / "directory.yaml").read_text()

    def version():
        return httpx.get(f"{proxy.url}/_dpiguard/health", timeout=5).json()["policy_version"]

    before = version()
    (policies / "directory.yaml").write_text(original + f'  "cn=GG-Cantine,ou=groups,{BASE}":\n'
                                                         "    roles: [secretary]\n")
    seal(policies)
    try:
        assert wait_for(lambda: version() != before, timeout=20)  # policies.reload_interval: 1 s
        _, r = login(proxy, stack, "sans.role")
        assert r.status_code == 200 and r.json()["roles"] == ["secretary"], r.text
    finally:
        (policies / "directory.yaml").write_text(original)
        seal(policies)
    assert wait_for(lambda: version() == before, timeout=20)


def test_group_change_gives_the_new_role_at_the_next_login(stack, proxy, ldap):
    _, r = login(proxy, stack, "med.ldap")
    assert r.status_code == 200 and r.json()["roles"] == ["doctor"]
    ldap.group_remove("GG-DPI-Medecins", "med.ldap")
    ldap.group_add("GG-DPI-Infirmiers", "med.ldap")
    try:
        _, r = login(proxy, stack, "med.ldap")
        assert r.status_code == 200 and r.json()["roles"] == ["nurse"]
    finally:
        ldap.group_remove("GG-DPI-Infirmiers", "med.ldap")
        ldap.group_add("GG-DPI-Medecins", "med.ldap")


def test_removed_while_logged_in_session_ends_after_the_recheck(stack, proxy, ldap):
    ldap.add_ldif(f"dn: uid=gone.ldap,ou=people,{BASE}\nobjectClass: inetOrgPerson\nobjectClass: adLikeUser\n"
                  f"uid: gone.ldap\ncn: Gaston Gone\nsn: Gone\nuserAccountControl: 512\nuserPassword: {USER_PW}\n\n")
    ldap.group_add("GG-DPI-Infirmiers", "gone.ldap")
    client, r = login(proxy, stack, "gone.ldap")
    assert r.status_code == 200, r.text
    assert client.get("/_dpiguard/api/session").status_code == 200
    ldap.delete("gone.ldap")
    # recheck_seconds is 1: the session ends within a few seconds, on the proxy's own re-check
    assert wait_for(lambda: client.get("/_dpiguard/api/session").status_code == 401, timeout=20)
    assert wait_for(lambda: records(stack, event="session_revoked", user="gone.ldap", reason="directory_removed"))


def test_disabled_while_logged_in_session_ends_after_the_recheck(stack, proxy, ldap):
    client, r = login(proxy, stack, "inf.ldap")
    assert r.status_code == 200
    ldap.disable("inf.ldap")
    try:
        assert wait_for(lambda: client.get("/api/patients/P0001/biology").status_code == 401, timeout=20)
        assert wait_for(lambda: records(stack, event="session_revoked", user="inf.ldap", reason="directory_disabled"))
    finally:
        ldap.enable("inf.ldap")


def test_directory_stopped_clear_refusal_and_sessions_kept_within_the_grace(stack, proxy, ldap):
    client, r = login(proxy, stack, "med.ldap")
    assert r.status_code == 200
    ldap.stop()
    try:
        _, r = login(proxy, stack, "inf.ldap")
        assert r.status_code == 503 and r.json()["error"] == "directory_unavailable"
        assert "annuaire" in r.json()["message"]
        assert wait_for(lambda: records(stack, event="login_failure", user="inf.ldap", reason="directory_unavailable"))
        time.sleep(2.5)  # two re-checks fail: the documented rule keeps sessions for down_grace_seconds
        assert client.get("/_dpiguard/api/session").status_code == 200
    finally:
        ldap.start()
    _, r = login(proxy, stack, "inf.ldap")
    assert r.status_code == 200, r.text


def test_config_check_reports_the_directory(stack, ldap, tmp_path):
    cmd = [sys.executable, "-m", "dpiguard.cli", "config", "check", "--config", str(stack.config_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert "reachable (StartTLS, certificate verified, service bind OK)" in out.stdout
    env = {"DPIGUARD_DIRECTORY__CA_FILE": str(ldap.other_ca_file)}
    import os
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=str(ROOT), env={**os.environ, **env})
    assert out.returncode == 1 and "TLS failed" in out.stderr, out.stderr
    bad_pw = tmp_path / "bad.pw"
    bad_pw.write_text("nope\n")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                         env={**os.environ, "DPIGUARD_DIRECTORY__BIND_PASSWORD_FILE": str(bad_pw)})
    assert out.returncode == 1 and "service account" in out.stderr, out.stderr


def test_cli_creates_a_totp_only_record(stack):
    cmd = [sys.executable, "-m", "dpiguard.cli", "users", "add", "new.ldap", "--external", "ldap",
           "--config", str(stack.config_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert "otpauth://totp/" in out.stdout and "no local password" in out.stdout
    user = user_directory(stack.config).get("new.ldap")
    assert user.external == "ldap" and user.roles == ()
    out = subprocess.run([sys.executable, "-m", "dpiguard.cli", "users", "passwd", "new.ldap", "--password-stdin",
                          "--config", str(stack.config_path)], input="Local-Password-2026!\n",
                         capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode != 0 and "directory account" in out.stderr
    assert user_directory(stack.config).redis.hget(f"dpiguard:user:{{new.ldap}}", "pw_hash") is None


FORM = {"accept": "text/html", "sec-fetch-site": "same-origin", "accept-language": "fr"}


def test_directory_account_enrols_its_second_factor_through_a_link(stack, proxy, ldap):
    """``users invite --external ldap``: no secret on the terminal; the link asks the directory password
    (never stored, a wrong one counts as a failed login), then the person registers TOTP and receives
    recovery codes, which work at the LDAP login too."""
    from dpiguard.demo.ldapdir import person

    ldap.add_ldif(person(f"uid=arr.ldap,ou=people,{BASE}", "arr.ldap", "Ari Arrivee", USER_PW))
    ldap.group_add("GG-DPI-Infirmiers", "arr.ldap")
    cmd = [sys.executable, "-m", "dpiguard.cli", "users", "invite", "arr.ldap", "--external", "ldap",
           "--config", str(stack.config_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert "otpauth://" not in out.stdout  # the secret is not shown to whoever runs the command
    token = out.stdout.strip().rsplit("t=", 1)[1]
    assert user_directory(stack.config).get("arr.ldap").external == "ldap"
    c = httpx.Client(base_url=proxy.url, timeout=15)
    page = c.get("/_dpiguard/enrol", params={"t": token}, headers=FORM)
    assert page.status_code == 200 and "annuaire" in page.text and "password2" not in page.text
    wrong = c.post("/_dpiguard/enrol", data={"t": token, "password": "pas-le-bon"}, headers=FORM)
    assert wrong.status_code == 400
    assert wait_for(lambda: records(stack, event="enrol_password", user="arr.ldap", outcome="deny"))
    r = c.post("/_dpiguard/enrol", data={"t": token, "password": USER_PW}, headers=FORM)
    assert r.status_code == 303 and r.headers["location"] == "/_dpiguard/enrol/factor"
    assert user_directory(stack.config).redis.hget("dpiguard:user:{arr.ldap}", "pw_hash") is None  # not stored
    factor = c.get("/_dpiguard/enrol/factor", headers=FORM)
    import re

    secret = re.search(r"<code>([A-Z2-7 ]+)</code>", factor.text).group(1).replace(" ", "")
    csrf = re.search(r'name="csrf" value="([^"]+)"', factor.text).group(1)
    stack.ldap_secrets["arr.ldap"] = secret
    ok = c.post("/_dpiguard/enrol/totp", data={"csrf": csrf, "code": code(stack, "arr.ldap")}, headers=FORM)
    assert ok.status_code == 303
    codes = re.findall(r"<code>([a-z2-9]{4}-[a-z2-9]{4}-[a-z2-9]{4})</code>", c.get("/_dpiguard/enrol/codes",
                                                                                      headers=FORM).text)
    assert len(codes) == 10
    assert c.get("/_dpiguard/enrol", params={"t": token}, headers=FORM).status_code == 410  # used
    _, r = login(proxy, stack, "arr.ldap")  # directory password + the registered authenticator
    assert r.status_code == 200 and r.json()["roles"] == ["nurse"], r.text
    _, r = login(proxy, stack, "arr.ldap", totp=codes[0])  # a recovery code, once
    assert r.status_code == 200, r.text
    _, r = login(proxy, stack, "arr.ldap", totp=codes[0])
    assert r.status_code == 401
    _, r = login(proxy, stack, "arr.ldap", password="pas-le-bon", totp=codes[1])  # never without the password
    assert r.status_code == 401
    _, r = login(proxy, stack, "arr.ldap", totp=codes[1])
    assert r.status_code == 200, r.text
    assert len(records(stack, event="login_success", user="arr.ldap", detail="recovery_code")) == 2
