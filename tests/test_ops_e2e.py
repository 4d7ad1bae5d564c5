"""Operations through the real proxy: health/readiness endpoints, Prometheus metrics, several workers."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .stack import ROOT, build_stack, port_open

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("stack-ops"))
    s.start_proxy("o1")
    yield s
    s.close()


def scrape(proxy) -> dict:
    """Every sample of /_dpiguard/metrics as {(name, frozenset(labels)): value}; the text must parse."""
    r = httpx.get(f"{proxy.url}/_dpiguard/metrics", timeout=5)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_liveness_and_readiness_without_session(stack):
    proxy = stack.proxies[0]
    r = httpx.get(f"{proxy.url}/_dpiguard/health/live")
    assert r.status_code == 200 and r.json()["live"] is True and r.json()["instance"] == "o1"
    r = httpx.get(f"{proxy.url}/_dpiguard/health/ready")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ready"] and body["redis"] and body["cache_coherent"] and body["policy_loaded"]
    assert body["audit_writable"] and body["policy_version"]
    assert httpx.post(f"{proxy.url}/_dpiguard/health/ready").status_code == 405
    assert httpx.get(f"{proxy.url}/_dpiguard/health").status_code == 200  # the older summary stays
    assert not [p for p in stack.upstream_app.paths() if p.startswith("/_dpiguard")]


def test_metrics_count_decisions_and_logins(stack):
    proxy = stack.proxies[0]
    before = scrape(proxy)
    c = stack.login(proxy, "inf.durand")
    for _ in range(3):
        assert c.get("/api/patients/P0001/biology").status_code == 200
    assert c.get("/api/patients/P0002/biology").status_code == 403
    assert httpx.get(f"{proxy.url}/api/patients/P0001").status_code == 401
    after = scrape(proxy)
    delta = lambda name, **kw: value(after, name, **kw) - value(before, name, **kw)  # noqa: E731
    assert delta("dpiguard_requests_total", outcome="allow", reason="allowed") == 3
    assert delta("dpiguard_requests_total", outcome="deny", reason="not_in_care_team") == 1
    assert delta("dpiguard_requests_total", outcome="deny", reason="not_authenticated") == 1
    assert delta("dpiguard_logins_total", outcome="success") == 1
    # Each decision was a trace record, written durably through group commits.
    assert delta("dpiguard_audit_records_total") >= 5 and delta("dpiguard_audit_batches_total") >= 1
    assert delta("dpiguard_audit_fsyncs_total") >= 1 and delta("dpiguard_audit_fsync_seconds_total") > 0
    assert ("dpiguard_audit_queue_depth", frozenset()) in after
    assert ("dpiguard_policy_reload_failures_total", frozenset()) in after
    assert ("dpiguard_break_glass_grants_total", frozenset()) in after
    assert delta("dpiguard_decision_seconds_count", mode="local") + delta("dpiguard_decision_seconds_count", mode="io") == 5
    # the first request of the session asked Redis, the repeated ones were answered from memory
    assert delta("dpiguard_cache_lookups_total", tier="fast_path", result="hit") >= 1
    assert delta("dpiguard_decision_cache_hits_total") >= 1
    assert value(after, "dpiguard_bus_coherent") == 1
    assert value(after, "dpiguard_redis_up") == 1
    assert value(after, "dpiguard_ready") == 1
    assert value(after, "dpiguard_redis_ping_seconds_count") >= 1
    info = [k for k in after if k[0] == "dpiguard_build_info"]
    assert info and ("dpiguard_instance", "o1") in info[0][1]
    # no per-user or per-patient label anywhere
    for name, labels in after:
        assert not {k for k, _ in labels} & {"user", "patient", "path", "login"}, name


def test_failed_logins_and_lockout_are_counted(stack):
    proxy = stack.proxies[0]
    before = scrape(proxy)
    for _ in range(4):
        r = httpx.post(f"{proxy.url}/_dpiguard/api/login",
                       json={"username": "ops.locktest", "password": "wrong-password", "totp": "000000"})
        assert r.status_code in (401, 423, 429)
    after = scrape(proxy)
    # Two failures, then the third locks (and is counted as locked, as its answer says), then locked.
    assert value(after, "dpiguard_logins_total", outcome="failure") - value(before, "dpiguard_logins_total", outcome="failure") >= 2
    assert value(after, "dpiguard_logins_total", outcome="locked") - value(before, "dpiguard_logins_total", outcome="locked") >= 2


def test_metrics_only_for_allowed_addresses(stack):
    proxy = stack.start_proxy("o2", env={"DPIGUARD_METRICS__ALLOW_FROM": "[10.99.0.0/16]"})
    try:
        r = httpx.get(f"{proxy.url}/_dpiguard/metrics")
        assert r.status_code == 404 and "dpiguard_" not in r.text
        assert httpx.get(f"{proxy.url}/_dpiguard/health/ready").status_code == 200
    finally:
        proxy.stop()
        stack.proxies.remove(proxy)


def test_readiness_follows_redis_and_recovers(stack):
    proxy = stack.proxies[0]
    stack.redis.kill()
    try:
        deadline = time.monotonic() + 10
        while True:
            r = httpx.get(f"{proxy.url}/_dpiguard/health/ready", timeout=5)
            if r.status_code == 503 and r.json()["redis"] is False:
                break
            assert time.monotonic() < deadline, "Redis still reported reachable 10 s after it went away"
            time.sleep(0.2)
        assert r.json()["redis"] is False and r.json()["ready"] is False
        assert httpx.get(f"{proxy.url}/_dpiguard/health/live").status_code == 200  # alive: do not restart
        samples = scrape(proxy)
        assert value(samples, "dpiguard_redis_up") == 0
        assert value(samples, "dpiguard_redis_errors_total", where="probe") >= 1
    finally:
        stack.redis.start()
    deadline = time.monotonic() + 20
    while httpx.get(f"{proxy.url}/_dpiguard/health/ready", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "not ready again after Redis came back"
        time.sleep(0.2)
    assert value(scrape(proxy), "dpiguard_bus_events_total", event="reconnect") >= 1


def consecutive_free_ports(count: int) -> int:
    """A base port such that base..base+count-1 can all be bound now. Chosen below the kernel's
    ephemeral range, where outgoing connections (which also block a bind) take their ports."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, max(20001, low - count))
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no consecutive free ports found")


def test_two_workers_share_state(stack):
    base = consecutive_free_ports(2)
    env = dict(os.environ, DPIGUARD_LISTEN__PORT=str(base), DPIGUARD_INSTANCE_ID="wk",
               DPIGUARD_RUNTIME_DIR=str(stack.workdir / "runtime-workers"))
    log_path = stack.workdir / "workers.log"
    with open(log_path, "wb") as log:
        sup = subprocess.Popen([sys.executable, "-m", "dpiguard.cli", "run", "--workers", "2", "--config",
                                str(stack.config_path)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    try:
        urls = [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
        deadline = time.monotonic() + 40
        for url in urls:
            while True:
                assert sup.poll() is None, log_path.read_text()
                try:
                    r = httpx.get(f"{url}/_dpiguard/health/ready", timeout=1)
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        instances = {httpx.get(f"{u}/_dpiguard/health/live").json()["instance"] for u in urls}
        assert instances == {"wk-w0", "wk-w1"}
        # log in on worker 0, use the session on worker 1; log out on worker 1, refused on worker 0
        w0 = httpx.Client(base_url=urls[0], timeout=10)
        r = w0.post("/_dpiguard/api/login", json={"username": "inf.durand", "password": "Demo-Hopital-2026!",
                                                  "totp": stack.totp("inf.durand")})
        assert r.status_code == 200, r.text
        auth = {"authorization": f"Bearer {r.json()['token']}"}
        assert w0.get("/api/patients/P0001/biology", headers=auth).status_code == 200
        w1 = httpx.Client(base_url=urls[1], timeout=10)
        assert w1.get("/api/patients/P0001/biology", headers=auth).status_code == 200
        assert w1.get("/api/patients/P0002/biology", headers=auth).status_code == 403
        assert w1.post("/_dpiguard/api/logout", headers=auth).status_code == 200
        deadline = time.monotonic() + 5
        while w0.get("/api/patients/P0001/biology", headers=auth).status_code != 401:
            assert time.monotonic() < deadline, "worker 0 still accepts a session ended on worker 1"
            time.sleep(0.05)
    finally:
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(20) == 0
    assert not port_open(base) and not port_open(base + 1)
