"""One place that turns the ``redis`` configuration section into Redis clients.

Every dpiguard component gets its Redis client here (services.py, the CLI, the invalidation bus), so
standalone, Sentinel and Cluster deployments, TLS and ACL users work the same everywhere.

URL forms (``redis.url``):

- ``redis://[user@]host:port/db`` and ``rediss://...`` (TLS), ``unix:///path/to/socket?db=0``
- ``redis+sentinel://h1:26379,h2:26379,h3:26379/SERVICE[/db]`` (``rediss+sentinel://`` for TLS):
  the master of SERVICE is found through the sentinels and found again after a failover
- ``redis+cluster://h1:6379,h2:6379,h3:6379`` (``rediss+cluster://`` for TLS): Redis Cluster; the
  listed nodes are only the first contact, the client learns the slot map

Credentials: ``redis.username`` (ACL user); the password comes from the environment variable
``DPIGUARD_REDIS_PASSWORD`` or from the file ``redis.password_file`` (first line), never from the
configuration file itself. A password inside the URL is accepted (e.g. from ``DPIGUARD_REDIS__URL``)
but discouraged: URLs end up in logs and process listings. Sentinels may have their own password
(``redis.sentinel_password_file``). TLS: ``redis.tls_ca_file`` (private CA), ``redis.tls_cert_file``
and ``redis.tls_key_file`` (client certificate when the server asks for one).

The pub/sub side of the invalidation bus needs one plain connection to one node that sees every
PUBLISH: :meth:`RedisSpec.pubsub_endpoints` gives it (standalone: the server; Sentinel: the current
master, re-checked by :meth:`RedisSpec.current_master`; Cluster: any node, since classic PUBLISH is
broadcast to every node of a cluster).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

PASSWORD_ENV = "DPIGUARD_REDIS_PASSWORD"
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")


class RedisURLError(ValueError):
    """The Redis URL or a Redis option is invalid."""


@dataclass(frozen=True)
class RedisSpec:
    mode: str  # "standalone" | "sentinel" | "cluster"
    nodes: tuple[tuple[str, int], ...] = ()
    unix_path: str | None = None
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    # ------------------------------------------------------------------ parsing

    @classmethod
    def from_url(cls, url: str) -> "RedisSpec":
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise RedisURLError(f"not a URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise RedisURLError(f"scheme must be one of {', '.join(s + '://' for s in SCHEMES)}, got {url!r}")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if scheme == "unix":
            if not parts.path:
                raise RedisURLError("unix:// URL needs a socket path")
            db = _int(parse_qs(parts.query).get("db", ["0"])[0], "db")
            return cls("standalone", (), unix_path=parts.path, db=db, username=username, password=password)
        tls = scheme.startswith("rediss")
        mode = "sentinel" if scheme.endswith("+sentinel") else "cluster" if scheme.endswith("+cluster") else "standalone"
        hostlist = parts.netloc.rpartition("@")[2]
        default_port = 26379 if mode == "sentinel" else 6379
        nodes = tuple(_host_port(h, default_port) for h in hostlist.split(",") if h.strip())
        if not nodes:
            raise RedisURLError(f"no host in {url!r}")
        path = [p for p in parts.path.split("/") if p]
        service = None
        db = 0
        if mode == "sentinel":
            if not path:
                raise RedisURLError("redis+sentinel:// URL needs the service (master) name: "
                                    "redis+sentinel://h1:26379,h2:26379/SERVICE")
            service = path[0]
            if len(path) > 1:
                db = _int(path[1], "db")
        elif mode == "cluster":
            if path and path != ["0"]:
                raise RedisURLError("Redis Cluster has only database 0")
        else:
            if len(nodes) > 1:
                raise RedisURLError("a redis:// URL names one server; use redis+sentinel:// or redis+cluster://")
            if path:
                db = _int(path[0], "db")
        return cls(mode, nodes, service=service, db=db, username=username, password=password, tls=tls)

    @classmethod
    def from_config(cls, section: Any, base_dir: Path | None = None, env: dict | None = None) -> "RedisSpec":
        """Build from a :class:`dpiguard.config.RedisSection` (paths relative to ``base_dir``)."""
        env = os.environ if env is None else env
        spec = cls.from_url(section.url)

        def path(value):
            if not value:
                return None
            p = Path(value).expanduser()
            return str(p if p.is_absolute() or base_dir is None else base_dir / p)

        password = spec.password or env.get(PASSWORD_ENV) or _read_secret(path(section.password_file))
        ca, cert, key = path(section.tls_ca_file), path(section.tls_cert_file), path(section.tls_key_file)
        return replace(
            spec,
            username=section.username or spec.username,
            password=password or None,
            sentinel_password=_read_secret(path(section.sentinel_password_file)),
            tls=spec.tls or bool(ca or cert),
            tls_ca_file=ca, tls_cert_file=cert, tls_key_file=key,
        )

    # ------------------------------------------------------------------ clients

    def _conn_kwargs(self, socket_timeout: float) -> dict:
        kw: dict = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
        if self.username:
            kw["username"] = self.username
        if self.password:
            kw["password"] = self.password
        if self.tls:
            kw["ssl"] = True
            kw["ssl_cert_reqs"] = "required"
            if self.tls_ca_file:
                kw["ssl_ca_certs"] = self.tls_ca_file
            if self.tls_cert_file:
                kw["ssl_certfile"] = self.tls_cert_file
                kw["ssl_keyfile"] = self.tls_key_file
        return kw

    def _sentinel_kwargs(self, socket_timeout: float) -> dict:
        """How to reach the sentinels themselves: their own password, the data nodes' TLS."""
        skw: dict = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
        if self.sentinel_password:
            skw["password"] = self.sentinel_password
        if self.tls:
            tls = {k: v for k, v in self._conn_kwargs(socket_timeout).items() if k.startswith("ssl")}
            skw.update(tls)
        return skw

    def sentinel(self, socket_timeout: float):
        """A redis.sentinel.Sentinel for this spec (sentinel mode)."""
        from redis.sentinel import Sentinel

        return Sentinel(list(self.nodes), sentinel_kwargs=self._sentinel_kwargs(socket_timeout),
                        **self._conn_kwargs(socket_timeout))

    def _client_kwargs(self, socket_timeout: float, retry: Any, extra: dict) -> dict:
        """Keyword arguments of a command client of this topology (sync or asyncio: the same names)."""
        kw = self._conn_kwargs(socket_timeout)
        kw["retry"] = retry
        kw.update(extra)
        if self.mode == "sentinel":
            kw.pop("socket_timeout"), kw.pop("socket_connect_timeout")
            for k in [k for k in kw if k.startswith("ssl") or k in ("username", "password")]:
                kw.pop(k)  # given to the Sentinel as connection defaults
            kw.update(db=self.db, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        elif self.mode != "cluster":
            if self.unix_path:
                for k in [k for k in kw if k.startswith("ssl")]:
                    kw.pop(k)
                kw["unix_socket_path"] = self.unix_path
            else:
                (kw["host"], kw["port"]), = self.nodes
            kw["db"] = self.db
        return kw

    def client(self, socket_timeout: float = 0.5, **extra) -> Any:
        """A command client for the whole topology (``redis.Redis`` or ``redis.cluster.RedisCluster``).

        Retries are bounded and flat (:class:`FlatRetry`: 3, backoff 20 ms .. 250 ms): enough to ride
        over a dropped connection or a cluster redirection, short enough that a request during an
        outage gets its 503 within :func:`wait_bound` seconds instead of hanging."""
        kw = self._client_kwargs(socket_timeout, default_retry(), extra)
        if self.mode == "cluster":
            from redis.cluster import ClusterNode, RedisCluster

            return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.nodes], **kw)
        if self.mode == "sentinel":
            return self.sentinel(socket_timeout).master_for(self.service, **kw)
        return redis.Redis(**kw)

    def async_client(self, socket_timeout: float = 0.5) -> Any:
        """A ``redis.asyncio`` client of the same topology (``Redis``, a Sentinel's master, or
        ``RedisCluster``), for reads the proxy's event loop makes itself (:mod:`dpiguard.edge.prefetch`), with
        the same credentials, TLS and timeouts as :meth:`client`. It binds to the event loop that first uses
        it. Retries: the same count and backoff as :func:`default_retry`; its callers still bound the whole
        wait by :meth:`wait_bound` (asyncio has no :class:`FlatRetry`)."""
        import redis.asyncio
        from redis.asyncio.retry import Retry as AsyncRetry
        from redis.backoff import ExponentialWithJitterBackoff

        retry = AsyncRetry(ExponentialWithJitterBackoff(base=BACKOFF_BASE, cap=BACKOFF_CAP), RETRIES)
        kw = self._client_kwargs(socket_timeout, retry, {})
        if self.mode == "cluster":
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.nodes], **kw)
        if self.mode == "sentinel":
            from redis.asyncio.sentinel import Sentinel

            sentinel = Sentinel(list(self.nodes), sentinel_kwargs=self._sentinel_kwargs(socket_timeout),
                                **self._conn_kwargs(socket_timeout))
            return sentinel.master_for(self.service, **kw)
        return redis.asyncio.Redis(**kw)

    def current_master(self, socket_timeout: float = 1.0) -> tuple[str, int] | None:
        """Sentinel only: the master address the sentinels give now (None if none answers)."""
        if self.mode != "sentinel":
            return None
        from redis.sentinel import MasterNotFoundError

        sentinel = self.sentinel(socket_timeout)
        try:
            host, port = sentinel.discover_master(self.service)
            return host, int(port)
        except (MasterNotFoundError, redis.RedisError):
            return None
        finally:
            for s in sentinel.sentinels:
                s.close()

    def node_client(self, address: tuple[str, int] | None, socket_timeout: float,
                    subscriber: bool = False) -> redis.Redis:
        """A plain client to one node (``address`` None: the unix socket). With ``subscriber``:
        keepalive and no retry, since the bus must see every lost connection and resync."""
        kw = self._conn_kwargs(socket_timeout)
        if subscriber:
            kw.update(socket_keepalive=True, retry=Retry(NoBackoff(), 0))
        if address is None:
            for k in [k for k in kw if k.startswith("ssl")]:
                kw.pop(k)
            return redis.Redis(unix_socket_path=self.unix_path, db=self.db, **kw)
        return redis.Redis(host=address[0], port=address[1], db=self.db, **kw)

    def pubsub_endpoints(self, socket_timeout: float) -> list[tuple[redis.Redis, tuple[str, int] | None]]:
        """Standalone and Cluster: subscriber clients to try in turn, with their node address.
        (Sentinel: the bus asks :meth:`sentinel` for the master and uses :meth:`node_client`.)"""
        if self.unix_path:
            return [(self.node_client(None, socket_timeout, subscriber=True), None)]
        return [(self.node_client(a, socket_timeout, subscriber=True), a) for a in self.nodes]

    def wait_bound(self, socket_timeout: float) -> float:
        """:func:`wait_bound` for this topology."""
        return wait_bound(socket_timeout, len(self.nodes) if self.mode == "cluster" else 0)

    def describe(self) -> str:
        """Where this points, without credentials (for logs and ``config check``)."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.nodes) or self.unix_path or "?"
        extra = f" service {self.service}" if self.service else ""
        return f"{self.mode} {hosts}{extra}{' TLS' if self.tls else ''}{' user ' + self.username if self.username else ''}"


RETRIES = 3  # attempts after the first, for one Redis operation
BACKOFF_BASE, BACKOFF_CAP = 0.02, 0.25  # seconds between two attempts (exponential with jitter)

_nesting = threading.local()


class FlatRetry(Retry):
    """A Retry whose nested uses make one attempt only.

    redis-py retries with the connection's Retry object at several levels at once: a command's
    attempts, and inside each, the connect + handshake of a new connection and its health-check
    PING. Nested, 4 attempts became 4 x 4 socket timeouts (8.5 s against a frozen server). Here only
    the outermost call on a thread retries; what runs inside one of its attempts fails that attempt
    at its first timeout. So one Redis operation waits at most :func:`wait_bound` seconds."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        if getattr(_nesting, "active", False):
            try:
                return do()
            except self._supported_errors as error:
                if with_failure_count:
                    fail(error, 1)
                else:
                    fail(error)
                raise
        _nesting.active = True
        try:
            return super().call_with_retry(do, fail, is_retryable, with_failure_count)
        finally:
            _nesting.active = False


def default_retry() -> Retry:
    from redis.backoff import ExponentialWithJitterBackoff

    return FlatRetry(ExponentialWithJitterBackoff(base=BACKOFF_BASE, cap=BACKOFF_CAP), RETRIES)


def wait_bound(socket_timeout: float, cluster_nodes: int = 0) -> float:
    """The longest a dpiguard Redis operation waits for a server that does not answer (frozen,
    unreachable, partitioned) before it raises: ``(1 + RETRIES)`` attempts, each ended by the first
    socket timeout (connect, handshake or reply: ``redis.socket_timeout`` is used for all three),
    and the backoff between them. With the default 0.5 s: 4 x 0.5 + 3 x 0.25 = 2.75 s. On a Redis
    Cluster (``cluster_nodes``: the nodes listed in ``redis.url``) a failed operation also asks the
    listed nodes for the slot map, each within one socket timeout: + 3 x 0.5 = 4.25 s for three.
    This is the figure of docs/operations.md; a request that needs Redis is refused within it."""
    return (1 + RETRIES) * socket_timeout + RETRIES * BACKOFF_CAP + cluster_nodes * socket_timeout


def _int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise RedisURLError(f"{what} must be a number, got {text!r}") from None
    if value < 0:
        raise RedisURLError(f"{what} must be 0 or more")
    return value


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [ipv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", str(default_port))
    if not host:
        raise RedisURLError(f"missing host in {text!r}")
    p = _int(port, "port")
    if not 0 < p < 65536:
        raise RedisURLError(f"port out of range in {text!r}")
    return host, p


def _read_secret(path: str | None) -> str | None:
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RedisURLError(f"cannot read secret file {path}: {exc}") from None
    value = text.splitlines()[0].strip() if text.strip() else ""
    if not value:
        raise RedisURLError(f"secret file {path} is empty")
    return value


def from_url(url: str, socket_timeout: float = 2.0, **extra) -> Any:
    """A client for a dpiguard Redis URL (any topology); for tools and tests."""
    return RedisSpec.from_url(url).client(socket_timeout, **extra)


def spec_of(cfg) -> RedisSpec:
    """The RedisSpec of a :class:`dpiguard.config.Config`."""
    return RedisSpec.from_config(cfg.redis, cfg.base_dir)


def client_for(cfg, **extra) -> Any:
    """The command client of a :class:`dpiguard.config.Config`."""
    return spec_of(cfg).client(cfg.redis.socket_timeout, **extra)


def as_text(value: bytes | str | None) -> str | None:
    """Redis replies are bytes unless the client decodes them; accept both."""
    if isinstance(value, bytes):
        return value.decode()
    return value
