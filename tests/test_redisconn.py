"""Redis connection factory: URL forms, credentials, and real connections (ACL user, topologies)."""

from __future__ import annotations

import pytest
import redis

from dpiguard.config import ConfigError, RedisSection, load_config
from dpiguard.storage import clients as redisconn
from dpiguard.storage.clients import RedisSpec, RedisURLError
from tests.redis_server import LocalRedis


@pytest.mark.parametrize("url, mode, nodes, service, db, tls", [
    ("redis://127.0.0.1:6379/0", "standalone", (("127.0.0.1", 6379),), None, 0, False),
    ("rediss://redis.hop.local/3", "standalone", (("redis.hop.local", 6379),), None, 3, True),
    ("redis+sentinel://s1:26379,s2,s3:26380/dpi", "sentinel",
     (("s1", 26379), ("s2", 26379), ("s3", 26380)), "dpi", 0, False),
    ("rediss+sentinel://s1:26379/dpi/2", "sentinel", (("s1", 26379),), "dpi", 2, True),
    ("redis+cluster://n1:7000,n2:7001,[::1]:7002", "cluster", (("n1", 7000), ("n2", 7001), ("::1", 7002)), None, 0, False),
])
def test_url_forms(url, mode, nodes, service, db, tls):
    spec = RedisSpec.from_url(url)
    assert (spec.mode, spec.nodes, spec.service, spec.db, spec.tls) == (mode, nodes, service, db, tls)


@pytest.mark.parametrize("url, message", [
    ("http://redis:6379", "scheme"),
    ("redis+sentinel://s1:26379", "service"),
    ("redis+cluster://n1:7000/2", "database 0"),
    ("redis://a:1,b:2/0", "one server"),
    ("redis://h:99999/0", "port"),
    ("redis://h:6379/x", "db"),
])
def test_bad_urls_are_refused(url, message):
    with pytest.raises(RedisURLError, match=message):
        RedisSpec.from_url(url)


def test_config_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("upstream: {url: 'http://x'}\nredis: {url: 'redis+sentinel://s1:26379'}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, {}, check_files=False)
    assert exc.value.key == "redis.url"
    p.write_text("upstream: {url: 'http://x'}\nredis: {tls_cert_file: c.pem}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, {}, check_files=False)
    assert exc.value.key == "redis.tls_key_file"
    p.write_text("upstream: {url: 'http://x'}\nmetrics: {allow_from: ['10.0.0.0/8', 'nonsense']}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, {}, check_files=False)
    assert exc.value.key == "metrics.allow_from"


def test_password_sources(tmp_path):
    pw = tmp_path / "redis.password"
    pw.write_text("s3cret-from-file\n")
    section = RedisSection(url="redis://127.0.0.1:6379/0", username="dpiguard", password_file="redis.password")
    spec = RedisSpec.from_config(section, tmp_path, env={})
    assert spec.username == "dpiguard" and spec.password == "s3cret-from-file"
    assert "s3cret" not in repr(spec) and "s3cret" not in spec.describe()
    spec = RedisSpec.from_config(section, tmp_path, env={"DPIGUARD_REDIS_PASSWORD": "from-env"})
    assert spec.password == "from-env"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(RedisURLError, match="empty"):
        RedisSpec.from_config(RedisSection(password_file="empty"), tmp_path, env={})
    spec = RedisSpec.from_config(RedisSection(tls_ca_file="ca.pem"), tmp_path, env={})
    assert spec.tls and spec.tls_ca_file == str(tmp_path / "ca.pem")


def test_acl_user_with_password_file(tmp_path):
    """A real server with an ACL user: the password file works, a wrong or missing password does not."""
    server = LocalRedis(extra_args=["--user", "default", "off", "--user", "dpiguard", "on", ">correct-horse",
                                    "~dpiguard:*", "&dpiguard:events", "+@all"])
    server.ping_kwargs = {"username": "dpiguard", "password": "correct-horse"}
    try:
        server.start()
        (tmp_path / "pw").write_text("correct-horse\n")
        ok = RedisSpec.from_config(RedisSection(url=server.url, username="dpiguard", password_file="pw"),
                                   tmp_path, env={}).client(2.0)
        assert ok.set("dpiguard:probe", "1") and ok.get("dpiguard:probe") == b"1"
        with pytest.raises(redis.ResponseError):
            ok.set("other:key", "1")  # outside the ACL key pattern
        ok.close()
        (tmp_path / "bad").write_text("wrong\n")
        bad = RedisSpec.from_config(RedisSection(url=server.url, username="dpiguard", password_file="bad"),
                                    tmp_path, env={}).client(2.0)
        with pytest.raises(redis.AuthenticationError):
            bad.ping()
        anonymous = redisconn.from_url(server.url)
        with pytest.raises(redis.RedisError):
            anonymous.ping()
    finally:
        server.close()


def test_client_for_the_suite_topology(redis_server, r):
    """The factory reaches the topology the suite runs on (DPIGUARD_TEST_REDIS) and round-trips keys
    of many slots."""
    client = redisconn.from_url(redis_server.url)
    for i in range(50):
        client.set(f"dpiguard:t:{{k{i}}}", i)
    assert [int(client.get(f"dpiguard:t:{{k{i}}}")) for i in range(50)] == list(range(50))
    client.close()
