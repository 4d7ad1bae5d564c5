"""End-to-end test stack: a real Redis-protocol server, the real demo DPI, real dpiguard proxies.

Each proxy is a separate process running ``dpiguard run --config FILE`` (mitmproxy in reverse mode
with the addon), talking to the demo upstream and Redis over loopback sockets.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pyotp

from dpiguard.config import load_config
from dpiguard.decision.assertion import AssertionVerifier
from dpiguard.demo.app import create_app, start_in_thread
from dpiguard.demo.data import build_dataset
from dpiguard.demo.runner import DEMO_PASSWORD, seed, write_demo_config
from tests.redis_server import free_port
from tests.redis_topology import from_env as redis_topology_from_env

ROOT = Path(__file__).resolve().parents[1]


class RecordingMiddleware:
    """Wraps the demo DPI and records what reached it (path, query, headers) and, for the oracle of
    tests/test_enforce_property.py, the request body and the answer (status, body)."""

    def __init__(self, app):
        self.app = app
        self.seen: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        record = {"method": environ["REQUEST_METHOD"], "path": environ.get("PATH_INFO", ""),
                  "raw_uri": environ.get("RAW_URI") or environ.get("REQUEST_URI", ""),
                  "query": environ.get("QUERY_STRING", ""), "headers": headers, "body": body,
                  "status": None, "answer": b""}
        with self.lock:
            self.seen.append(record)

        def recording_start(status, response_headers, exc_info=None):
            record["status"] = int(status.split()[0])
            return start_response(status, response_headers, exc_info)

        chunks = list(self.app(environ, recording_start))
        record["answer"] = b"".join(chunks)
        return chunks

    def paths(self) -> list[str]:
        with self.lock:
            return [r["path"] for r in self.seen]

    def clear(self) -> None:
        with self.lock:
            self.seen.clear()


@dataclass
class Proxy:
    port: int
    proc: subprocess.Popen
    log_path: Path
    instance: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Stack:
    workdir: Path
    redis: object  # a dpiguard.redis_topology topology (DPIGUARD_TEST_REDIS): url, kill(), start()
    upstream_app: RecordingMiddleware
    upstream_server: object
    upstream_port: int
    config_path: Path
    accounts: dict
    proxies: list[Proxy] = field(default_factory=list)
    last_step: dict = field(default_factory=dict)
    clients: dict = field(default_factory=dict)

    @property
    def config(self):
        return load_config(self.config_path)

    @property
    def audit_path(self) -> Path:
        return self.workdir / "audit"

    def start_proxy(self, instance: str, env: dict | None = None, preexec_fn=None, port: int | None = None) -> Proxy:
        """``port``: the one to listen on (default: a free one), e.g. known beforehand by an IdP's redirect URI."""
        while port is None or port == self.config.adt.listen_port:  # a free port now may be the ADT port
            port = free_port()
        log_path = self.workdir / f"proxy-{instance}.log"
        full_env = dict(os.environ, DPIGUARD_INSTANCE_ID=instance, DPIGUARD_LISTEN__PORT=str(port),
                        DPIGUARD_RUNTIME_DIR=str(self.workdir / f"runtime-{instance}"), **(env or {}))
        log = open(log_path, "wb")
        proc = subprocess.Popen([sys.executable, "-m", "dpiguard.cli", "run", "--config", str(self.config_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT),
                                preexec_fn=preexec_fn)
        proxy = Proxy(port, proc, log_path, instance)
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"proxy {instance} exited:\n{proxy.log()}")
            try:
                r = httpx.get(f"{proxy.url}/_dpiguard/health", timeout=1)
                if r.status_code == 200 and r.json().get("cache_coherent"):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                proxy.stop()
                raise RuntimeError(f"proxy {instance} not ready:\n{proxy.log()}")
            time.sleep(0.1)
        self.proxies.append(proxy)
        return proxy

    def totp(self, login: str) -> str:
        """A code the server will accept: a step newer than the last one used for this login."""
        totp = pyotp.TOTP(self.accounts[login].totp_secret)
        while True:
            now_step = int(time.time()) // 30
            for step in (now_step, now_step + 1):
                if step > self.last_step.get(login, -1):
                    self.last_step[login] = step
                    return totp.at(step * 30)
            time.sleep(1)

    def client(self, proxy: Proxy, login: str) -> httpx.Client:
        """A logged-in client, reused across tests (a fresh login needs a fresh TOTP step)."""
        key = (proxy.port, login)
        if key not in self.clients:
            self.clients[key] = self.login(proxy, login)
        return self.clients[key]

    def login(self, proxy: Proxy, login: str, **client_kw) -> httpx.Client:
        client = httpx.Client(base_url=proxy.url, timeout=10, **client_kw)
        r = client.post("/_dpiguard/api/login",
                        json={"username": login, "password": DEMO_PASSWORD, "totp": self.totp(login)})
        assert r.status_code == 200, r.text
        return client

    def close(self) -> None:
        for p in self.proxies:
            p.stop()
        self.upstream_server.shutdown()
        self.redis.close()


def build_stack(workdir: Path, config_extra: dict | None = None, redis_topology=None) -> Stack:
    """``redis_topology``: a not-yet-started topology (default: the one DPIGUARD_TEST_REDIS names)."""
    redis_server = (redis_topology or redis_topology_from_env(workdir / "redis")).start()
    dataset = build_dataset(2026)
    upstream_port = free_port()
    config_path = write_demo_config(workdir, host="127.0.0.1", port=free_port(), upstream_port=upstream_port,
                                    redis_url=redis_server.url, extra=config_extra)
    cfg = load_config(config_path)
    verifier = AssertionVerifier.from_pem_file(workdir / "secrets" / "assertion-ed25519.pub.pem", cfg.audience)
    app = RecordingMiddleware(create_app(dataset, verifier))
    server, port = start_in_thread(app, "127.0.0.1", upstream_port)
    accounts = {a.login: a for a in seed(cfg, dataset)}
    return Stack(workdir, redis_server, app, server, port, config_path, accounts)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
