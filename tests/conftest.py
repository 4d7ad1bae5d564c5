"""Shared fixtures: one real Redis topology per test session, on free loopback ports.

``DPIGUARD_TEST_REDIS`` picks the topology for the whole suite: ``standalone`` (default, one
server), ``sentinel`` (master + replica + three sentinels) or ``cluster`` (three-master Redis
Cluster). See tests/redis_topology.py and docs/operations.md.
"""

from __future__ import annotations

import functools
import os

import pytest

from dpiguard.storage import clients as redisconn
from tests.redis_topology import from_env

TOPOLOGY = (os.environ.get("DPIGUARD_TEST_REDIS") or "standalone").strip().lower()


def only_standalone(reason: str):
    """Skip a test that needs the single-server topology (e.g. a TCP relay in front of one port)."""
    return pytest.mark.skipif(TOPOLOGY != "standalone", reason=f"standalone Redis only: {reason}")


@pytest.fixture(scope="session")
def redis_server():
    server = from_env().start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def r(redis_server):
    """A client on a clean database (FLUSHALL before each test that uses it)."""
    redis_server.flushall()
    client = redisconn.from_url(redis_server.url)
    if TOPOLOGY == "cluster":  # tests list keys: look on every master, not on one node
        from redis.cluster import RedisCluster

        client.keys = functools.partial(client.keys, target_nodes=RedisCluster.PRIMARIES)
    yield client
    client.close()


@pytest.fixture
def services(tmp_path, redis_server, r):
    """The components built by the composition root, on a copy of policies/ (hot reload every 5 s, so
    tests call ``reloader.check()`` themselves): (policy folder, Services). Nothing listens."""
    import shutil
    from pathlib import Path

    from dpiguard.config import load_config
    from dpiguard.demo.runner import write_demo_config
    from dpiguard.services import build_services
    from tests.redis_server import free_port

    directory = tmp_path / "policies"
    shutil.copytree(Path(__file__).resolve().parents[1] / "policies", directory)
    config_path = write_demo_config(tmp_path, host="127.0.0.1", port=free_port(), upstream_port=free_port(),
                                    redis_url=redis_server.url, policies_dir=directory,
                                    extra={"policies": {"dir": str(directory), "reload_interval": 5}})
    s = build_services(load_config(config_path))
    yield directory, s
    s.stop()
