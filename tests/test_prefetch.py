"""Care-team facts read by the event loop itself (dpiguard/edge/prefetch.py, ``DpiGuard._read_facts_and_decide``):
the decision taken after the loop's read is the one a fresh read gives; a read that fails or hangs is a
refusal within the Redis wait bound; an invalidation during the read keeps nothing. Real services on a
real Redis, a real silent server for the hanging case."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import replace

import pytest

from dpiguard.decision.access import facts_key
from dpiguard.decision.verdict import Incoming, NeedIO
from dpiguard.edge.addon import DpiGuard
from dpiguard.edge.prefetch import FactsReader
from dpiguard.storage.clients import RedisSpec
from tests.redis_server import free_port
from tests.test_decision_cache_gc import settle

USER = "ide.loop"


@pytest.fixture
def services_started(services):
    _, s = services
    now = time.time()
    s.careteam.add_unit_member(USER, "CARDIO")
    s.careteam.add_stay("PL1", "CARDIO", now - 3600)
    s.start()
    settle(s.pipeline.cache)  # what the set-up published may still arrive (Redis Cluster)
    assert s.pipeline.cache.enabled
    token, _ = s.sessions.create(USER, ["nurse"])
    return s, token


@pytest.fixture
def running(services_started):
    """The services with their event-loop reader (every topology: standalone, Sentinel, Cluster)."""
    s, token = services_started
    assert s.facts_reader is not None
    return s, token


def request(path: str, token: str) -> Incoming:
    return Incoming("GET", path, {"host": "dpi.test", "accept": "application/json",
                                  "authorization": f"Bearer {token}"}, "127.0.0.1", False, header_bytes=200)


def first_need(s, req) -> NeedIO:
    with pytest.raises(NeedIO) as caught:
        s.pipeline.decide(req, io=False)
    return caught.value


def test_the_loop_reads_the_facts_and_the_decision_is_a_fresh_reads(running):
    s, token = running
    p = s.pipeline
    s.pipeline.decide(request("/patients", token), io=True)  # the session and units in this instance

    async def proxy_loop():  # one event loop, as in the proxy
        for patient, allowed in (("PL1", True), ("PL2", False)):
            req = request(f"/api/patients/{patient}/biology", token)
            need = first_need(s, req)
            assert need.facts == (USER, patient)
            reads = p.cache.stats()["fact_puts"]
            verdict = await DpiGuard(s)._read_facts_and_decide(req, need)
            assert verdict is not None and verdict.allowed is allowed, verdict
            assert p.cache.stats()["fact_puts"] == reads + 1  # one read, by the loop
            oracle, _, _ = p.access.decide_with_units(USER, patient, "biology", "read", True, time.time(),
                                                      p.policies)
            assert (verdict.allowed, verdict.source) == (oracle.member, oracle.source)
            assert verdict.audit is not None  # traced like any decision

    asyncio.run(proxy_loop())


def test_a_session_missing_is_left_to_the_workers(running):
    s, token = running
    s.sessions.clear_local()
    req = request("/api/patients/PL1/biology", token)
    need = first_need(s, req)
    assert need.facts is None
    assert asyncio.run(DpiGuard(s)._read_facts_and_decide(req, need)) is None


def test_an_invalidation_during_the_read_keeps_nothing(running):
    s, _ = running
    p = s.pipeline
    generation = p.cache.generation()
    facts = p.access.read_facts(USER, "PL1", time.time(), p.policies)
    p.cache.invalidate_patient("PL1")  # came while the read was on the wire
    assert not p.store_facts(USER, "PL1", facts, generation)
    assert p.cache.get(facts_key(USER, "PL1"), time.time()) is None


def test_another_event_loop_leaves_the_read_to_the_workers(running):
    s, _ = running

    async def read():
        return await s.facts_reader.read(s.pipeline, USER, "PL1")

    assert asyncio.run(read()) is True  # the first loop owns the client's connections
    assert asyncio.run(read()) is False  # another one does not use them


def _silent_server() -> tuple[socket.socket, int]:
    """A server that accepts connections and never answers (a frozen Redis)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener, listener.getsockname()[1]


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_a_failed_or_hanging_read_is_a_refusal_within_the_bound(services_started, kind):
    s, token = services_started  # any topology: the reader below points at a standalone address
    listener = None
    if kind == "refused":
        port = free_port()  # nothing listens
    else:
        listener, port = _silent_server()
    try:
        spec = RedisSpec.from_url(f"redis://127.0.0.1:{port}/0")
        bound = spec.wait_bound(0.2)
        s.facts_reader = FactsReader(spec.async_client(0.2), bound)
        s.pipeline.decide(request("/patients", token), io=True)
        req = request("/api/patients/PL1/biology", token)
        need = first_need(s, req)
        errors = s.audit.errors
        t0 = time.monotonic()
        verdict = asyncio.run(DpiGuard(s)._read_facts_and_decide(req, need))
        took = time.monotonic() - t0
        assert verdict is not None and not verdict.allowed
        assert (verdict.status, verdict.reason) == (503, "internal_error")
        assert verdict.audit is not None and s.audit.errors == errors  # the refusal is traced
        assert took <= bound + 0.5, took
        assert s.pipeline.cache.get(facts_key(USER, "PL1"), time.time()) is None
    finally:
        if listener is not None:
            listener.close()


def test_the_async_client_has_the_sync_clients_topology_credentials_and_timeouts(tmp_path):
    """Same server, database, user, password, TLS files and timeouts as the sync client, per topology."""
    import redis.asyncio
    import redis.asyncio.cluster

    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a connection is made")

    def spec(url):
        return replace(RedisSpec.from_url(url), username="dpiguard", password="s3cret", tls=True,
                       tls_ca_file=str(ca))

    def conn_kwargs(pool):
        kw = pool.connection_kwargs
        return {k: kw.get(k) for k in ("host", "port", "db", "username", "password", "socket_timeout",
                                       "socket_connect_timeout", "ssl_ca_certs", "ssl_cert_reqs")}

    standalone = spec("rediss://127.0.0.1:6390/3")
    sync, asyn = standalone.client(0.3), standalone.async_client(0.3)
    assert type(asyn) is redis.asyncio.Redis
    assert conn_kwargs(asyn.connection_pool) == conn_kwargs(sync.connection_pool)
    assert conn_kwargs(asyn.connection_pool)["db"] == 3 and conn_kwargs(asyn.connection_pool)["password"] == "s3cret"
    assert "SSL" in asyn.connection_pool.connection_class.__name__

    sentinel = replace(spec("redis+sentinel://127.0.0.1:26390,127.0.0.1:26391/dpiguard?db=2"),
                       sentinel_password="sentinel-pw")
    sync, asyn = sentinel.client(0.3), sentinel.async_client(0.3)
    assert type(asyn) is redis.asyncio.Redis
    assert asyn.connection_pool.service_name == "dpiguard"
    assert conn_kwargs(asyn.connection_pool) == conn_kwargs(sync.connection_pool)
    assert "SSL" in asyn.connection_pool.connection_class.__name__
    sentinels = asyn.connection_pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26390, 26391]
    assert all(s.connection_pool.connection_kwargs["password"] == "sentinel-pw" for s in sentinels)

    cluster = spec("redis+cluster://127.0.0.1:7390,127.0.0.1:7391")
    asyn = cluster.async_client(0.3)
    assert type(asyn) is redis.asyncio.cluster.RedisCluster
    kw = asyn.connection_kwargs
    assert (kw["username"], kw["password"], kw["socket_timeout"]) == ("dpiguard", "s3cret", 0.3)
    assert "SSL" in kw["connection_class"].__name__
    assert [(n.host, n.port) for n in asyn.nodes_manager.startup_nodes.values()] == [("127.0.0.1", 7390), ("127.0.0.1", 7391)]
