"""Authenticator: both factors, lockout, address throttling, against a real Redis-protocol server."""

from __future__ import annotations

import os
import time
from urllib.parse import parse_qs, urlparse

import pyotp
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dpiguard.auth.login import Authenticator, LoginResult
from dpiguard.auth.users import SecretBox, UserDirectory
from dpiguard.config import Login

PASSWORD = "Correct-Horse-42"
IP = "192.0.2.10"
STEP = 30


@pytest.fixture
def users(r) -> UserDirectory:
    return UserDirectory(r, SecretBox(os.urandom(32)))


@pytest.fixture
def totp(users) -> pyotp.TOTP:
    _, uri = users.add("alice", PASSWORD, ["nurse"])
    return pyotp.TOTP(parse_qs(urlparse(uri).query)["secret"][0])


def make_auth(r, users, **policy) -> Authenticator:
    return Authenticator(r, users, Login(**policy))


@pytest.fixture
def auth(r, users) -> Authenticator:
    return make_auth(r, users, lock_seconds=2)


class Clock:
    """Successive TOTP steps, so that each successful login uses a fresh code."""

    def __init__(self):
        self.now = 1_700_000_010.0

    def tick(self) -> float:
        self.now += STEP
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def outward(result: LoginResult) -> tuple:
    return (result.ok, result.user, result.reason, result.retry_after)


def test_success(r, auth, totp, clock):
    now = clock.tick()
    result = auth.login("alice", PASSWORD, totp.at(now), IP, now=now)
    assert result.ok and result.reason == "ok" and result.user.login == "alice"
    assert result.user.roles == ("nurse",)


def test_login_is_normalized(auth, totp, clock):
    now = clock.tick()
    assert auth.login("  ALICE ", PASSWORD, totp.at(now), IP, now=now).ok


def test_each_failure_is_invalid_credentials_with_precise_detail(r, users, totp, clock):
    auth = make_auth(r, users, max_failures=100)
    now = clock.tick()
    cases = [
        ("ghost", PASSWORD, totp.at(now), "unknown_user"),
        ("alice", "Wrong-Horse-42", totp.at(now), "bad_password"),
        ("alice", PASSWORD, "000000" if totp.at(now) != "000000" else "111111", "bad_totp"),
        ("alice", PASSWORD, "12ab56", "bad_totp"),
    ]
    for login, password, code, detail in cases:
        result = auth.login(login, password, code, IP, now=now)
        assert outward(result) == (False, None, "invalid_credentials", 0)
        assert result.detail == detail
    assert auth.login("alice", PASSWORD, totp.at(now), IP, now=now).ok
    reused = auth.login("alice", PASSWORD, totp.at(now), IP, now=now)
    assert outward(reused) == (False, None, "invalid_credentials", 0) and reused.detail == "totp_reused"
    users.disable("alice")
    now = clock.tick()
    disabled = auth.login("alice", PASSWORD, totp.at(now), IP, now=now)
    assert outward(disabled) == (False, None, "invalid_credentials", 0) and disabled.detail == "disabled"


def test_wrong_password_does_not_burn_the_code(auth, totp, clock):
    now = clock.tick()
    assert not auth.login("alice", "Wrong-Horse-42", totp.at(now), IP, now=now).ok
    assert auth.login("alice", PASSWORD, totp.at(now), IP, now=now).ok


def test_lockout_after_mixed_factor_failures(r, auth, totp, clock):
    now = clock.tick()
    bad_code = str((int(totp.at(now)) + 1) % 1_000_000).zfill(6)
    first = auth.login("alice", PASSWORD, bad_code, IP, now=now)
    assert first.detail == "bad_totp" and first.attempts_left == 2
    second = auth.login("alice", PASSWORD, bad_code, IP, now=now)
    assert second.detail == "bad_totp" and second.attempts_left == 1  # the page warns: last attempt
    assert r.get("dpiguard:authfail:{alice}") == b"2"
    # The failure that locks says so at once (dpi-rules.md rule 4: 3 failures lock >= 5 min).
    third = auth.login("alice", "Wrong-Horse-42", totp.at(now), IP, now=now)
    assert (third.reason, third.retry_after, third.attempts_left, third.detail) == ("locked", 2, 0, "bad_password")
    assert r.exists("dpiguard:lock:{alice}") and not r.exists("dpiguard:authfail:{alice}")
    locked = auth.login("alice", PASSWORD, totp.at(now), IP, now=now)
    assert (locked.ok, locked.reason) == (False, "locked")
    assert 1 <= locked.retry_after <= 2


def test_default_policy_is_three_failures_five_minutes():
    policy = Login()
    assert (policy.max_failures, policy.lock_seconds) == (3, 300)


def test_lock_expires(auth, totp, clock):
    for _ in range(3):
        auth.login("alice", "Wrong-Horse-42", "123456", IP)
    now = clock.tick()
    assert auth.login("alice", PASSWORD, totp.at(now), IP, now=now).reason == "locked"
    time.sleep(2.1)
    assert auth.login("alice", PASSWORD, totp.at(now), IP, now=now).ok


def test_unlock(auth, totp, clock):
    for _ in range(3):
        auth.login("alice", "Wrong-Horse-42", "123456", IP)
    auth.unlock("ALICE")
    now = clock.tick()
    assert auth.login("alice", PASSWORD, totp.at(now), IP, now=now).ok


def test_unknown_login_locks_identically(r, auth, totp):
    real = [auth.login("alice", "Wrong-Horse-42", "123456", IP) for _ in range(4)]
    ghost = [auth.login("ghost", "Wrong-Horse-42", "123456", IP) for _ in range(4)]
    assert [outward(x) for x in real] == [outward(x) for x in ghost]
    assert [x.reason for x in ghost] == ["invalid_credentials"] * 2 + ["locked"] * 2
    assert [x.attempts_left for x in ghost] == [2, 1, 0, None]
    assert r.exists("dpiguard:lock:{ghost}")


def test_success_resets_account_counter(r, auth, totp, clock):
    now = clock.tick()
    auth.login("alice", "Wrong-Horse-42", totp.at(now), IP, now=now)
    auth.login("alice", "Wrong-Horse-42", totp.at(now), IP, now=now)
    assert auth.login("alice", PASSWORD, totp.at(now), IP, now=now).ok
    assert not r.exists("dpiguard:authfail:{alice}")
    now = clock.tick()
    auth.login("alice", "Wrong-Horse-42", totp.at(now), IP, now=now)
    auth.login("alice", "Wrong-Horse-42", totp.at(now), IP, now=now)
    assert auth.login("alice", PASSWORD, totp.at(now), IP, now=now).ok


def test_failure_counter_has_window_ttl(r, auth):
    auth.login("alice", "Wrong-Horse-42", "123456", IP)
    assert 0 < r.ttl("dpiguard:authfail:{alice}") <= 600
    assert 0 < r.ttl(f"dpiguard:ipfail:{IP}") <= 600


def test_address_is_slowed_down_never_blocked(r, users, totp, clock):
    """A ward's workstations behind one NAT address: after many failures from that address, a user who
    never failed still logs in (one attempt per ip_slow_seconds from the address), never locked out."""
    auth = make_auth(r, users, max_failures=100, ip_max_failures=5, ip_slow_seconds=1)
    for i in range(20):
        result = auth.login(f"user{i}", "Wrong-Horse-42", "123456", IP)
        assert result.reason in ("invalid_credentials", "throttled")
    assert int(r.get(f"dpiguard:ipfail:{IP}")) >= 5
    time.sleep(1.1)  # the slowdown interval of the last attempt
    now = clock.tick()
    assert auth.login("alice", PASSWORD, totp.at(now), IP, now=now).ok  # the one attempt of this interval
    now = clock.tick()
    throttled = auth.login("alice", PASSWORD, totp.at(now), IP, now=now)
    assert (throttled.ok, throttled.reason, throttled.retry_after) == (False, "throttled", 1)
    assert auth.login("alice", PASSWORD, totp.at(now), "192.0.2.11", now=now).ok  # another client
    time.sleep(1.1)
    now = clock.tick()
    assert auth.login("alice", PASSWORD, totp.at(now), IP, now=now).ok


def test_trusted_networks_are_never_slowed(r, users, totp, clock):
    auth = make_auth(r, users, max_failures=100, ip_max_failures=2, trusted_networks=["192.0.2.0/24"])
    for i in range(5):
        assert auth.login(f"user{i}", "Wrong-Horse-42", "123456", IP).reason == "invalid_credentials"
    for _ in range(3):
        now = clock.tick()
        assert auth.login("alice", PASSWORD, totp.at(now), IP, now=now).ok
    # Accounts stay protected whatever the address: three failures lock one.
    strict = make_auth(r, users, ip_max_failures=2, trusted_networks=["192.0.2.0/24"])
    assert [strict.login("bob", "x", "123456", IP).reason for _ in range(3)] == [
        "invalid_credentials", "invalid_credentials", "locked"]


def test_ip_normalization(r, users):
    auth = make_auth(r, users, ip_max_failures=2, ip_slow_seconds=30)
    auth.login("ghost", "x", "123456", "::ffff:192.0.2.10")
    auth.login("ghost", "x", "123456", " 192.0.2.10 ")
    assert auth.login("ghost", "x", "123456", IP).reason == "locked"  # slowed: the interval's one attempt
    assert auth.login("ghost2", "x", "123456", IP).reason == "throttled"
    auth.unblock_ip(IP)
    assert auth.login("ghost2", "x", "123456", IP).reason == "invalid_credentials"


def test_non_addresses_share_one_bucket(r, users):
    auth = make_auth(r, users, ip_max_failures=2, ip_slow_seconds=30)
    auth.login("ghost", "x", "123456", "")
    auth.login("ghost", "x", "123456", None)
    auth.login("ghost", "x", "123456", "not-an-ip")  # slowed bucket: its one attempt
    assert auth.login("ghost", "x", "123456", "not-an-ip").reason == "throttled"
    assert r.exists("dpiguard:ipfail:unknown")


def test_overlong_or_malformed_login_only_counts_the_address(r, auth):
    for login in ("a" * 65, "bad{login}", "", "x" * 10_000):
        result = auth.login(login, PASSWORD, "123456", IP)
        assert outward(result) == (False, None, "invalid_credentials", 0)
        assert result.detail == "unknown_user"
    assert r.keys("*") == [f"dpiguard:ipfail:{IP}".encode()]
    assert r.get(f"dpiguard:ipfail:{IP}") == b"4"


def test_redis_errors_propagate(users, totp):
    offline = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    auth = Authenticator(offline, users, Login())
    with pytest.raises(redis.ConnectionError):
        auth.login("alice", PASSWORD, totp.now(), IP)
