"""A real OpenID Connect provider process for the tests: ``oidc-provider`` (npm) run by node on loopback.

``tests/oidc/server.js`` is installed by ``npm ci --prefix tests/oidc`` (``.ci/run``). Without node or the
package the tests that need it fail in CI (``CI`` set) and are skipped elsewhere (:func:`require`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from joserfc import jwk

from tests.redis_server import free_port

HERE = Path(__file__).resolve().parent / "oidc"


def require() -> str:
    """The node binary, or skip (fail in CI) when node or the npm package is missing."""
    node = shutil.which("node")
    missing = ("node is not installed" if node is None else
               "oidc-provider is not installed (npm ci --prefix tests/oidc)"
               if not (HERE / "node_modules" / "oidc-provider").is_dir() else "")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}: CI must install it (.ci/run)")
        pytest.skip(missing)
    return node


def new_key(kid: str) -> dict:
    return jwk.RSAKey.generate_key(2048, {"kid": kid, "use": "sig", "alg": "RS256"}, private=True).as_dict(private=True)


@dataclass
class OidcProvider:
    workdir: Path
    clients: list
    accounts: dict
    keys: list[dict] = field(default_factory=lambda: [new_key("key-1")])
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    id_token_ttl: int = 3600

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "oidc-provider.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> "OidcProvider":
        node = require()
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "oidc-provider.json"
        conf.write_text(json.dumps({"port": self.port, "issuer": self.issuer, "jwks": {"keys": self.keys},
                                    "clients": self.clients, "accounts": self.accounts,
                                    "id_token_ttl": self.id_token_ttl}))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([node, str(HERE / "server.js"), str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=str(HERE))
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"oidc-provider exited:\n{self.log()}")
            try:
                if httpx.get(self.issuer + "/.well-known/openid-configuration", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"oidc-provider not ready:\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self, keys: list[dict] | None = None) -> None:
        """Stop and start again on the same port (e.g. with a rotated key set: the first key signs)."""
        self.stop()
        if keys is not None:
            self.keys = keys
        self.start()

    def public_jwks(self) -> dict:
        return httpx.get(self.issuer + "/jwks", timeout=5).json()
