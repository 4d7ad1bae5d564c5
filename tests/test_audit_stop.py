"""A normal stop (SIGINT/SIGTERM) of every chain writer leaves a signed, verifiable chain that
``audit prune`` accepts: ``dpiguard adt listen``, ``dpiguard run``, and the ship/collect services.
Real processes, real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from dpiguard.audit.chain import list_chains, read_signed_json
from dpiguard.config import load_config
from dpiguard.demo.runner import write_demo_config
from tests.hl7msgs import adt, mllp_exchange, msa
from tests.redis_server import free_port

from .stack import build_stack

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)


def dpiguard(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpiguard.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, **kw)


def start(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dpiguard.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def assert_signed_and_prunable(config: Path, chain_dir: Path) -> None:
    head = read_signed_json(chain_dir / "head.json")
    assert head and head.get("sig") and head.get("key_id"), head
    verify = dpiguard("audit", "verify", "--config", str(config))
    assert verify.returncode == 0 and "audit trail OK" in verify.stdout, verify.stdout + verify.stderr
    assert "after the signed head" not in verify.stdout  # a normal stop leaves no unsigned tail
    prune = dpiguard("audit", "prune", "--before", "2100-01-01", "--config", str(config))
    assert prune.returncode == 0, prune.stdout + prune.stderr


@pytest.fixture
def adt_config(tmp_path, redis_url, r):
    config = write_demo_config(tmp_path, host="127.0.0.1", port=free_port(), upstream_port=free_port(),
                               redis_url=redis_url, extra={"adt": {"listen_port": free_port()}})
    assert dpiguard("keys", "init", "--config", str(config)).returncode == 0
    return config


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_adt_listen_stopped_by_a_signal_leaves_a_signed_chain(adt_config, sig):
    config = adt_config
    port = load_config(config).adt.listen_port
    proc = start("adt", "listen", "--config", str(config))
    try:
        line = ""
        while "listening" not in line:
            line = proc.stdout.readline()
            assert line, "adt listen ended before listening"
        assert msa(mllp_exchange(port, adt("A01", patient="P0042")))[1] == "AA"
    finally:
        proc.send_signal(sig)
        proc.wait(20)
    assert proc.returncode == 0
    chains = [c for c in list_chains(config.parent / "audit") if c.name.endswith("-adt")]
    assert len(chains) == 1
    assert_signed_and_prunable(config, chains[0])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("stop"))
    yield s
    s.close()


def test_dpiguard_run_stopped_by_sigterm_leaves_a_signed_chain(stack):
    proxy = stack.start_proxy("stopme")
    nurse = stack.login(proxy, "inf.durand")
    assert nurse.get("/api/patients/P0001/biology").status_code == 200
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.proc.wait(20)
    chain = stack.audit_path / "stopme"
    assert_signed_and_prunable(stack.config_path, chain)
    records = [orjson.loads(x) for x in b"".join(p.read_bytes() for p in sorted(chain.glob("*.jsonl"))).splitlines()]
    assert records[-1]["event"] == "checkpoint"  # closed with a signed checkpoint


def test_ship_and_collect_print_what_they_did_and_stop_cleanly(stack, tmp_path):
    central = tmp_path / "central"
    proxy = stack.start_proxy("px")
    nurse = stack.login(proxy, "inf.durand")
    nurse.get("/api/patients/P0001/biology")
    config = str(stack.config_path)
    ship = dpiguard("audit", "ship", "--config", config)
    assert ship.returncode == 0 and "record(s) shipped to Redis from" in ship.stdout, ship.stdout + ship.stderr
    shipped = int(ship.stdout.split("ship: ")[1].split()[0])
    assert shipped > 0
    collect = dpiguard("audit", "collect", "--store", str(central), "--config", config)
    assert collect.returncode == 0 and f"{shipped} record(s) collected into {central}" in collect.stdout, (
        collect.stdout + collect.stderr)
    again = dpiguard("audit", "ship", "--config", config)
    assert "0 record(s) shipped" in again.stdout or "record(s) shipped" in again.stdout
    # --follow services stop between two steps on SIGTERM and say what they did.
    follower = start("audit", "collect", "--store", str(central), "--follow", "--interval", "0.1", "--config", config)
    assert "following" in follower.stdout.readline()
    time.sleep(0.5)
    follower.send_signal(signal.SIGTERM)
    out, _ = follower.communicate(timeout=20)
    assert follower.returncode == 0 and "collected" in out and "(stopped)" in out, out
    verify = dpiguard("audit", "verify", "--dir", str(central), "--config", config)
    assert verify.returncode == 0, verify.stdout + verify.stderr
