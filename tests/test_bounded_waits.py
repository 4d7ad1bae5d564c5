"""Bounded waits (docs/operations.md#bounded-waits-and-thread-pools), through a real proxy.

- With Redis frozen (SIGSTOP: connected but silent), a request that needs Redis is refused within the
  documented bound, :func:`dpiguard.storage.clients.wait_bound` of the configured socket timeout, plus
  a margin for the proxy itself (it used to take up to ~8.5 s: nested redis-py retries).
- Blocking work runs in separate bounded pools: a burst of logins (argon2) in flight does not delay a
  cache-miss decision, which has its own pool.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from dpiguard.services import redis_client
from dpiguard.storage.clients import RedisSpec, spec_of, wait_bound

from .stack import build_stack

pytestmark = pytest.mark.timeout(240)

MARGIN = 1.5  # the proxy's own work and scheduling on a loaded 2-core machine; not the Redis wait


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("bounded"),
                    {"login": {"ip_max_failures": 100000, "max_failures": 100000},
                     "threads": {"portal": 2, "decisions": 4}})
    s.start_proxy("a")
    yield s
    s.close()


def test_the_bound_is_derived_from_the_configuration():
    assert wait_bound(0.5) == pytest.approx(2.75)
    assert wait_bound(1.0) == pytest.approx(4.75)
    assert RedisSpec.from_url("redis+cluster://a:1,b:2,c:3").wait_bound(0.5) == pytest.approx(4.25)
    assert RedisSpec.from_url("redis+sentinel://a:1,b:2,c:3/s").wait_bound(0.5) == pytest.approx(2.75)


def test_redis_operation_against_a_frozen_server_ends_within_the_bound(stack):
    """One Redis operation of the proxy's own client (services.redis_client), on a pooled connection
    and on a new one (connect, handshake, any health check included)."""
    cfg = stack.config
    client = redis_client(cfg)
    client.get("warm-up")
    bound = spec_of(cfg).wait_bound(cfg.redis.socket_timeout)
    stack.redis.freeze()
    try:
        for fresh in (False, True):
            started = time.monotonic()
            with pytest.raises(Exception):  # noqa: B017 - TimeoutError / ConnectionError / ClusterDownError
                c = redis_client(cfg) if fresh else client  # a Cluster client asks for the slot map here
                c.get("x")
            elapsed = time.monotonic() - started
            assert elapsed <= bound + 0.5, f"fresh={fresh}: {elapsed:.2f} s, bound {bound:.2f} s"
    finally:
        stack.redis.thaw()


def test_requests_that_need_redis_are_refused_within_the_bound(stack):
    proxy = stack.proxies[0]
    nurse = stack.login(proxy, "inf.durand")
    assert nurse.get("/api/patients/P0001/biology").status_code == 200
    bound = spec_of(stack.config).wait_bound(stack.config.redis.socket_timeout) + MARGIN
    stack.redis.freeze()
    try:
        for path in ("/api/patients/P0003/biology", "/api/patients/P0004/notes", "/api/patients/P0005"):
            started = time.monotonic()
            r = nurse.get(path)  # a decision not in the cache: it needs Redis
            elapsed = time.monotonic() - started
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert elapsed <= bound, f"{path}: refused after {elapsed:.2f} s, bound {bound:.2f} s"
        started = time.monotonic()
        r = httpx.post(f"{proxy.url}/_dpiguard/api/login", timeout=30,
                       json={"username": "inf.durand", "password": "x", "totp": "000000"})
        elapsed = time.monotonic() - started
        assert r.status_code == 503 and elapsed <= bound, (r.status_code, elapsed)
    finally:
        stack.redis.thaw()
    deadline = time.monotonic() + 20
    while httpx.get(f"{proxy.url}/_dpiguard/health/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "not ready again after Redis came back"
        time.sleep(0.2)


def test_a_burst_of_logins_does_not_delay_a_cache_miss_decision(stack):
    """80 logins (argon2 each) queue in the portal pool (2 threads); a decision that must ask Redis,
    sent once they are all in flight, is answered long before the last of them."""
    proxy = stack.proxies[0]
    nurse = stack.login(proxy, "inf.durand")
    logins_done: list[float] = []
    lock = threading.Lock()

    def burst(i: int) -> None:
        with httpx.Client(base_url=proxy.url, timeout=60) as c:
            r = c.post("/_dpiguard/api/login", json={"username": f"nobody{i:03d}", "password": "wrong-password",
                                                      "totp": "123456"})
            assert r.status_code in (401, 403), r.text
        with lock:
            logins_done.append(time.monotonic())

    threads = [threading.Thread(target=burst, args=(i,)) for i in range(80)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(0.5)  # every login is in flight (queued behind the 2 portal threads)
    t0 = time.monotonic()
    r = nurse.get("/api/patients/P0001/prescriptions")  # not decided before: a cache miss, Redis asked
    decision_done = time.monotonic()
    for t in threads:
        t.join()
    assert r.status_code == 200, r.text
    last_login = max(logins_done)
    assert last_login - started > 2.0, "the burst was too short to show anything"  # ~80 x argon2 on 2 threads
    # The decision did not wait for the logins ahead of it: it is answered while most are still queued.
    assert sum(1 for t in logins_done if t <= decision_done) < len(logins_done) / 2, (
        f"decision after {decision_done - t0:.2f} s, logins from {min(logins_done) - started:.2f} "
        f"to {last_login - started:.2f} s")
