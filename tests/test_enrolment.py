"""Enrolment links, the password rule, recovery codes and security-key storage: pure logic, then the
Redis-backed stores against the suite's real Redis-protocol server (the ``r`` fixture)."""

from __future__ import annotations

import os
import time

import orjson
import pyotp
import pytest

from dpiguard.auth.enrolment import (
    CONTAINS_LOGIN,
    MISMATCH,
    TOO_WEAK,
    EnrolmentLinks,
    RecoveryCodes,
    looks_like_recovery_code,
    password_entropy_bits,
    password_problems,
)
from dpiguard.auth.login import Authenticator
from dpiguard.auth.users import SecretBox, UserDirectory
from dpiguard.auth.webauthn import KEY_CLONED, KEY_EXPIRED, SecurityKeys
from dpiguard.config import Login

PASSWORD = "Correct-Horse-42"
IP = "192.0.2.20"


# -- the password rule (pure) ---------------------------------------------------------------------

def test_entropy_is_the_cnil_formula():
    # délibération 2022-100: length × log2(alphabet). 12 lowercase letters: 12 × log2(26) ≈ 56.4 bits.
    assert password_entropy_bits("abcdefghijkl") == pytest.approx(12 * 4.7004, rel=1e-3)
    assert password_entropy_bits("Abcdefghijk1") == pytest.approx(12 * 5.9542, rel=1e-3)  # 62 symbols
    assert password_entropy_bits("") == 0


@pytest.mark.parametrize("password, login, problems", [
    ("Court-1", "alice", [TOO_WEAK]),                              # 7 characters
    ("abcdefghijkl", "alice", [TOO_WEAK]),                         # 12, one class, 56 bits
    ("Abcdefghijk1", "alice", []),                                 # 12, three classes: the directory's rule
    ("cheval agrafe batterie solide", "bob.x", []),                # 29 chars, 2 classes: 29×log2(59) ≈ 170 bits
    ("cheval agrafe", "bob.x", [TOO_WEAK]),                        # 13 chars, 2 classes: 76 bits < 80
    ("Mon-alice-2026", "alice", [CONTAINS_LOGIN]),
    ("Abcdefghijk1", "alice", [MISMATCH]),
])
def test_password_rule(password, login, problems):
    again = "autre chose" if problems == [MISMATCH] else password
    assert password_problems(password, login, again) == problems


def test_recovery_code_shape():
    assert looks_like_recovery_code("abcd-efgh-jkmn") and looks_like_recovery_code("ABCDEFGHJKMN")
    assert not looks_like_recovery_code("123456") and not looks_like_recovery_code("abcd-efgh")


# -- Redis-backed ---------------------------------------------------------------------------------

@pytest.fixture
def users(r) -> UserDirectory:
    return UserDirectory(r, SecretBox(os.urandom(32)))


def test_link_is_single_use_and_stored_hashed(r):
    links = EnrolmentLinks(r, ttl=60)
    link = links.issue("alice", created_by="helpdesk")
    assert links.peek(link.token) == "alice"
    assert all(link.token.encode() not in k and link.token.encode() not in (r.dump(k) or b"") for k in r.keys("*"))
    assert links.take(link.token) == "alice"
    assert links.take(link.token) is None and links.peek(link.token) is None


def test_a_take_whose_reply_is_lost_still_gives_the_link_to_its_caller():
    """The client retries a take whose reply it lost; the retry must get the login (the person typed
    their password once), while any other take, and a look at the link, see it used."""
    from dpiguard.storage.clients import RedisSpec
    from tests.redis_server import LocalRedis, RedisRelay

    server = LocalRedis().start()
    relay = RedisRelay(server.port)
    try:
        client = RedisSpec.from_url(f"redis://127.0.0.1:{relay.port}/0").client(0.3)
        links = EnrolmentLinks(client, ttl=600)
        warm = links.issue("warm.up")
        assert links.take(warm.token) == "warm.up"  # connection made, script loaded
        link = links.issue("alice")
        relay.lose_next_reply.set()
        assert links.take(link.token) == "alice" and relay.lost == 1
        assert links.take(link.token) is None and links.peek(link.token) is None
        from dpiguard.auth.enrolment import TAKEN_KEEP_SECONDS, _digest
        from dpiguard.storage.keys import Keys

        assert 0 < client.ttl(Keys("dpiguard").enrol_link(_digest(link.token))) <= TAKEN_KEEP_SECONDS  # then gone
        client.close()
    finally:
        relay.close()
        server.close()


def test_link_expires_and_a_new_one_replaces_the_old(r):
    links = EnrolmentLinks(r, ttl=1)
    first = links.issue("alice")
    second = links.issue("alice", ttl=1)
    assert links.peek(first.token) is None and links.peek(second.token) == "alice"
    time.sleep(2.2)
    assert links.take(second.token) is None
    assert links.take("x" * 43) is None and links.take("not a token") is None


def test_recovery_codes_single_use_hashed_and_regenerated(r):
    codes = RecoveryCodes(r, count=10)
    issued = codes.generate("alice")
    assert len(set(issued)) == 10 and codes.remaining("alice") == 10
    stored = {m.decode() for m in r.smembers("dpiguard:recovery:{alice}")}
    assert not any(c.replace("-", "") in s for c in issued for s in stored)
    assert codes.use("alice", issued[0].upper())       # case and dashes do not matter
    assert not codes.use("alice", issued[0])           # once
    assert not codes.use("bob", issued[1])             # another user's set
    fresh = codes.generate("alice")
    assert not codes.use("alice", issued[1]) and codes.use("alice", fresh[1])


def test_recovery_code_logs_in_once_and_counts_failures(r, users):
    users.add("alice", PASSWORD, ["nurse"])
    codes = RecoveryCodes(r)
    auth = Authenticator(r, users, Login(), recovery=codes)
    issued = codes.generate("alice")
    wrong = auth.login("alice", "Wrong-Password-1", issued[0], IP)
    assert not wrong.ok and codes.remaining("alice") == 10      # a wrong password burns no code
    ok = auth.login("alice", PASSWORD, issued[0], IP)
    assert ok.ok and ok.detail == "recovery_code"
    again = auth.login("alice", PASSWORD, issued[0], IP)
    assert not again.ok and again.detail == "bad_totp" and again.attempts_left == 2


def test_enrolled_totp_secret_and_confirmed_code_cannot_log_in(r, users):
    users.add("alice", PASSWORD, ["nurse"])
    secret = pyotp.random_base32()
    code = pyotp.TOTP(secret).now()
    step = users.totp_step_of(secret, code)
    assert step is not None and users.totp_step_of(secret, "000000" if code != "000000" else "111111") is None
    users.set_totp_secret("alice", secret, last_step=step)
    auth = Authenticator(r, users, Login())
    assert auth.login("alice", PASSWORD, code, IP).detail == "totp_reused"


def test_key_challenge_is_single_use_and_short_lived(r):
    keys = SecurityKeys(r, "dpiguard", "localhost", "dpiguard", ["http://localhost:1"], challenge_ttl=1)
    r.hset("dpiguard:webauthn:{alice}", "AAAA", orjson.dumps({"pk": "AAAA", "count": 5}))
    ceremony = keys.begin_authentication("alice")
    options = orjson.loads(ceremony.options_json)
    assert options["rpId"] == "localhost" and options["allowCredentials"][0]["id"] == "AAAA"
    assert keys.finish_authentication(ceremony.id, "alice", '{"id":"AAAA"}').reason != KEY_EXPIRED
    assert keys.finish_authentication(ceremony.id, "alice", '{"id":"AAAA"}').reason == KEY_EXPIRED  # used
    late = keys.begin_authentication("alice")
    time.sleep(2.2)
    assert keys.finish_authentication(late.id, "alice", '{"id":"AAAA"}').reason == KEY_EXPIRED
    other = keys.begin_authentication("alice")
    assert keys.finish_authentication(other.id, "bob", '{"id":"AAAA"}').reason == KEY_EXPIRED  # another user
    assert keys.begin_authentication("bob") is None
    assert KEY_CLONED == "sign_count_regression"


def test_key_assertion_failures_lock_the_account(r, users):
    users.add("alice", PASSWORD, ["nurse"])
    auth = Authenticator(r, users, Login(max_failures=3))
    assert auth.first_factor("alice", PASSWORD, IP).ok
    assert not auth.first_factor("alice", "nope-nope-nope", IP).ok
    assert auth.second_factor("alice", IP, False, "bad_key_assertion").attempts_left == 1
    locked = auth.second_factor("alice", IP, False, KEY_CLONED)
    assert locked.reason == "locked" and locked.detail == KEY_CLONED
    assert auth.first_factor("alice", PASSWORD, IP).reason == "locked"
    assert auth.second_factor("alice", IP, True, "ok").reason == "locked"


# -- the enrolment section of the configuration ---------------------------------------------------

@pytest.mark.parametrize("section, key, words", [
    ("{webauthn_rp_id: 10.0.0.5}", "enrolment.webauthn_rp_id", "not an IP address"),
    ("{webauthn_rp_id: 'DPI Hopital'}", "enrolment.webauthn_rp_id", "domain name"),
    ("{webauthn_rp_id: dpi.hopital.fr, public_url: 'https://evil.example'}", "enrolment.public_url", "not on"),
    ("{public_url: 'https://dpi.hopital.fr/app'}", "enrolment.public_url", "no path"),
    ("{webauthn_rp_id: hopital.fr, webauthn_origins: ['ftp://dpi.hopital.fr']}", "enrolment.webauthn_origins",
     "scheme://host"),
    ("{link_ttl: 0}", "enrolment.link_ttl", "greater than 0"),
])
def test_config_check_says_what_is_wrong(tmp_path, section, key, words):
    from dpiguard.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text(f"upstream: {{url: 'http://x'}}\nenrolment: {section}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, {}, check_files=False)
    assert err.value.key == key and words in str(err.value)


def test_config_accepts_a_subdomain_origin(tmp_path):
    from dpiguard.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("upstream: {url: 'http://x'}\nenrolment: {webauthn_rp_id: hopital.fr, "
                    "public_url: 'https://dpi.hopital.fr'}\n")
    assert load_config(path, {}, check_files=False).enrolment.origins == ["https://dpi.hopital.fr"]
