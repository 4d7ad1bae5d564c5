"""OpenID Connect and Pro Santé Connect login (issue 15 point 2), end to end against a real provider.

A real ``oidc-provider`` process (tests/oidc/server.js, node) on loopback, the real demo DPI, real
``dpiguard run`` proxies (tests/stack.py): proxy ``gen`` has the generic profile (client ``dpiguard``),
proxy ``psc`` the Pro Santé Connect profile (client ``dpiguard-psc``). The browser is an httpx client
that follows the redirects by hand and fills the provider's login form. The token checks that no honest
provider would produce (forged signature, expired, wrong nonce...) drive the verifier directly with the
provider's real JWKS and tokens signed by the test (joserfc).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest
from joserfc import jwk, jwt

from dpiguard.audit.chain import read_records
from dpiguard.auth.oidc import BACKCHANNEL_EVENT, OidcError, OidcSettings, RelyingParty
from dpiguard.demo.runner import POLICIES_DIR
from tests.oidc_provider import OidcProvider, new_key, require
from tests.policyseal import seal
from tests.redis_server import free_port
from tests.stack import build_stack

SECRET = "test-client-secret-0123456789abcdefghij"
NURSE = "inf.durand"  # a demo account with a dpiguard TOTP
PSC_RPPS = "10100000015"

OIDC_YAML = """\
# Test mapping: generic groups and Pro Santé Connect professions to roles.
rules:
  - claim: groups
    value: dpi-medecins
    roles: [doctor]
  - claim: groups
    value: dpi-infirmiers
    roles: [nurse]
  - profession: "10"        # médecin
    sector: SA07            # établissement de santé
    roles: [doctor]
"""


def ref_pro(profession: str, sector: str) -> dict:
    return {"codeCivilite": "DR", "exercices": [{
        "codeProfession": profession, "codeCategorieProfessionnelle": "C", "codeSavoirFaire": "SM54",
        "nomDexercice": "MARTIN", "prenomDexercice": "Claire",
        "activities": [{"codeModeExercice": "S", "codeSecteurDactivite": sector, "numeroFinessSite": "750000001",
                        "raisonSocialeSite": "CH de test"}]}]}


ACCOUNTS = {
    "alice.gen": {"claims": {"preferred_username": "alice.gen", "name": "Alice Generic", "groups": ["dpi-medecins"]},
                  "acr": "low", "amr": ["pwd", "mfa"]},
    NURSE: {"claims": {"preferred_username": NURSE, "name": "Infirmière Durand", "groups": ["dpi-infirmiers"]},
            "acr": "low", "amr": ["pwd"]},
    "bob.gen": {"claims": {"preferred_username": "bob.gen", "groups": ["dpi-infirmiers"]}, "acr": "low", "amr": ["pwd"]},
    "carl.gen": {"claims": {"preferred_username": "carl.gen", "groups": ["autre"]}, "acr": "low", "amr": ["mfa"]},
    "psc-doc": {"claims": {"preferred_username": "8" + PSC_RPPS, "SubjectNameID": "8" + PSC_RPPS,
                           "given_name": "Claire", "family_name": "MARTIN", "SubjectRefPro": ref_pro("10", "SA07")},
                "acr": "eidas1", "amr": ["pwd"]},
    "psc-weak": {"claims": {"preferred_username": "810100000023", "SubjectNameID": "810100000023",
                            "SubjectRefPro": ref_pro("10", "SA07")}, "acr": "low", "amr": ["pwd"]},
    "psc-pharm": {"claims": {"preferred_username": "810100000031", "SubjectNameID": "810100000031",
                             "SubjectRefPro": ref_pro("21", "SA07")}, "acr": "eidas1", "amr": ["pwd"]},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require()
    work = tmp_path_factory.mktemp("oidc")
    policies = work / "policies"
    shutil.copytree(POLICIES_DIR, policies)
    (policies / "oidc.yaml").write_text(OIDC_YAML)
    seal(policies)
    (work / "oidc-secret").write_text(SECRET + "\n")
    gen_port, psc_port = free_port(), free_port()
    provider_port = free_port()
    issuer = f"http://127.0.0.1:{provider_port}"

    def client(cid: str, port: int) -> dict:
        base = f"http://127.0.0.1:{port}/_dpiguard"
        return {"client_id": cid, "client_secret": SECRET, "redirect_uris": [f"{base}/oidc/callback"],
                "post_logout_redirect_uris": [f"{base}/login?reason=logged_out"],
                "backchannel_logout_uri": f"{base}/oidc/backchannel-logout",
                "backchannel_logout_session_required": True, "grant_types": ["authorization_code"],
                "response_types": ["code"], "token_endpoint_auth_method": "client_secret_basic",
                "scope": "openid profile groups scope_all"}

    pkjwt = jwk.RSAKey.generate_key(2048, {"kid": "rp-key"}, private=True)
    (work / "rp-key.pem").write_bytes(pkjwt.as_pem(private=True))
    direct = {**client("dpiguard-pkjwt", 1), "token_endpoint_auth_method": "private_key_jwt",
              "token_endpoint_auth_signing_alg": "RS256", "jwks": {"keys": [pkjwt.as_dict(private=False)]}}
    del direct["client_secret"], direct["backchannel_logout_uri"], direct["backchannel_logout_session_required"]
    provider = OidcProvider(work / "idp", [client("dpiguard", gen_port), client("dpiguard-psc", psc_port), direct],
                            ACCOUNTS, port=provider_port).start()
    stack = build_stack(work, config_extra={
        "policies": {"dir": str(policies)},
        "oidc": {"enabled": True, "issuer": issuer, "client_id": "dpiguard", "client_secret_file": "oidc-secret",
                 "redirect_uri": f"http://127.0.0.1:{gen_port}/_dpiguard/oidc/callback",
                 "post_logout_redirect_uri": f"http://127.0.0.1:{gen_port}/_dpiguard/login?reason=logged_out",
                 "scopes": ["openid", "profile", "groups"], "jwks_refresh_seconds": 0},
    })
    gen = stack.start_proxy("gen", port=gen_port)
    psc = stack.start_proxy("psc", port=psc_port, env={
        "DPIGUARD_OIDC__PROFILE": "psc", "DPIGUARD_OIDC__CLIENT_ID": "dpiguard-psc",
        "DPIGUARD_OIDC__SCOPES": "openid,scope_all",
        "DPIGUARD_OIDC__REDIRECT_URI": f"http://127.0.0.1:{psc_port}/_dpiguard/oidc/callback",
        "DPIGUARD_OIDC__POST_LOGOUT_REDIRECT_URI": f"http://127.0.0.1:{psc_port}/_dpiguard/login?reason=logged_out"})
    yield {"stack": stack, "provider": provider, "gen": gen, "psc": psc, "issuer": issuer,
           "rp_key": work / "rp-key.pem"}
    stack.close()
    provider.stop()


def records(env, **match):
    return [r for r in read_records(env["stack"].audit_path) if all(r.get(k) == v for k, v in match.items())]


def wait_records(env, timeout=5.0, **match):
    deadline = time.monotonic() + timeout
    while True:
        found = records(env, **match)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def idp_login(proxy, login: str, client: httpx.Client | None = None, next_target: str = "/"):
    """Log in through the IdP like a browser: (client, the callback's response, the callback URL)."""
    c = client or httpx.Client(timeout=10)
    r = c.get(proxy.url + "/_dpiguard/oidc/login", params={"next": next_target})
    assert r.status_code == 303, r.text
    callback = proxy.url + "/_dpiguard/oidc/callback"
    for _ in range(12):
        if r.status_code in (302, 303):
            location = urljoin(str(r.url), r.headers["location"])
            if location.startswith(callback):
                return c, c.get(location), location
            r = c.get(location)
        elif r.status_code == 200 and "/interaction/" in r.text:
            action = re.search(r'action="([^"]+)"', r.text).group(1)
            r = c.post(urljoin(str(r.url), action), data={"login": login})
        else:
            raise AssertionError(f"unexpected answer from the IdP: {r.status_code} {r.text[:300]}")
    raise AssertionError("too many redirects")


def idp_confirm_logout(c: httpx.Client, r: httpx.Response) -> httpx.Response:
    """Answer the provider's 'do you want to sign out?' form with yes, follow the redirects."""
    action = re.search(r'<form[^>]*action="([^"]+)"', r.text).group(1)
    xsrf = re.search(r'name="xsrf" value="([^"]+)"', r.text).group(1)
    r = c.post(urljoin(str(r.url), action), data={"xsrf": xsrf, "logout": "yes"})
    while r.status_code in (302, 303):
        r = c.get(urljoin(str(r.url), r.headers["location"]))
    return r


def whoami(c: httpx.Client, proxy) -> httpx.Response:
    return c.get(proxy.url + "/_dpiguard/api/session")


# -- logins ------------------------------------------------------------------------------------------

def test_login_page_offers_the_idp_button(env):
    page = httpx.get(env["gen"].url + "/_dpiguard/login", headers={"accept-language": "fr"})
    assert "/_dpiguard/oidc/login?next=" in page.text
    assert "Se connecter avec le compte de l’hôpital" in page.text
    page = httpx.get(env["psc"].url + "/_dpiguard/login", headers={"accept-language": "fr"})
    assert "Se connecter avec Pro Santé Connect" in page.text


def test_generic_login_with_mfa_at_the_idp_opens_a_session_without_totp(env):
    c, r, _ = idp_login(env["gen"], "alice.gen")
    assert r.status_code == 200, r.text
    assert 'http-equiv="refresh"' in r.text
    me = whoami(c, env["gen"]).json()
    assert me["user"] == "alice.gen" and me["roles"] == ["doctor"]
    ok = records(env, event="login_success", user="alice.gen")
    assert ok and ok[-1]["idp"] == "oidc"
    c.get(env["gen"].url + "/", headers={"accept": "text/html"})
    access = wait_records(env, user="alice.gen", event="access")
    assert access and access[-1]["idp"] == "oidc"


def test_psc_login_puts_the_rpps_in_every_trace_record(env):
    c, r, _ = idp_login(env["psc"], "psc-doc")
    assert r.status_code == 200, r.text
    me = whoami(c, env["psc"]).json()
    assert me["user"] == "8" + PSC_RPPS and me["roles"] == ["doctor"]
    c.get(env["psc"].url + "/patients/P0001/notes", headers={"accept": "text/html"})
    access = wait_records(env, user="8" + PSC_RPPS, event="access")
    assert access, "no access record"
    assert all(a["idp"] == "psc" and a["rpps"] == PSC_RPPS for a in access)
    assert records(env, event="login_success", user="8" + PSC_RPPS)[-1]["rpps"] == PSC_RPPS


def test_psc_acr_below_eidas1_is_refused_and_traced(env):
    c, r, _ = idp_login(env["psc"], "psc-weak")
    assert r.status_code == 403
    assert "carte CPS" in r.text  # the French explanation
    assert whoami(c, env["psc"]).status_code == 401
    assert records(env, event="login_failure", reason="acr_too_low")


def test_profession_without_a_rule_gets_no_role_and_no_access(env):
    c, r, _ = idp_login(env["psc"], "psc-pharm")
    assert r.status_code == 403 and "RSSI" in r.text
    assert whoami(c, env["psc"]).status_code == 401
    refused = records(env, event="login_failure", reason="no_role")
    assert refused and refused[-1]["rpps"] == "10100000031"
    c, r, _ = idp_login(env["gen"], "carl.gen")  # generic: an unmapped group
    assert r.status_code == 403 and whoami(c, env["gen"]).status_code == 401


def test_amr_without_mfa_asks_for_the_dpiguard_totp_code(env):
    stack = env["stack"]
    c, r, _ = idp_login(env["gen"], NURSE)
    assert r.status_code == 200 and 'name="pending"' in r.text
    assert whoami(c, env["gen"]).status_code == 401  # not yet
    pending = re.search(r'name="pending" value="([^"]+)"', r.text).group(1)
    csrf = re.search(r'name="csrf" value="([^"]+)"', r.text).group(1)
    bad = c.post(env["gen"].url + "/_dpiguard/oidc/totp", data={"pending": pending, "csrf": csrf, "totp": "000000"})
    assert bad.status_code == 401 and "incorrect" in bad.text.lower() or "incorrect" in bad.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', bad.text).group(1)
    ok = c.post(env["gen"].url + "/_dpiguard/oidc/totp",
                data={"pending": pending, "csrf": csrf, "totp": stack.totp(NURSE)})
    assert ok.status_code == 200, ok.text
    me = whoami(c, env["gen"]).json()
    assert me["user"] == NURSE and me["roles"] == ["nurse"]
    assert records(env, event="login_failure", user=NURSE, reason="invalid_credentials")
    stack_auth = records(env, event="login_success", user=NURSE)
    assert "dpiguard totp" in stack_auth[-1]["detail"]


def test_no_totp_record_and_no_mfa_is_refused(env):
    c, r, _ = idp_login(env["gen"], "bob.gen")
    assert r.status_code == 403 and "second" in r.text.lower() or "second facteur" in r.text
    assert whoami(c, env["gen"]).status_code == 401
    assert records(env, event="login_failure", user="bob.gen", reason="no_second_factor")


def test_wrong_and_replayed_state_are_refused(env):
    gen = env["gen"]
    r = httpx.get(gen.url + "/_dpiguard/oidc/callback", params={"state": "x" * 43, "code": "abc"})
    assert r.status_code == 400
    c, r, callback = idp_login(gen, "alice.gen")
    assert r.status_code == 200
    again = c.get(callback)
    assert again.status_code == 400
    other_browser = httpx.get(callback)  # and from a browser without the binding cookie
    assert other_browser.status_code == 400
    assert len(records(env, event="login_failure", reason="wrong_state")) >= 3


def test_state_from_another_browser_is_refused(env):
    gen = env["gen"]
    c = httpx.Client(timeout=10)
    r = c.get(gen.url + "/_dpiguard/oidc/login")
    state = parse_qs(urlsplit(r.headers["location"]).query)["state"][0]
    r = httpx.get(gen.url + "/_dpiguard/oidc/callback", params={"state": state, "code": "abc"},
                  cookies={"dpiguard_oidc": "forged"})
    assert r.status_code == 400


def test_an_answer_naming_another_issuer_is_refused(env):
    gen = env["gen"]
    c = httpx.Client(timeout=10)
    r = c.get(gen.url + "/_dpiguard/oidc/login")
    state = parse_qs(urlsplit(r.headers["location"]).query)["state"][0]
    r = c.get(gen.url + "/_dpiguard/oidc/callback", params={"state": state, "code": "abc",
                                                            "iss": "http://127.0.0.1:1"})
    assert r.status_code == 401
    assert records(env, event="login_failure", reason="invalid_token")


# -- the verifier against the provider's real keys ------------------------------------------------------

@pytest.fixture
def rp(env):
    settings = OidcSettings(issuer=env["issuer"], client_id="dpiguard", redirect_uri="http://127.0.0.1:1/cb",
                            client_secret=SECRET, clock_skew=30, jwks_refresh_seconds=0)
    from dpiguard.services import redis_client

    return RelyingParty(settings, redis_client(env["stack"].config), "dpiguard-test")


def _sign(key: dict, claims: dict, alg="RS256") -> str:
    k = jwk.import_key(key)
    return jwt.encode({"alg": alg, "kid": key["kid"]}, claims, k, algorithms=[alg])


def _claims(env, **over):
    now = int(time.time())
    return {"iss": env["issuer"], "aud": "dpiguard", "sub": "alice.gen", "iat": now, "exp": now + 300,
            "nonce": "n-1", **over}


def test_verifier_accepts_a_token_signed_by_the_provider_key(env, rp):
    key = env["provider"].keys[0]
    assert rp.verify_id_token(_sign(key, _claims(env)), "n-1")["sub"] == "alice.gen"


@pytest.mark.parametrize("case", ["forged", "expired", "wrong_nonce", "wrong_aud", "wrong_iss", "future_iat",
                                  "alg_none", "hs256", "wrong_azp"])
def test_verifier_refuses_bad_id_tokens(env, rp, case):
    key = env["provider"].keys[0]
    now = int(time.time())
    if case == "forged":  # another key, with the provider's kid
        other = new_key(key["kid"])
        token = _sign(other, _claims(env))
    elif case == "expired":
        token = _sign(key, _claims(env, exp=now - 120, iat=now - 400))
    elif case == "wrong_nonce":
        token = _sign(key, _claims(env, nonce="other"))
    elif case == "wrong_aud":
        token = _sign(key, _claims(env, aud="someone-else"))
    elif case == "wrong_iss":
        token = _sign(key, _claims(env, iss="http://127.0.0.1:1"))
    elif case == "future_iat":
        token = _sign(key, _claims(env, iat=now + 600))
    elif case == "wrong_azp":
        token = _sign(key, _claims(env, aud=["dpiguard", "x"], azp="x"))
    elif case == "alg_none":
        import base64
        import json

        def b64(d):
            return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
        token = b64({"alg": "none", "kid": key["kid"]}) + "." + b64(_claims(env)) + "."
    else:  # hs256 keyed with the public key's modulus text: the classic confusion
        secret = jwk.OctKey.import_key(key["n"].encode())
        token = jwt.encode({"alg": "HS256", "kid": key["kid"]}, _claims(env), secret, algorithms=["HS256"])
    with pytest.raises(OidcError) as exc:
        rp.verify_id_token(token, "n-1")
    expected = {"expired": "expired_token", "wrong_nonce": "wrong_nonce"}.get(case, "invalid_token")
    assert exc.value.code == expected, exc.value


def test_backchannel_logout_token_checks_and_replay(env):
    key = env["provider"].keys[0]
    gen = env["gen"]
    now = int(time.time())
    base = {"iss": env["issuer"], "aud": "dpiguard", "iat": now, "jti": f"jti-{now}", "sid": "no-such-sid",
            "events": {BACKCHANNEL_EVENT: {}}}

    def post(token):
        return httpx.post(gen.url + "/_dpiguard/oidc/backchannel-logout", data={"logout_token": token})

    assert post(_sign(key, base)).status_code == 200
    assert post(_sign(key, base)).status_code == 400  # the same jti again
    assert post(_sign(key, {**base, "jti": "j2", "nonce": "x"})).status_code == 400
    assert post(_sign(key, {**base, "jti": "j3", "events": {}})).status_code == 400
    assert post(_sign(new_key(key["kid"]), {**base, "jti": "j4"})).status_code == 400
    assert post(_sign(key, {**base, "jti": "j5", "aud": "other"})).status_code == 400
    assert records(env, event="oidc_logout", reason="replayed_token")


def test_private_key_jwt_and_pkce_against_the_provider(env):
    """The relying party alone, with private_key_jwt (a signed client assertion instead of a secret)."""
    from dpiguard.services import redis_client

    settings = OidcSettings(issuer=env["issuer"], client_id="dpiguard-pkjwt",
                            redirect_uri="http://127.0.0.1:1/_dpiguard/oidc/callback", token_auth="private_key_jwt",
                            private_key_pem=env["rp_key"].read_bytes(), scopes=("openid", "profile", "groups"))
    rp = RelyingParty(settings, redis_client(env["stack"].config), "dpiguard-test")
    url, binding = rp.begin("/")
    c = httpx.Client(timeout=10)
    r = c.get(url)
    for _ in range(12):
        if r.status_code in (302, 303):
            location = urljoin(str(r.url), r.headers["location"])
            if location.startswith(settings.redirect_uri):
                break
            r = c.get(location)
        else:
            r = c.post(urljoin(str(r.url), re.search(r'action="([^"]+)"', r.text).group(1)), data={"login": "alice.gen"})
    q = parse_qs(urlsplit(location).query)
    flow = rp.take_flow(q["state"][0], binding)
    identity = rp.finish(flow, q["code"][0])
    assert identity.login == "alice.gen" and identity.second_factor and identity.amr == ("pwd", "mfa")
    with pytest.raises(OidcError):  # the state served once
        rp.take_flow(q["state"][0], binding)
    with pytest.raises(OidcError) as exc:  # the code too (the provider refuses it)
        rp.finish(flow, q["code"][0])
    assert exc.value.code == "token_refused"


def test_unknown_kid_refetches_the_jwks_at_most_once_per_interval(env):
    from dpiguard.services import redis_client

    fetched = []
    http = httpx.Client(timeout=5, event_hooks={"request": [lambda req: fetched.append(req.url.path)]})
    settings = OidcSettings(issuer=env["issuer"], client_id="dpiguard", redirect_uri="http://127.0.0.1:1/cb",
                            jwks_refresh_seconds=3600)
    rp = RelyingParty(settings, redis_client(env["stack"].config), "dpiguard-test", http=http)
    key = env["provider"].keys[0]
    rp.verify_id_token(_sign(key, _claims(env)), "n-1")
    stranger = new_key("unknown-kid")
    for _ in range(5):
        with pytest.raises(OidcError):
            rp.verify_id_token(_sign(stranger, _claims(env)), "n-1")
    assert fetched.count("/jwks") == 1  # the first fetch; then unknown kids wait for the interval


# -- logout ----------------------------------------------------------------------------------------

def test_backchannel_logout_from_the_idp_ends_the_session(env):
    gen = env["gen"]
    c, r, _ = idp_login(gen, "alice.gen")
    assert whoami(c, gen).status_code == 200
    end_session = httpx.get(env["issuer"] + "/.well-known/openid-configuration").json()["end_session_endpoint"]
    page = c.get(end_session, params={"client_id": "dpiguard"})  # logging out at the IdP, not at dpiguard
    assert page.status_code == 200, page.text
    idp_confirm_logout(c, page)
    deadline = time.monotonic() + 10
    while whoami(c, gen).status_code != 401:
        assert time.monotonic() < deadline, env["provider"].log()[-2000:]
        time.sleep(0.2)
    ended = records(env, event="oidc_logout", outcome="allow", user="alice.gen")
    assert ended and "sessions ended: 1" in ended[-1]["detail"]


def test_rp_initiated_logout_ends_the_idp_session_too(env):
    gen = env["gen"]
    c, r, _ = idp_login(gen, "alice.gen")
    out = c.post(gen.url + "/_dpiguard/api/logout")
    assert out.status_code == 200
    target = out.json()["idp_logout"]
    q = parse_qs(urlsplit(target).query)
    assert q["id_token_hint"] and q["post_logout_redirect_uri"] == [f"{gen.url}/_dpiguard/login?reason=logged_out"]
    assert whoami(c, gen).status_code == 401
    page = c.get(target)
    final = idp_confirm_logout(c, page) if page.status_code == 200 and "xsrf" in page.text else page
    assert str(final.url).startswith(gen.url + "/_dpiguard/login")
    # the IdP session is over: a new login shows the IdP's login form again
    r = c.get(gen.url + "/_dpiguard/oidc/login")
    for _ in range(5):
        r = c.get(urljoin(str(r.url), r.headers["location"]))
        if r.status_code == 200:
            break
    assert "/interaction/" in r.text and "login" in r.text


# -- the mapping file is hot-reloaded ---------------------------------------------------------------

def test_mapping_file_edit_is_taken_live_and_a_broken_one_is_refused(env):
    policies = Path(env["stack"].config.policies.dir)
    gen = env["gen"]
    c, r, _ = idp_login(gen, "carl.gen")
    assert r.status_code == 403  # group "autre": no rule yet
    (policies / "oidc.yaml").write_text(OIDC_YAML + "  - claim: groups\n    value: autre\n    roles: [pharmacist]\n")
    seal(policies)
    deadline = time.monotonic() + 15
    while True:
        c, r, _ = idp_login(gen, "carl.gen")
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, "the edited mapping was not taken"
        time.sleep(0.5)
    assert whoami(c, gen).json()["roles"] == ["pharmacist"]
    (policies / "oidc.yaml").write_text(OIDC_YAML + "  - claim: groups\n    value: autre\n    roles: [surgeon]\n")
    seal(policies)  # sealed but invalid (unknown role): refused, the previous set stays in service
    time.sleep(3)
    c, r, _ = idp_login(gen, "carl.gen")
    assert r.status_code == 200
    (policies / "oidc.yaml").write_text(OIDC_YAML)
    seal(policies)


# -- key rotation (last: restarts the provider) ------------------------------------------------------

def test_key_rotation_at_the_idp(env):
    provider, gen = env["provider"], env["gen"]
    c, r, _ = idp_login(gen, "alice.gen")  # dpiguard has the JWKS of key-1 in its cache
    assert r.status_code == 200
    provider.restart(keys=[new_key("key-2"), provider.keys[0]])
    assert provider.public_jwks()["keys"][0]["kid"] == "key-2"
    c, r, _ = idp_login(gen, "alice.gen")  # id_token signed by key-2, unknown to dpiguard's cache
    assert r.status_code == 200, r.text
    assert whoami(c, gen).json()["user"] == "alice.gen"


def test_config_check_fetches_the_discovery_document(env, tmp_path):
    import subprocess
    import sys

    cfg = env["stack"].config_path
    ok = subprocess.run([sys.executable, "-m", "dpiguard.cli", "config", "check", "--config", str(cfg)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "OpenID Connect (generic) OK" in ok.stdout and "signing key" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "dpiguard.cli", "config", "check", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "DPIGUARD_OIDC__ISSUER": f"http://127.0.0.1:{free_port()}"})
    assert bad.returncode == 1 and "oidc: idp_unreachable: discovery document" in bad.stderr
