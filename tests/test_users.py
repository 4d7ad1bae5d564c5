"""UserDirectory, SecretBox and QR rendering, against a real Redis-protocol server."""

from __future__ import annotations

import base64
import os
import stat
from urllib.parse import parse_qs, urlparse

import pyotp
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dpiguard.auth.qr import qr_png, qr_terminal
from dpiguard.auth.users import TOTP_BAD, TOTP_OK, TOTP_REUSED, SecretBox, User, UserDirectory
from dpiguard.storage import clients as redisconn

PASSWORD = "Correct-Horse-42"
T0 = 1_700_000_010.0  # 10 s into a 30 s step
STEP = 30


def secret_of(uri: str) -> str:
    return parse_qs(urlparse(uri).query)["secret"][0]


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(os.urandom(32))


@pytest.fixture
def users(r, box) -> UserDirectory:
    return UserDirectory(r, box)


@pytest.fixture
def alice(users):
    user, uri = users.add("alice", PASSWORD, ["nurse"], display_name="Alice A.")
    return user, pyotp.TOTP(secret_of(uri))


# -- SecretBox --------------------------------------------------------------------------------------


def test_secretbox_roundtrip_and_aad(box):
    token = box.encrypt("JBSWY3DPEHPK3PXP", aad="alice")
    assert "JBSWY3DPEHPK3PXP" not in token
    assert box.decrypt(token, aad="alice") == "JBSWY3DPEHPK3PXP"
    assert box.encrypt("x", aad="alice") != box.encrypt("x", aad="alice")  # random nonce
    with pytest.raises(ValueError):
        box.decrypt(token, aad="bob")
    with pytest.raises(ValueError):
        SecretBox(os.urandom(32)).decrypt(token, aad="alice")
    raw = bytearray(base64.b64decode(token))
    raw[-1] ^= 1
    with pytest.raises(ValueError):
        box.decrypt(base64.b64encode(bytes(raw)).decode(), aad="alice")


def test_key_file(tmp_path):
    path = tmp_path / "totp.key"
    SecretBox.generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    box = SecretBox.from_file(path)
    assert SecretBox.from_file(path).decrypt(box.encrypt("s", "a"), "a") == "s"
    with pytest.raises(FileExistsError):
        SecretBox.generate_key_file(path)
    bad = tmp_path / "bad.key"
    bad.write_text(base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="bad.key"):
        SecretBox.from_file(bad)
    bad.write_text("not base64 !!")
    with pytest.raises(ValueError, match="bad.key"):
        SecretBox.from_file(bad)


# -- adding users -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "password",
    ["Short-1a", "alllowercaseletters", "lowercase-and-dashes", "ALLUPPER12345", "abcdefghijk1"],
)
def test_password_policy_rejections(users, password):
    with pytest.raises(ValueError, match="password"):
        users.add("bob", password, ["nurse"])
    assert users.get("bob") is None


@pytest.mark.parametrize("password", ["abcdefghij1!", "Abcdefghijk1", "ABCDEFGHIJ1!", "Correct horse battery"])
def test_password_policy_accepts_three_classes(users, password):
    users.add("bob", password, ["nurse"])
    assert users.verify_password("bob", password)


@pytest.mark.parametrize("login", ["a", "-bob", "Bob Smith", "bob{x}", "b" * 65, "bob:x", ""])
def test_invalid_logins(users, login):
    with pytest.raises(ValueError):
        users.add(login, PASSWORD, ["nurse"])


def test_roles_validation(users):
    with pytest.raises(ValueError, match="role"):
        users.add("bob", PASSWORD, [])
    with pytest.raises(ValueError, match="role"):
        users.add("bob", PASSWORD, ["Nurse"])
    with pytest.raises(ValueError, match="role"):
        users.add("bob", PASSWORD, ["nurse,doctor x"])


def test_add_stores_expected_hash(r, users, alice):
    user, totp = alice
    assert user == User("alice", "Alice A.", ("nurse",), False, user.created)
    raw = {k.decode(): v.decode() for k, v in r.hgetall("dpiguard:user:{alice}").items()}
    assert set(raw) == {"login", "display_name", "roles", "pw_hash", "totp_enc", "totp_last_step", "disabled", "created",
                        "create_op"}
    assert raw["pw_hash"].startswith("$argon2id$")
    assert PASSWORD not in str(raw)
    assert totp.secret not in str(raw)
    assert raw["disabled"] == "0" and raw["roles"] == "nurse"
    assert r.smembers("dpiguard:users") == {b"alice"}
    with pytest.raises(ValueError):
        SecretBox(os.urandom(32)).decrypt(raw["totp_enc"], aad="alice")


def test_totp_secret_bound_to_login(r, users, box, alice):
    users.add("bob", PASSWORD, ["nurse"])
    moved = r.hget("dpiguard:user:{alice}", "totp_enc")
    with pytest.raises(ValueError):
        box.decrypt(moved.decode(), aad="bob")
    r.hset("dpiguard:user:{bob}", "totp_enc", moved)  # an attacker with Redis write access
    _, totp = alice
    with pytest.raises(ValueError):
        users.verify_totp("bob", totp.at(T0), now=T0)


def test_provisioning_uri(users):
    _, uri = users.add("carol", PASSWORD, ["doctor"])
    parsed = urlparse(uri)
    assert parsed.scheme == "otpauth" and parsed.netloc == "totp"
    assert parse_qs(parsed.query)["issuer"] == ["dpiguard"]
    assert "carol" in parsed.path


def test_duplicate_refused(users, alice):
    with pytest.raises(ValueError, match="exists"):
        users.add("alice", PASSWORD, ["doctor"])
    with pytest.raises(ValueError, match="exists"):
        users.add("  ALICE ", PASSWORD, ["doctor"])
    assert users.get("alice").roles == ("nurse",)


def test_list_get_and_mutations_publish(r, users):
    pubsub = r.pubsub()
    pubsub.subscribe("dpiguard:events")
    assert pubsub.get_message(timeout=1.0)["type"] == "subscribe"
    users.add("zed", PASSWORD, ["nurse"])
    users.add("amy", PASSWORD, ["doctor", "nurse"])
    assert [u.login for u in users.list()] == ["amy", "zed"]
    users.disable("zed")
    assert users.get("zed").disabled
    users.enable("zed")
    assert not users.get("zed").disabled
    users.set_roles("zed", ["doctor"])
    assert users.get("zed").roles == ("doctor",)
    users.set_password("zed", "Another-Pass-99")
    uri = users.reset_totp("zed")
    assert uri.startswith("otpauth://totp/")
    messages = []
    while (m := pubsub.get_message(timeout=0.2)) is not None:
        messages.append(m["data"].decode())
    assert messages == ["user:zed", "user:amy"] + ["user:zed"] * 5
    pubsub.close()


def test_unknown_login_mutations_raise_keyerror(r, users):
    for call in (
        lambda: users.disable("ghost"),
        lambda: users.enable("ghost"),
        lambda: users.set_roles("ghost", ["nurse"]),
        lambda: users.set_password("ghost", PASSWORD),
        lambda: users.reset_totp("ghost"),
    ):
        with pytest.raises(KeyError):
            call()
    assert r.keys("*") == []  # no partial record created


# -- passwords --------------------------------------------------------------------------------------


def test_verify_password(users, alice):
    assert users.verify_password("alice", PASSWORD)
    assert users.verify_password(" Alice ", PASSWORD)
    assert not users.verify_password("alice", PASSWORD + "x")
    assert not users.verify_password("ghost", PASSWORD)
    assert not users.verify_password("alice", None)
    users.disable("alice")
    assert not users.verify_password("alice", PASSWORD)
    users.enable("alice")
    users.set_password("alice", "Brand-New-Pass-7")
    assert not users.verify_password("alice", PASSWORD)
    assert users.verify_password("alice", "Brand-New-Pass-7")


def test_password_rehashed_when_parameters_change(r, box, alice):
    from argon2 import PasswordHasher

    weak = PasswordHasher(time_cost=1, memory_cost=8192)
    r.hset("dpiguard:user:{alice}", "pw_hash", weak.hash(PASSWORD))
    users = UserDirectory(r, box)
    assert users.verify_password("alice", PASSWORD)
    stored = r.hget("dpiguard:user:{alice}", "pw_hash").decode()
    assert not users.hasher.check_needs_rehash(stored)
    assert users.verify_password("alice", PASSWORD)


# -- TOTP -------------------------------------------------------------------------------------------


def test_totp_accepted_once(users, alice):
    _, totp = alice
    code = totp.at(T0)
    assert users.verify_totp("alice", code, now=T0)
    assert not users.verify_totp("alice", code, now=T0)
    assert users.check_totp("alice", code, now=T0 + 5) == TOTP_REUSED


def test_totp_older_step_refused_after_newer_used(users, alice):
    _, totp = alice
    previous = totp.at(T0 - STEP)
    assert users.check_totp("alice", previous, now=T0, consume=False) == TOTP_OK  # step-1 acceptable
    assert users.verify_totp("alice", totp.at(T0), now=T0)
    assert users.check_totp("alice", previous, now=T0) == TOTP_REUSED


def test_totp_previous_step_accepted_when_unused(users, alice):
    _, totp = alice
    assert users.verify_totp("alice", totp.at(T0 - STEP), now=T0)
    assert users.verify_totp("alice", totp.at(T0), now=T0)  # a newer step still works


def test_totp_window(users, alice):
    _, totp = alice
    assert not users.verify_totp("alice", totp.at(T0 + 2 * STEP), now=T0)
    assert not users.verify_totp("alice", totp.at(T0 - 2 * STEP), now=T0)
    assert users.verify_totp("alice", totp.at(T0 + STEP), now=T0)


@pytest.mark.parametrize("code", ["", "12345", "1234567", "12a456", " 123456", "١٢٣٤٥٦", None, 123456])
def test_totp_malformed_codes_refused_without_redis(box, code):
    offline = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    users = UserDirectory(offline, box)  # nothing listens on port 1
    assert users.check_totp("alice", code, now=T0) == TOTP_BAD  # would raise ConnectionError if it called Redis


def test_totp_unknown_and_disabled_users(users, alice):
    _, totp = alice
    assert not users.verify_totp("ghost", totp.at(T0), now=T0)
    users.disable("alice")
    assert not users.verify_totp("alice", totp.at(T0), now=T0)
    users.enable("alice")
    assert users.verify_totp("alice", totp.at(T0), now=T0)


def test_totp_check_without_consume_writes_nothing(r, users, alice):
    _, totp = alice
    assert users.check_totp("alice", totp.at(T0), now=T0, consume=False) == TOTP_OK
    assert r.hget("dpiguard:user:{alice}", "totp_last_step") == b"-1"
    assert users.verify_totp("alice", totp.at(T0), now=T0)


def test_totp_reuse_seen_across_instances(redis_url, r, box, alice):
    _, totp = alice
    client_a = redisconn.from_url(redis_url)
    client_b = redisconn.from_url(redis_url, decode_responses=True)
    try:
        instance_a = UserDirectory(client_a, box)
        instance_b = UserDirectory(client_b, box)
        code = totp.at(T0)
        assert instance_a.verify_totp("alice", code, now=T0)
        assert not instance_b.verify_totp("alice", code, now=T0)
        assert instance_b.verify_totp("alice", totp.at(T0 + STEP), now=T0 + STEP)
        assert not instance_a.verify_totp("alice", totp.at(T0 + STEP), now=T0 + STEP)
    finally:
        client_a.close()
        client_b.close()


def test_reset_totp(users, alice):
    _, old = alice
    assert users.verify_totp("alice", old.at(T0), now=T0)
    new = pyotp.TOTP(secret_of(users.reset_totp("alice")))
    assert new.secret != old.secret
    assert not users.verify_totp("alice", old.at(T0 + STEP), now=T0 + STEP)
    # last step was reset: even the step already used with the old secret is usable once
    assert users.verify_totp("alice", new.at(T0), now=T0)


# -- QR ---------------------------------------------------------------------------------------------


def test_qr_outputs(tmp_path, users):
    _, uri = users.add("dave", PASSWORD, ["nurse"])
    text = qr_terminal(uri)
    lines = text.splitlines()
    assert len(lines) > 10 and len({len(line) for line in lines}) == 1
    assert set(text) <= set("█▀▄ \n")
    path = tmp_path / "dave.png"
    qr_png(uri, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 100


def test_a_create_whose_reply_is_lost_is_not_reported_as_an_existing_account(box):
    """The client retries a command whose reply it did not get; the retry of ``add`` finds the account
    its own first attempt created. It must report the creation, not "already exists" (CI saw a user
    invite fail so on a busy Sentinel master), and still refuse an account someone else created."""
    from tests.redis_server import LocalRedis, RedisRelay

    server = LocalRedis().start()
    relay = RedisRelay(server.port)
    try:
        client = redisconn.RedisSpec.from_url(f"redis://127.0.0.1:{relay.port}/0").client(0.3)
        users = UserDirectory(client, box)
        users.add("first.user", PASSWORD, ["nurse"])  # connection made, script loaded
        relay.lose_next_reply.set()
        user, uri = users.add("lost.reply", PASSWORD, ["nurse"], display_name="Reply Lost")
        assert relay.lost == 1  # the first attempt's reply was really lost, and the retry answered
        assert user.login == "lost.reply" and uri.startswith("otpauth://totp/")
        stored = users.get("lost.reply")
        assert stored is not None and stored.roles == ("nurse",) and stored.display_name == "Reply Lost"
        assert users.verify_totp("lost.reply", pyotp.TOTP(secret_of(uri)).now())
        assert "lost.reply" in {u.login for u in users.list()}
        relay.lose_next_reply.set()
        _, ext_uri = users.add_external("lost.ldap", "ldap")
        assert relay.lost == 2 and users.get("lost.ldap").external == "ldap"
        with pytest.raises(ValueError, match="already exists"):
            users.add("lost.reply", PASSWORD, ["doctor"])  # a second create is still refused
        with pytest.raises(ValueError, match="already exists"):
            users.add_external("lost.ldap", "ldap")
        assert users.get("lost.reply").roles == ("nurse",)
        client.close()
    finally:
        relay.close()
        server.close()
