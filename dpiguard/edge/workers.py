"""``dpiguard run --workers N``: N proxy processes on one host, one per core.

mitmproxy serves one event loop per process and cannot share a listening socket between processes
(no SO_REUSEPORT), so worker ``i`` listens on ``listen.port + i`` (ports ``base .. base+N-1``) and
a local load balancer (``deploy/haproxy.cfg``, or nginx) spreads clients over them from the one
public address. All shared state is in Redis (sessions, lockouts, TOTP steps, care team), and the
invalidation bus keeps every worker's in-process caches exact, exactly as for instances on
different hosts; every worker appends to the same trace file (one ``write(2)`` per record under
``O_APPEND``, so lines never interleave).

The supervisor (this module) starts the workers with ``DPIGUARD_LISTEN__PORT`` and
``DPIGUARD_INSTANCE_ID`` set (``ID-wI``), restarts a worker that dies (after 1 s, then with a growing
delay up to 30 s if it keeps dying), and stops them all on SIGTERM/SIGINT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dpiguard.config import Config


@dataclass
class Worker:
    index: int
    port: int
    instance: str
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0


def worker_env(cfg: Config, index: int, base_env: dict | None = None) -> dict:
    env = dict(os.environ if base_env is None else base_env)
    env["DPIGUARD_INSTANCE_ID"] = f"{cfg.instance_id}-w{index}"
    env["DPIGUARD_LISTEN__PORT"] = str(cfg.listen.port + index)
    runtime = env.get("DPIGUARD_RUNTIME_DIR")
    if runtime:
        env["DPIGUARD_RUNTIME_DIR"] = str(Path(runtime) / f"w{index}")
    return env


def run_workers(cfg: Config, config_path: str, workers: int) -> int:
    """Supervise ``workers`` proxy processes until SIGTERM/SIGINT. Returns the exit code."""
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    if cfg.listen.port + workers - 1 > 65535:
        raise ValueError(f"ports {cfg.listen.port}..{cfg.listen.port + workers - 1} exceed 65535")
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    pool = [Worker(i, cfg.listen.port + i, "") for i in range(workers)]
    for w in pool:
        w.instance = worker_env(cfg, w.index)["DPIGUARD_INSTANCE_ID"]
    print(f"dpiguard: {workers} workers on {cfg.listen.host}:{cfg.listen.port}..{cfg.listen.port + workers - 1}"
          " (put a load balancer in front, see deploy/haproxy.cfg)", flush=True)

    def start(w: Worker) -> None:
        w.proc = subprocess.Popen([sys.executable, "-m", "dpiguard.cli", "run", "--config", str(config_path)],
                                  env=worker_env(cfg, w.index))

    for w in pool:
        start(w)
    try:
        while not stopping:
            now = time.monotonic()
            for w in pool:
                if w.proc is not None and w.proc.poll() is not None:
                    code = w.proc.returncode
                    if code == 2:  # configuration error: restarting cannot help
                        print(f"dpiguard: worker {w.index} stopped on a configuration error", file=sys.stderr)
                        return 2
                    w.restarts += 1
                    delay = min(30.0, float(2 ** min(w.restarts - 1, 5)))
                    print(f"dpiguard: worker {w.index} (port {w.port}) exited with {code}; "
                          f"restarting in {delay:.0f} s", file=sys.stderr, flush=True)
                    w.proc, w.next_start = None, now + delay
                if w.proc is None and now >= w.next_start:
                    start(w)
            time.sleep(0.2)
    finally:
        for w in pool:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.terminate()
        deadline = time.monotonic() + 10
        for w in pool:
            if w.proc is not None:
                try:
                    w.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait(5)
    return 0
