"""Kill the Redis master under traffic (Sentinel): no wrong decision at any time, service resumes.

Topology started by the test on loopback: a master, a replica and three sentinels (quorum 2), two
real dpiguard proxies (``dpiguard run``) configured with ``redis+sentinel://``. Client threads send a
mix of requests that must be allowed and requests that must be refused, through both proxies, while
the master is killed. Allowed: 503 (``internal_error``) during the switch. Never allowed: a 200 for a
request that must be refused, a 401 (lost session) or a 403 for a request that must be allowed.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from dpiguard.audit.chain import read_records
from dpiguard.careteam.store import CareTeamStore
from dpiguard.demo.runner import DEMO_PASSWORD
from dpiguard.storage import clients as redisconn
from tests.redis_topology import LocalSentinel

from .stack import build_stack

pytestmark = pytest.mark.timeout(240)

# (login, path, must_allow) — facts of the demo hospital (see README: inf.durand is in CARDIO, P0001
# stays in CARDIO, P0002 in PNEUMO; acc.robert is reception).
CASES = [
    ("inf.durand", "/api/patients/P0001/biology", True),
    ("inf.durand", "/api/patients/P0002/biology", False),
    ("acc.robert", "/api/patients/P0001", True),
    ("acc.robert", "/api/patients/P0001/notes", False),
]


def bus_events(proxy) -> float:
    text = httpx.get(f"{proxy.url}/_dpiguard/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "dpiguard_bus_events_total" and s.labels.get("event") in ("reconnect", "master_changed"):
                total += s.value
    return total


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stack-sentinel")
    s = build_stack(workdir, redis_topology=LocalSentinel(workdir / "redis-sentinel"))
    s.start_proxy("s1")
    s.start_proxy("s2")
    yield s
    s.close()


def test_master_killed_under_traffic(stack):
    topo: LocalSentinel = stack.redis
    tokens = {}
    for login in {c[0] for c in CASES}:
        r = httpx.post(f"{stack.proxies[0].url}/_dpiguard/api/login", timeout=10,
                       json={"username": login, "password": DEMO_PASSWORD, "totp": stack.totp(login)})
        assert r.status_code == 200, r.text
        tokens[login] = r.json()["token"]
    # Replication is asynchronous: make sure the sessions reached the replica before the kill
    # (production: min-replicas-to-write, see docs/operations.md for the loss window).
    host, port = topo.master_address()
    master = redis.Redis(host=host, port=port)
    assert master.wait(1, 2000) >= 1
    master.close()

    results: list[tuple[float, str, str, bool, int, str]] = []
    stop = threading.Event()

    def traffic(proxy):
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            while not stop.is_set():
                for login, path, must_allow in CASES:
                    try:
                        r = client.get(path, headers={"authorization": f"Bearer {tokens[login]}"})
                        status, reason = r.status_code, r.json().get("error", "") if r.status_code != 200 else ""
                    except httpx.HTTPError as exc:
                        status, reason = 0, type(exc).__name__
                    results.append((time.monotonic(), proxy.instance, path, must_allow, status, reason))
                time.sleep(0.01)

    threads = [threading.Thread(target=traffic, args=(p,), daemon=True) for p in stack.proxies]
    for t in threads:
        t.start()
    events_before = [bus_events(p) for p in stack.proxies]
    time.sleep(1.5)
    killed_at = time.monotonic()
    old = topo.kill_master()
    # wait for the sentinels to promote the replica
    deadline = time.monotonic() + 30
    while topo.master_address() in (None, (old.host, old.port)):
        assert time.monotonic() < deadline, "no failover within 30 s"
        time.sleep(0.1)
    failed_over_at = time.monotonic()
    # service comes back by itself on both proxies, with the same sessions (no new login)
    deadline = time.monotonic() + 30
    while True:
        recent = [r for r in results if r[0] > time.monotonic() - 0.5 and r[3]]
        by_proxy = {p.instance for p in stack.proxies}
        if recent and all(any(r[1] == i and r[4] == 200 for r in recent) for i in by_proxy) \
                and all(r[4] == 200 for r in recent[-8:]):
            break
        assert time.monotonic() < deadline, f"service did not resume: {recent[-8:]}"
        time.sleep(0.2)
    recovered_at = time.monotonic()

    # A care-team change made after the failover reaches every proxy (bus on the new master).
    store = CareTeamStore(redisconn.from_url(topo.url), grace_seconds=86400)
    store.assign("inf.durand", "P0002", kind="consultant")
    for p in stack.proxies:
        deadline = time.monotonic() + 5
        while httpx.get(f"{p.url}/api/patients/P0002/biology",
                        headers={"authorization": f"Bearer {tokens['inf.durand']}"}).status_code != 200:
            assert time.monotonic() < deadline, "assignment after failover not seen"
            time.sleep(0.05)
    store.unassign("inf.durand", "P0002")
    time.sleep(1.0)  # traffic keeps checking P0002 is refused again
    stop.set()
    for t in threads:
        t.join(15)

    assert len(results) > 100
    wrong = []
    for t, inst, path, must_allow, status, reason in results:
        if path == "/api/patients/P0002/biology" and t > recovered_at:
            continue  # assignment window of the step above, checked separately
        if must_allow and status not in (200, 503):
            wrong.append((round(t - killed_at, 2), inst, path, status, reason))
        if not must_allow and status not in (403, 503):
            wrong.append((round(t - killed_at, 2), inst, path, status, reason))
    assert not wrong, f"wrong decisions around the failover: {wrong[:10]}"
    refused_503 = [r for r in results if r[4] == 503]
    assert all(r[5] == "internal_error" for r in refused_503)
    # after the unassignment, P0002 is refused again everywhere
    for p in stack.proxies:
        r = httpx.get(f"{p.url}/api/patients/P0002/biology", headers={"authorization": f"Bearer {tokens['inf.durand']}"})
        assert r.status_code == 403 and r.json()["error"] == "not_in_care_team"
    # the event is visible in the metrics of every proxy
    for p, before in zip(stack.proxies, events_before):
        assert bus_events(p) > before
    # every refusal during the switch is traced
    traced = [r for r in read_records(stack.audit_path) if r.get("reason") == "internal_error"]
    assert len(traced) >= len(refused_503)
    print(f"failover: {failed_over_at - killed_at:.1f} s to promotion, {recovered_at - killed_at:.1f} s to "
          f"normal service; {len(results)} requests, {len(refused_503)} refused with 503 meanwhile")
