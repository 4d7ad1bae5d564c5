"""Idle timeout and Redis outage through the real proxy: fail closed, recover by itself."""

from __future__ import annotations

import time

import pytest

from dpiguard.audit.chain import read_records

from .stack import build_stack

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("stack-res"),
                    config_extra={"sessions": {"idle_timeout": 3, "touch_interval": 1}})
    s.start_proxy("r1")
    yield s
    s.close()


def test_idle_session_is_logged_out(stack):
    proxy = stack.proxies[0]
    c = stack.login(proxy, "dr.martin")
    # Activity keeps the session alive past the idle timeout...
    for _ in range(5):
        assert c.get("/api/patients/P0001").status_code == 200
        time.sleep(1)
    # ...inactivity ends it.
    time.sleep(4)
    r = c.get("/api/patients/P0001")
    assert r.status_code == 401
    assert r.json()["error"] == "session_expired"
    r = c.get("/patients/P0001", headers={"accept": "text/html"})
    assert r.status_code == 302 and "reason=session_expired" in r.headers["location"]


def test_redis_outage_refuses_then_recovers(stack):
    proxy = stack.proxies[0]
    c = stack.login(proxy, "inf.durand")
    assert c.get("/api/patients/P0001/biology").status_code == 200
    stack.redis.kill()
    try:
        # Once the proxy knows it lost Redis, nothing is allowed from a cache it can no longer trust.
        deadline = time.monotonic() + 5
        while True:
            r = c.get("/api/patients/P0001/biology")
            if r.status_code != 200:
                break
            assert time.monotonic() < deadline, "still allowing 5 s after Redis went away"
            time.sleep(0.1)
        for _ in range(5):
            r = c.get("/api/patients/P0001/biology")
            assert r.status_code == 503
            assert r.json()["error"] == "internal_error"
        assert c.get("/api/patients/P0002/biology").status_code == 503
    finally:
        stack.redis.start()
    deadline = time.monotonic() + 10
    while (r := c.get("/api/patients/P0001/biology")).status_code != 200:
        assert time.monotonic() < deadline, (
            f"did not recover after Redis came back: {r.status_code} {r.text[:200]}\n{proxy.log()[-3000:]}")
        time.sleep(0.2)
    assert c.get("/api/patients/P0002/biology").status_code == 403
    denied = [r for r in read_records(stack.audit_path) if r.get("reason") == "internal_error"]
    assert denied, "refusals during the outage must be traced"
