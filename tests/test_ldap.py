"""LDAP / Active Directory first factor against a real OpenLDAP server (tests/ldap_server.py): the
directory client, the login decision with a real Redis, the group mapping file, the re-check."""

from __future__ import annotations

import socket
import time

import pyotp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ldap3.utils.conv import escape_filter_chars

from dpiguard.auth import directory as d
from dpiguard.auth.login import Authenticator
from dpiguard.auth.sessions import SessionStore
from dpiguard.auth.users import SecretBox, UserDirectory
from dpiguard.config import ConfigError, Login, load_config
from dpiguard.policy.directory import DirectoryMapping
from dpiguard.policy.files import PolicyError

from .ldap_server import BASE, SERVICE_DN, SERVICE_PW, USER_PW, close_ldap, start_ldap

pytestmark = pytest.mark.timeout(120)

ROLES = ("doctor", "nurse", "secretary")
MAPPING_TEXT = f"""
groups:
  "cn=GG-DPI-Infirmiers,ou=groups,{BASE}":
    roles: [nurse]
  "CN=GG-DPI-Medecins, OU=groups, {BASE.upper()}":
    roles: [doctor]
  "cn=GG-Cardio,ou=groups,{BASE}":
    units: [cardio]
"""


@pytest.fixture(scope="module")
def ldap():
    server = start_ldap()
    yield server
    close_ldap(server)


def settings_for(server, **over) -> d.DirectorySettings:
    base = dict(url=server.url, start_tls=True, ca_file=str(server.ca_file), bind_dn=SERVICE_DN,
                bind_password=SERVICE_PW, base_dn=BASE, user_filter="(uid={login})", unit_attribute="departmentNumber",
                timeout=3.0)
    base.update(over)
    return d.DirectorySettings(**base)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the directory client ---------------------------------------------------------------------------
def test_starttls_login_gives_groups_name_and_units(ldap):
    outcome, entry = d.LdapDirectory(settings_for(ldap)).authenticate("inf.ldap", USER_PW)
    assert outcome == d.OK
    assert entry.display_name == "Lea Ldap"
    assert {d.normalize_dn(g) for g in entry.groups} >= {f"cn=gg-dpi-infirmiers,ou=groups,{BASE}",
                                                         f"cn=gg-cardio,ou=groups,{BASE}"}
    assert entry.unit_values == ("REA",)


def test_ldaps_login(ldap):
    outcome, _ = d.LdapDirectory(settings_for(ldap, url=ldap.ldaps_url, start_tls=False)).authenticate("med.ldap", USER_PW)
    assert outcome == d.OK


def test_wrong_password_refused(ldap):
    assert d.LdapDirectory(settings_for(ldap)).authenticate("inf.ldap", USER_PW + "x") == (d.BAD_PASSWORD, None)


def test_empty_password_refused_before_any_bind(ldap):
    # Against a closed port: an answer without DirectoryUnavailable proves nothing was sent.
    directory = d.LdapDirectory(settings_for(ldap, url=f"ldap://127.0.0.1:{closed_port()}"))
    assert directory.authenticate("inf.ldap", "") == (d.BAD_PASSWORD, None)
    # and the real server would accept the unauthenticated bind that an empty password makes:
    import ldap3
    conn = ldap3.Connection(ldap3.Server(ldap.url), user=f"uid=inf.ldap,ou=people,{BASE}", password="",
                            authentication=ldap3.SIMPLE)
    conn.open()
    conn.strategy.sync = True
    with pytest.raises(ldap3.core.exceptions.LDAPPasswordIsMandatoryError):
        conn.bind()  # ldap3 refuses it too; dpiguard does not rely on that


def test_unknown_user(ldap):
    assert d.LdapDirectory(settings_for(ldap)).authenticate("nobody.here", USER_PW) == (d.UNKNOWN_USER, None)


@pytest.mark.parametrize("login", ["*", "inf.ldap)(uid=*", "*)(|(uid=*", "inf.ldap\x00", "inf.l*", "inf.ldap)",
                                   "(uid=inf.ldap)", "inf.ldap\\2a", "INF.LDAP*", "*)(objectClass=*"])
def test_ldap_injection_in_user_name_is_a_clean_refusal(ldap, login):
    directory = d.LdapDirectory(settings_for(ldap))
    assert directory.authenticate(login, USER_PW) == (d.UNKNOWN_USER, None)
    assert directory.find(login) is None


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=80))
def test_property_a_login_that_passes_validation_has_nothing_to_escape(login):
    """Oracle: any login dpiguard accepts contains none of RFC 4515's special characters, so the
    filter it builds is the literal login; and escaping is applied anyway."""
    if d.valid_login(login):
        assert escape_filter_chars(login) == login
        assert not set(login) & set("*()\\\x00")
    else:
        assert not d.valid_login(login)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("*()\\\x00=|&!uidnf.ldap")), min_size=1, max_size=20))
def test_property_no_crafted_name_logs_in_as_someone_else(ldap, login):
    """Oracle: with the right password, only the exact login of the account is accepted."""
    outcome, entry = d.LdapDirectory(settings_for(ldap)).authenticate(login, USER_PW)
    assert (outcome == d.OK) == (login == "inf.ldap")


def test_disabled_account_refused_with_ad_flag(ldap):
    assert d.LdapDirectory(settings_for(ldap)).authenticate("inf.off", USER_PW) == (d.DISABLED, None)


def test_disabled_account_refused_with_a_filter(ldap):
    s = settings_for(ldap, ad_user_account_control=False, disabled_filter="(userAccountControl=514)")
    assert d.LdapDirectory(s).authenticate("inf.off", USER_PW) == (d.DISABLED, None)
    s = settings_for(ldap, ad_user_account_control=False)
    assert d.LdapDirectory(s).authenticate("inf.off", USER_PW)[0] == d.OK  # the control: the flag decided


def test_starttls_with_a_wrong_ca_is_refused(ldap):
    directory = d.LdapDirectory(settings_for(ldap, ca_file=str(ldap.other_ca_file)))
    with pytest.raises(d.DirectoryUnavailable, match="TLS"):
        directory.authenticate("inf.ldap", USER_PW)
    with pytest.raises(d.DirectoryUnavailable, match="TLS"):
        directory.check()


def test_ldaps_with_a_wrong_ca_is_refused(ldap):
    directory = d.LdapDirectory(settings_for(ldap, url=ldap.ldaps_url, start_tls=False,
                                             ca_file=str(ldap.other_ca_file)))
    with pytest.raises(d.DirectoryUnavailable):
        directory.check()


def test_certificate_for_another_host_name_is_refused(ldap):
    # The certificate names localhost and 127.0.0.1; 127.0.0.2 reaches the same slapd (loopback).
    directory = d.LdapDirectory(settings_for(ldap, url=f"ldap://127.0.0.2:{ldap.port}"))
    try:
        with socket.create_connection(("127.0.0.2", ldap.port), timeout=1):
            pass
    except OSError:
        pytest.skip("slapd listens on 127.0.0.1 only")
    with pytest.raises(d.DirectoryUnavailable, match="TLS.*(match|mismatch)"):
        directory.check()
    assert "reachable" in d.LdapDirectory(settings_for(ldap, url=f"ldap://localhost:{ldap.port}")).check()


def test_directory_down_is_unavailable_within_the_timeout(ldap):
    directory = d.LdapDirectory(settings_for(ldap, url=f"ldap://127.0.0.1:{closed_port()}", timeout=1.0))
    start = time.monotonic()
    with pytest.raises(d.DirectoryUnavailable, match="cannot reach"):
        directory.authenticate("inf.ldap", USER_PW)
    assert time.monotonic() - start < 5


def test_check_reports_a_wrong_service_password(ldap):
    assert "reachable" in d.LdapDirectory(settings_for(ldap)).check()
    with pytest.raises(d.DirectoryUnavailable, match="service account"):
        d.LdapDirectory(settings_for(ldap, bind_password="wrong")).check()
    with pytest.raises(d.DirectoryUnavailable, match="base_dn"):
        d.LdapDirectory(settings_for(ldap, base_dn="ou=nothere," + BASE)).check()


# -- configuration ----------------------------------------------------------------------------------
def _cfg(tmp_path, directory: str):
    path = tmp_path / "c.yaml"
    path.write_text("upstream: {url: 'http://127.0.0.1:1'}\ndirectory: " + directory + "\n")
    return load_config(path, {}, check_files=False)


def test_config_refuses_plain_ldap_without_starttls(tmp_path):
    base = "ca_file: ca.pem, bind_dn: 'cn=s', bind_password_file: pw, base_dn: 'dc=x'"
    with pytest.raises(ConfigError, match="directory.start_tls.*clear"):
        _cfg(tmp_path, "{enabled: true, url: 'ldap://ad:389', " + base + "}")
    assert _cfg(tmp_path, "{enabled: true, url: 'ldap://ad:389', start_tls: true, " + base + "}").directory.start_tls
    assert _cfg(tmp_path, "{enabled: true, url: 'ldaps://ad', " + base + "}").directory.enabled
    with pytest.raises(ConfigError, match="directory.ca_file.*required"):
        _cfg(tmp_path, "{enabled: true, url: 'ldaps://ad', bind_dn: 'cn=s', bind_password_file: pw, base_dn: 'dc=x'}")
    with pytest.raises(ConfigError, match="directory.url"):
        _cfg(tmp_path, "{url: 'http://ad'}")
    with pytest.raises(ConfigError, match="directory.user_filter"):
        _cfg(tmp_path, "{user_filter: 'uid={login}'}")


# -- the mapping file -------------------------------------------------------------------------------
def test_mapping_roles_units_and_unmapped_groups():
    m = DirectoryMapping.from_text(MAPPING_TEXT, "directory.yaml", ROLES)
    roles, units = m.resolve([f"CN=GG-DPI-Infirmiers,OU=groups,{BASE}", f"cn=gg-cardio, ou=groups, {BASE}",
                              f"cn=GG-Cantine,ou=groups,{BASE}"], ["REA"])
    assert roles == ("nurse",) and units == ("CARDIO", "REA")
    assert m.resolve([f"cn=GG-Cantine,ou=groups,{BASE}"]) == ((), ())  # unmapped: nothing
    m2 = DirectoryMapping.from_text(MAPPING_TEXT + "unit_attribute_values:\n  Reanimation: REA\n", "f", ROLES)
    assert m2.resolve([], ["REA", "Reanimation"]) == ((), ("REA",))


@pytest.mark.parametrize("text, line, message", [
    ("groups:\n  'cn=a,dc=x':\n    roles: [surgeon]\n", 3, "unknown role 'surgeon'"),
    ("groups:\n  GG-Nurses:\n    roles: [nurse]\n", 2, "distinguished name"),
    ("groups:\n  'cn=a,dc=x':\n    roles: [nurse]\n  'CN=A, DC=X':\n    roles: [doctor]\n", 4, "twice"),
    ("groups:\n  'cn=a,dc=x':\n    role: [nurse]\n", 3, "unknown setting 'role'"),
    ("groups:\n  'cn=a,dc=x':\n    units: ['bad unit']\n", 3, "unit name"),
    ("grups: {}\n", 1, "unknown section"),
    ("groups:\n  'cn=a,dc=x': {}\n", 2, "expected 'roles'"),
])
def test_mapping_mistakes_name_file_and_line(text, line, message):
    with pytest.raises(PolicyError, match=message) as info:
        DirectoryMapping.from_text(text, "directory.yaml", ROLES)
    assert info.value.line == line


# -- the login decision (real Redis, real slapd) -------------------------------------------------------
@pytest.fixture
def auth(r, ldap, tmp_path):
    box = SecretBox(b"k" * 32)
    users = UserDirectory(r, box)
    mapping = DirectoryMapping.from_text(MAPPING_TEXT, "directory.yaml", ROLES)
    synced = []
    factor = d.DirectoryFirstFactor(d.LdapDirectory(settings_for(ldap)), lambda: mapping,
                                    on_login=lambda login, units: synced.append((login, units)))
    authenticator = Authenticator(r, users, Login(), external={"ldap": factor})
    secrets = {}
    for login in ("inf.ldap", "med.ldap", "sans.role", "inf.off"):
        _, uri = users.add_external(login, "ldap")
        secrets[login] = pyotp.parse_uri(uri).secret
    users.add("loc.user", "Local-Password-2026!", ["nurse"])
    return authenticator, users, secrets, synced, factor


def _code(secret: str, offset: int = 0) -> str:
    return pyotp.TOTP(secret).at(time.time() + offset)


def test_login_ldap_password_and_dpiguard_totp(auth):
    a, users, secrets, synced, _ = auth
    result = a.login("inf.ldap", USER_PW, _code(secrets["inf.ldap"]), "10.0.0.1")
    assert result.ok and result.source == "ldap"
    assert result.user.roles == ("nurse",) and result.user.display_name == "Lea Ldap"
    assert synced == [("inf.ldap", ("CARDIO", "REA"))]


def test_login_needs_the_totp_too(auth):
    a, _, secrets, _, _ = auth
    result = a.login("inf.ldap", USER_PW, "000000", "10.0.0.1")
    assert not result.ok and result.reason == "invalid_credentials" and result.detail == "bad_totp"


def test_wrong_ldap_password_counts_and_locks_like_a_local_one(auth):
    a, _, secrets, _, _ = auth
    for left in (2, 1):
        result = a.login("inf.ldap", "wrong", _code(secrets["inf.ldap"]), "10.0.0.2")
        assert result.reason == "invalid_credentials" and result.detail == "bad_password"
        assert result.attempts_left == left
    assert a.login("inf.ldap", "wrong", _code(secrets["inf.ldap"]), "10.0.0.2").reason == "locked"
    # locked: even the right password is refused now
    assert a.login("inf.ldap", USER_PW, _code(secrets["inf.ldap"], 30), "10.0.0.2").reason == "locked"


def test_address_throttling_applies_to_ldap_logins(auth, r):
    a, _, secrets, _, _ = auth
    a.policy = Login(ip_max_failures=2, max_failures=50)
    for _ in range(2):
        a.login("inf.ldap", "wrong", "000000", "10.0.0.3")
    a.login("inf.ldap", "wrong", "000000", "10.0.0.3")  # the one attempt of the interval
    assert a.login("inf.ldap", USER_PW, _code(secrets["inf.ldap"]), "10.0.0.3").reason == "throttled"


def test_a_local_password_never_opens_a_directory_account(auth, r):
    a, users, secrets, _, _ = auth
    with pytest.raises(ValueError, match="directory account"):
        users.set_password("inf.ldap", "Local-Password-2026!")
    with pytest.raises(ValueError, match="directory account"):
        users.set_roles("inf.ldap", ["nurse"])
    # even a hash written by hand is never used
    import argon2
    r.hset(users.keys.user("inf.ldap"), "pw_hash", argon2.PasswordHasher().hash("Local-Password-2026!"))
    assert not users.verify_password("inf.ldap", "Local-Password-2026!")
    assert not a.login("inf.ldap", "Local-Password-2026!", _code(secrets["inf.ldap"]), "10.0.0.4").ok


def test_disabled_in_directory_refused(auth):
    a, _, secrets, _, _ = auth
    result = a.login("inf.off", USER_PW, _code(secrets["inf.off"]), "10.0.0.5")
    assert not result.ok and result.detail == "directory_disabled"


def test_no_mapped_group_no_access(auth):
    a, _, secrets, synced, _ = auth
    result = a.login("sans.role", USER_PW, _code(secrets["sans.role"]), "10.0.0.6")
    assert not result.ok and result.reason == "no_role" and "GG-Cantine" in result.detail
    assert synced == []


def test_directory_down_refused_without_counting(auth, ldap):
    a, users, secrets, _, factor = auth
    factor.directory = d.LdapDirectory(settings_for(ldap, url=f"ldap://127.0.0.1:{closed_port()}", timeout=1.0))
    code = _code(secrets["inf.ldap"])
    result = a.login("inf.ldap", USER_PW, code, "10.0.0.7")
    assert not result.ok and result.reason == "directory_unavailable" and result.attempts_left is None
    factor.directory = d.LdapDirectory(settings_for(ldap))
    assert a.login("inf.ldap", USER_PW, code, "10.0.0.7").ok  # the code was not used up


def test_local_accounts_unchanged(auth):
    a, _, _, _, _ = auth
    assert a.login("loc.user", "Local-Password-2026!", "000000", "10.0.0.8").detail == "bad_totp"


def test_security_key_login_of_a_directory_account(auth, r):
    """Password step then key step (the page's WebAuthn ceremony gives ``ok``): the password is the
    directory's, the roles and units are the directory's at the key step, and it says ``ldap``."""
    a, users, _, synced, _ = auth
    first = a.first_factor("med.ldap", USER_PW, "10.0.1.1")
    assert first.ok and first.source == "ldap"
    done = a.second_factor("med.ldap", "10.0.1.1", True, "ok")
    assert done.ok and done.source == "ldap" and done.user.roles == ("doctor",) and done.detail == "security_key"
    assert synced == [("med.ldap", ())]
    # a wrong directory password counts like at the form; a hash written by hand is never used
    import argon2
    r.hset(users.keys.user("med.ldap"), "pw_hash", argon2.PasswordHasher().hash("Local-Password-2026!"))
    wrong = a.first_factor("med.ldap", "Local-Password-2026!", "10.0.1.2")
    assert not wrong.ok and wrong.detail == "bad_password" and wrong.attempts_left == 2
    # disabled (or removed) in the directory between the two steps: refused at the key step, counted
    assert a.second_factor("inf.off", "10.0.1.3", True, "ok").reason == "invalid_credentials"
    assert a.first_factor("inf.off", USER_PW, "10.0.1.3").detail == "directory_disabled"
    # groups that give no role: no access
    assert a.first_factor("sans.role", USER_PW, "10.0.1.4").ok
    assert a.second_factor("sans.role", "10.0.1.4", True, "ok").reason == "no_role"


def test_security_key_login_directory_down(auth, ldap):
    a, _, _, _, factor = auth
    factor.directory = d.LdapDirectory(settings_for(ldap, url=f"ldap://127.0.0.1:{closed_port()}", timeout=1.0))
    result = a.first_factor("inf.ldap", USER_PW, "10.0.1.5")
    assert not result.ok and result.reason == "directory_unavailable" and result.attempts_left is None
    assert a.second_factor("inf.ldap", "10.0.1.5", True, "ok").reason == "directory_unavailable"


# -- the re-check ----------------------------------------------------------------------------------
def test_recheck_ends_sessions_of_disabled_and_removed_users_and_keeps_others(auth, r, ldap):
    a, users, secrets, _, factor = auth
    sessions = SessionStore(r)
    traced = []
    recheck = d.DirectoryRecheck(r, "dpiguard", factor, users=lambda: users.external_logins("ldap"),
                                 revoke=sessions.revoke_user, trace=traced.append, interval=1, down_grace=60)
    ldap.add_ldif("dn: uid=tmp.ldap,ou=people,dc=hopital,dc=test\nobjectClass: inetOrgPerson\nobjectClass: adLikeUser\n"
                  "uid: tmp.ldap\ncn: Tim Tmp\nsn: Tmp\nuserAccountControl: 512\nuserPassword: x\n\n"
                  "dn: uid=tmp2.ldap,ou=people,dc=hopital,dc=test\nobjectClass: inetOrgPerson\nobjectClass: adLikeUser\n"
                  "uid: tmp2.ldap\ncn: Tom Tmp\nsn: Tmp\nuserAccountControl: 512\nuserPassword: x\n\n")
    ldap.group_add("GG-DPI-Infirmiers", "tmp.ldap")
    ldap.group_add("GG-DPI-Infirmiers", "tmp2.ldap")
    for login in ("tmp.ldap", "tmp2.ldap"):
        users.add_external(login, "ldap")
    sids = {login: sessions.create(login, ["nurse"], source="ldap")[0] for login in ("inf.ldap", "tmp.ldap", "tmp2.ldap")}
    try:
        assert recheck.run_once() == {"inf.ldap": "kept", "tmp.ldap": "kept", "tmp2.ldap": "kept"}
        ldap.disable("tmp.ldap")
        ldap.delete("tmp2.ldap")
        assert recheck.run_once() == {"inf.ldap": "kept", "tmp.ldap": "directory_disabled",
                                      "tmp2.ldap": "directory_removed"}
        assert sessions.get(sids["tmp.ldap"]) is None and sessions.get(sids["tmp2.ldap"]) is None
        assert sessions.get(sids["inf.ldap"]) is not None
        assert [(t["user"], t["reason"], t["event"]) for t in traced] == [
            ("tmp.ldap", "directory_disabled", "session_revoked"), ("tmp2.ldap", "directory_removed", "session_revoked")]
    finally:
        ldap.modify("dn: uid=tmp.ldap,ou=people,dc=hopital,dc=test\nchangetype: delete\n")


def test_recheck_directory_down_keeps_sessions_for_the_grace_then_ends_them(auth, r, ldap):
    a, users, secrets, _, factor = auth
    sessions = SessionStore(r)
    factor.directory = d.LdapDirectory(settings_for(ldap, url=f"ldap://127.0.0.1:{closed_port()}", timeout=1.0))
    recheck = d.DirectoryRecheck(r, "dpiguard", factor, users=lambda: users.external_logins("ldap"),
                                 revoke=sessions.revoke_user, trace=lambda rec: None, interval=1, down_grace=600)
    sid, _ = sessions.create("med.ldap", ["doctor"], source="ldap")
    now = time.time()
    assert recheck.run_once(now) == {"med.ldap": "kept"}
    assert recheck.run_once(now + 599) == {"med.ldap": "kept"}
    assert sessions.get(sid) is not None
    assert recheck.run_once(now + 601) == {"med.ldap": "directory_unavailable"}
    assert sessions.get(sid) is None
    # back up: the outage is forgotten
    factor.directory = d.LdapDirectory(settings_for(ldap))
    sid, _ = sessions.create("med.ldap", ["doctor"], source="ldap")
    assert recheck.run_once(now + 700) == {"med.ldap": "kept"}
    assert r.get("dpiguard:ldap:down-since") is None


# -- dpiguard demo --ldap ------------------------------------------------------------------------------
def test_demo_directory_works_with_the_example_mapping(tmp_path):
    from dpiguard.demo import ldapdir
    from dpiguard.policy.snapshot import PolicySet

    from .ldap_server import require_slapd
    from .stack import ROOT

    require_slapd()
    server = ldapdir.start_demo_directory("Demo-Pass-2026!", "svc-secret-4242")
    try:
        (tmp_path / "pw").write_text("svc-secret-4242\n")
        c = ldapdir.demo_directory_config(server, tmp_path / "pw")
        directory = d.LdapDirectory(d.DirectorySettings(
            url=c["url"], start_tls=c["start_tls"], ca_file=c["ca_file"], bind_dn=c["bind_dn"],
            bind_password="svc-secret-4242", base_dn=c["base_dn"], user_filter=c["user_filter"]))
        mapping = PolicySet.load(ROOT / "policies", sealed=True).directory_groups
        outcome, entry = directory.authenticate("ldap.infirmiere", "Demo-Pass-2026!")
        assert outcome == d.OK and mapping.resolve(entry.groups) == (("nurse",), ("CARDIO",))
        outcome, entry = directory.authenticate("ldap.medecin", "Demo-Pass-2026!")
        assert mapping.resolve(entry.groups) == (("doctor",), ("CARDIO",))
        outcome, entry = directory.authenticate("ldap.sansrole", "Demo-Pass-2026!")
        assert outcome == d.OK and mapping.resolve(entry.groups) == ((), ())
        assert directory.authenticate("ldap.desactive", "Demo-Pass-2026!")[0] == d.DISABLED
    finally:
        server.close()


def test_demo_ldap_without_slapd_says_how_to_install(monkeypatch, capsys, tmp_path):
    from dpiguard.demo import ldapdir
    from dpiguard.demo.runner import run_demo

    monkeypatch.setattr(ldapdir, "missing_tools", lambda: ["slapd"])
    assert run_demo(workdir=tmp_path, ldap=True) == 2
    assert "apt-get install -y slapd ldap-utils" in capsys.readouterr().err
