"""Deployment paths: TLS on both sides, `mitmdump -s`, configuration errors, user enrollment by CLI."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pyotp
import pytest
from werkzeug.serving import make_server

from dpiguard.config import load_config
from dpiguard.decision.assertion import AssertionVerifier
from dpiguard.demo.app import create_app
from dpiguard.demo.data import build_dataset
from dpiguard.demo.runner import DEMO_PASSWORD, seed, write_demo_config
from tests.redis_server import LocalRedis, free_port

from .certs import make_ca, make_leaf
from .stack import ROOT, RecordingMiddleware, port_open

pytestmark = pytest.mark.timeout(180)
BIN = Path(sys.executable).parent


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, verify=True) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/_dpiguard/health", verify=verify, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"proxy not ready:\n{log.read_text(errors='replace')}")


def _start(cmd: list[str], workdir: Path, name: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    log = workdir / f"{name}.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=str(ROOT),
                            env=dict(os.environ, DPIGUARD_RUNTIME_DIR=str(workdir / f"rt-{name}"), **(env or {})))
    return proc, log


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("tls")
    redis_server = LocalRedis().start()
    hospital_key, hospital_cert, hospital_ca = make_ca(work, "Hospital CA")
    upstream_key, upstream_cert, upstream_ca = make_ca(work, "DPI Vendor CA")
    proxy_cert, proxy_key = make_leaf(work, "proxy", hospital_key, hospital_cert)
    dpi_cert, dpi_key = make_leaf(work, "dpi", upstream_key, upstream_cert)
    upstream_port, proxy_port = free_port(), free_port()
    config_path = write_demo_config(work, host="127.0.0.1", port=proxy_port, upstream_port=upstream_port,
                                    redis_url=redis_server.url, extra={
                                        "upstream": {"url": f"https://127.0.0.1:{upstream_port}",
                                                     "ca_file": str(upstream_ca)},
                                        "tls": {"cert_file": str(proxy_cert), "key_file": str(proxy_key)},
                                    })
    cfg = load_config(config_path)
    verifier = AssertionVerifier.from_pem_file(work / "secrets" / "assertion-ed25519.pub.pem", cfg.audience)
    app = RecordingMiddleware(create_app(build_dataset(2026), verifier))
    server = make_server("127.0.0.1", upstream_port, app, threaded=True, ssl_context=(str(dpi_cert), str(dpi_key)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    accounts = {a.login: a for a in seed(cfg, build_dataset(2026))}
    proc, log = _start([sys.executable, "-m", "dpiguard.cli", "run", "--config", str(config_path)], work, "tls")
    url = f"https://127.0.0.1:{proxy_port}"
    try:
        _wait_ready(url, proc, log, verify=ssl.create_default_context(cafile=str(hospital_ca)))
        yield dict(work=work, url=url, port=proxy_port, ca=ssl.create_default_context(cafile=str(hospital_ca)),
                   ca_file=str(hospital_ca), upstream_ca=str(upstream_ca),
                   accounts=accounts, app=app, config_path=config_path, redis=redis_server)
    finally:
        _stop(proc)
        server.shutdown()
        redis_server.close()


def _code(accounts, login, offset=0):
    return pyotp.TOTP(accounts[login].totp_secret).at(time.time() + offset)


def test_tls_to_clients_with_hospital_certificate_and_verified_upstream(tls_stack):
    s = tls_stack
    c = httpx.Client(base_url=s["url"], verify=s["ca"], timeout=10)
    r = c.post("/_dpiguard/api/login", json={"username": "inf.durand", "password": DEMO_PASSWORD,
                                            "totp": _code(s["accounts"], "inf.durand")})
    assert r.status_code == 200, r.text
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("__Host-dpiguard_session=")
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    r = c.get("/api/patients/P0001/biology")
    assert r.status_code == 200, r.text  # reached the DPI over verified TLS
    assert s["app"].seen[-1]["headers"]["x-dpiguard-user"] == "inf.durand"
    assert c.get("/api/patients/P0002/biology").status_code == 403


def test_plain_http_refused_when_tls_is_configured(tls_stack):
    s = tls_stack
    r = httpx.post(f"http://127.0.0.1:{s['port']}/_dpiguard/api/login",
                   json={"username": "dr.martin", "password": DEMO_PASSWORD, "totp": "123456"})
    assert r.status_code == 400 and r.json()["error"] == "tls_required"  # no password over plain HTTP
    r = httpx.get(f"http://127.0.0.1:{s['port']}/api/patients/P0001")
    assert r.status_code == 400 and r.json()["error"] == "tls_required"


def test_upstream_with_untrusted_certificate_is_not_reached(tls_stack):
    s = tls_stack
    port = free_port()
    # Same configuration, but the proxy trusts the hospital CA, not the DPI vendor's: TLS must fail.
    proc, log = _start([sys.executable, "-m", "dpiguard.cli", "run", "--config", str(s["config_path"])],
                       s["work"], "badca", env={"DPIGUARD_UPSTREAM__CA_FILE": s["ca_file"],
                                                "DPIGUARD_LISTEN__PORT": str(port)})
    try:
        url = f"https://127.0.0.1:{port}"
        _wait_ready(url, proc, log, verify=s["ca"])
        c = httpx.Client(base_url=url, verify=s["ca"], timeout=10)
        r = c.post("/_dpiguard/api/login", json={"username": "dr.martin", "password": DEMO_PASSWORD,
                                                "totp": _code(s["accounts"], "dr.martin")})
        assert r.status_code == 200
        before = len(s["app"].seen)
        r = c.get("/api/patients/P0001")
        assert r.status_code == 502
        assert len(s["app"].seen) == before
    finally:
        _stop(proc)


def test_invalid_configuration_exits_before_listening(tmp_path):
    port = free_port()
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"listen: {{port: {port}}}\nupstream: {{url: 'http://127.0.0.1:1'}}\n"
                   "sessions: {idle_timeout: 'thirty minutes'}\n")
    r = subprocess.run([sys.executable, "-m", "dpiguard.cli", "run", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert r.returncode == 2
    assert "sessions.idle_timeout" in r.stderr
    assert not port_open(port)
    r = subprocess.run([sys.executable, "-m", "dpiguard.cli", "run", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                       env=dict(os.environ, DPIGUARD_SESSIONS__IDLE_TIMEOUT="600", DPIGUARD_LISTEN__PORT="99999"))
    assert r.returncode == 2 and "listen.port" in r.stderr


def test_mitmdump_script_with_config_option(tmp_path):
    redis_server = LocalRedis().start()
    try:
        upstream_port, port = free_port(), free_port()
        config_path = write_demo_config(tmp_path, host="127.0.0.1", port=port, upstream_port=upstream_port,
                                        redis_url=redis_server.url)
        cfg = load_config(config_path)
        dataset = build_dataset(2026)
        verifier = AssertionVerifier.from_pem_file(tmp_path / "secrets" / "assertion-ed25519.pub.pem", cfg.audience)
        server = make_server("127.0.0.1", upstream_port, create_app(dataset, verifier), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        accounts = {a.login: a for a in seed(cfg, dataset)}
        proc, log = _start([str(BIN / "mitmdump"), "--mode", f"reverse:http://127.0.0.1:{upstream_port}@127.0.0.1:{port}",
                            "-s", str(ROOT / "addons" / "dpiguard_addon.py"),
                            "--set", f"dpiguard_config={config_path}", "--set", "connection_strategy=lazy",
                            "--set", f"confdir={tmp_path / 'mitm'}"], tmp_path, "mitmdump")
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, proc, log)
            c = httpx.Client(base_url=url, timeout=10)
            r = c.post("/_dpiguard/api/login", json={"username": "acc.robert", "password": DEMO_PASSWORD,
                                                    "totp": _code(accounts, "acc.robert")})
            assert r.status_code == 200
            assert c.get("/api/patients/P0001").status_code == 200
            assert c.get("/api/patients/P0001/notes").json()["error"] == "category_not_permitted"
        finally:
            _stop(proc)
            server.shutdown()
    finally:
        redis_server.close()


def test_cli_user_enrollment_with_qr_and_disable(tmp_path):
    redis_server = LocalRedis().start()
    try:
        config_path = write_demo_config(tmp_path, host="127.0.0.1", port=free_port(), upstream_port=free_port(),
                                        redis_url=redis_server.url)
        env = dict(os.environ, DPIGUARD_CONFIG=str(config_path))

        def cli(*args, stdin=None):
            return subprocess.run([sys.executable, "-m", "dpiguard.cli", *args], input=stdin, capture_output=True,
                                  text=True, timeout=60, cwd=str(ROOT), env=env)

        png = tmp_path / "qr.png"
        r = cli("users", "add", "dr.new", "--role", "doctor", "--name", "Dr New", "--password-stdin",
                "--qr-png", str(png), stdin="Tres-Long-Mot2passe!\n")
        assert r.returncode == 0, r.stderr
        assert "otpauth://totp/" in r.stdout and "dr.new" in r.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        weak = cli("users", "add", "dr.weak", "--role", "doctor", "--password-stdin", stdin="short\n")
        assert weak.returncode == 1 and "password" in weak.stderr.lower()
        dup = cli("users", "add", "dr.new", "--role", "doctor", "--password-stdin", stdin="Tres-Long-Mot2passe!\n")
        assert dup.returncode == 1
        listing = cli("users", "list", "--json")
        assert '"login":"dr.new"' in listing.stdout and '"disabled":false' in listing.stdout
        assert cli("users", "disable", "dr.new").returncode == 0
        assert '"disabled":true' in cli("users", "list", "--json").stdout
        assert cli("users", "disable", "nobody").returncode == 1
        assert cli("careteam", "unit-add", "dr.new", "CARDIO").returncode == 0
        shown = cli("careteam", "show", "--user", "dr.new")
        assert shown.returncode == 0 and "CARDIO" in shown.stdout
        bad_date = cli("careteam", "stay-add", "P9", "CARDIO", "--start", "yesterday-ish")
        assert bad_date.returncode == 2 and "not a date" in bad_date.stderr
        from dpiguard.audit.chain import read_records

        actions = {r.get("action") for r in read_records(tmp_path / "audit")}
        assert {"user_add", "user_disable"} <= actions
    finally:
        redis_server.close()
