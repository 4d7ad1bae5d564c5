"""Central collection through Redis Streams: exact resume after crashes and Redis outages."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dpiguard.audit.chain import AuditLog, AuditSigner, AuditVerifier, list_chains, list_segments
from dpiguard.audit.ship import Collector, Shipper
from dpiguard.audit.verify import verify_store
from dpiguard.storage.keys import Keys
from tests.redis_server import LocalRedis

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def chain_lines(store: Path) -> dict[str, list[bytes]]:
    out = {}
    for chain in list_chains(store):
        lines = []
        for _, path in list_segments(chain):
            lines += path.read_bytes().splitlines()
        out[chain.name] = lines
    return out


def test_ship_and_collect_copy_chains_exactly_once(tmp_path, r):
    key = Ed25519PrivateKey.generate()
    local, central = tmp_path / "local", tmp_path / "central"
    for name in ("px1", "px2"):
        with AuditLog(local, name, signer=AuditSigner(key), rotate_bytes=3000, checkpoint_records=10) as log:
            for i in range(60):
                log.write({"event": "access", "user": f"u{i}", "patient": f"P{i:04d}"})
    shipper, collector = Shipper(r, local, batch=25), Collector(r, central, rotate_bytes=5000)
    assert shipper.ship_once() > 0
    assert shipper.ship_once() == 0  # nothing new: nothing re-sent
    while collector.collect_once(block_ms=50):
        pass
    assert chain_lines(central) == chain_lines(local)
    reports = verify_store(central, AuditVerifier(key.public_key()))
    assert [rep.ok for rep in reports] == [True, True], [rep.describe() for rep in reports]
    # Collected entries are trimmed from Redis; a collector restarted from its files adds nothing.
    assert r.xlen(Keys("dpiguard").audit_stream("px1")) == 1
    again = Collector(r, central)
    assert again.collect_once(block_ms=50) == 0
    # Redis lost everything (restart without data): shipping starts over, the collector keeps no duplicate.
    r.flushall()
    Shipper(r, local).ship_once()
    while again.collect_once(block_ms=50):
        pass
    assert chain_lines(central) == chain_lines(local)


def test_collector_never_writes_a_record_that_does_not_chain(tmp_path, r):
    local, central = tmp_path / "local", tmp_path / "central"
    with AuditLog(local, "px1") as log:
        for i in range(5):
            log.write({"event": "access", "i": i})
    Shipper(r, local).ship_once()
    entries = r.xrange(Keys("dpiguard").audit_stream("px1"))
    forged = entries[2][1][b"l"].replace(b'"i":2', b'"i":9')
    r.delete(Keys("dpiguard").audit_stream("px1"))
    for n, (entry_id, fields) in enumerate(entries):
        r.xadd(Keys("dpiguard").audit_stream("px1"), {"l": forged if n == 2 else fields[b"l"]}, id=entry_id)
    collector = Collector(r, central)
    collector.collect_once(block_ms=50)
    assert collector.chain("px1").seq == 2 and "does not continue" in collector.problems["px1"]


def _write_config(tmp_path: Path, redis_url: str, audit_dir: Path) -> Path:
    cfg = {"upstream": {"url": "http://127.0.0.1:9"}, "redis": {"url": redis_url, "socket_timeout": 0.5},
           "audit": {"path": str(audit_dir)}}
    path = tmp_path / "dpiguard.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dpiguard.cli", "audit", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_redis_outage_and_collector_crash_end_with_exactly_the_union(tmp_path):
    server = LocalRedis(persist_dir=tmp_path / "redis").start()
    key = Ed25519PrivateKey.generate()
    local, central = tmp_path / "local", tmp_path / "central"
    config = _write_config(tmp_path, server.url, local)
    logs = [AuditLog(local, name, signer=AuditSigner(key), rotate_bytes=20_000, checkpoint_records=50).open()
            for name in ("px1", "px2")]
    stop = threading.Event()

    def writer(log):
        i = 0
        while not stop.is_set():
            log.write({"event": "access", "user": f"u{i % 7}", "patient": f"P{i:05d}"})
            i += 1
            time.sleep(0.002)

    threads = [threading.Thread(target=writer, args=(log,)) for log in logs]
    procs = []
    try:
        for t in threads:
            t.start()
        ship = _cli("ship", "--config", str(config), "--follow", "--interval", "0.1")
        collect = _cli("collect", "--config", str(config), "--store", str(central), "--follow", "--interval", "0.1")
        procs += [ship, collect]
        time.sleep(1.5)
        server.kill()  # Redis goes away during collection (and may lose its last second of writes)
        time.sleep(3.0)
        server.start()
        time.sleep(1.0)
        collect.send_signal(signal.SIGKILL)  # and the collector crashes too
        collect.wait(10)
        collect = _cli("collect", "--config", str(config), "--store", str(central), "--follow", "--interval", "0.1")
        procs.append(collect)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for log in logs:
            log.close()
    try:
        expected = chain_lines(local)
        assert all(len(v) > 200 for v in expected.values())
        deadline = time.monotonic() + 30
        while chain_lines(central) != expected:
            assert time.monotonic() < deadline, {k: (len(v), len(chain_lines(central).get(k, [])))
                                                 for k, v in expected.items()}
            time.sleep(0.2)
        reports = verify_store(central, AuditVerifier(key.public_key()))
        assert all(rep.ok for rep in reports), [rep.describe() for rep in reports]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        server.close()
