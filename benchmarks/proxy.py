"""Proxy processes of the benchmark, other than plain ``dpiguard run``.

``python -m benchmarks.proxy floor --config FILE``
    (b) mitmproxy alone: the same mitmproxy, started the same way as ``dpiguard run`` (same master and
    mitmproxy addons, :func:`dpiguard.edge.runner.proxy_master`; same options from
    :func:`dpiguard.edge.runner.mitmproxy_options`: reverse mode, lazy upstream connections, same log
    level), but without the dpiguard addon. This is the floor of the
    architecture: what any mitmproxy addon costs at least.

``python -m benchmarks.proxy stock --config FILE``
    (b′) stock mitmdump: ``mitmdump --mode reverse:UPSTREAM@HOST:PORT`` exactly as mitmproxy ships it, with all
    its default addons (the flow dumper printing a line per flow included, to the process's log) and its
    default options (eager upstream connections). The second floor of issue 14: what a hospital would run
    without dpiguard. Only the configuration directory is set, so nothing is written to ``~/.mitmproxy``.

``python -m benchmarks.proxy nofsync --config FILE``
    (c, trace not durable) ``dpiguard run`` with ``fsync``/``fdatasync`` turned into no-ops in the
    process, so trace records reach the page cache but are not forced to disk. dpiguard itself always
    makes a record durable (group commit) before answering; this benchmark-only variant exists to
    measure what that durability costs. Never run a proxy like this.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

from dpiguard.config import load_config
from dpiguard.edge.runner import mitmproxy_options, proxy_master, run_proxy
from dpiguard.services import build_services


def run_floor(config_path: str) -> int:
    from mitmproxy import options

    cfg = load_config(config_path)
    runtime_dir = Path(os.environ.get("DPIGUARD_RUNTIME_DIR") or tempfile.mkdtemp(prefix="bench-floor-"))
    mitm_opts = mitmproxy_options(cfg, runtime_dir)

    async def main() -> int:
        opts = options.Options()
        master = proxy_master(opts)
        opts.update(**mitm_opts)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, master.shutdown)
        print(f"floor: listening on {cfg.listen.host}:{cfg.listen.port} → {cfg.upstream.url}", flush=True)
        await master.run()
        return 0

    return asyncio.run(main())


def run_stock(config_path: str) -> int:
    from mitmproxy.tools.main import mitmdump

    cfg = load_config(config_path)
    runtime_dir = Path(os.environ.get("DPIGUARD_RUNTIME_DIR") or tempfile.mkdtemp(prefix="bench-stock-"))
    print(f"stock mitmdump: listening on {cfg.listen.host}:{cfg.listen.port} → {cfg.upstream.url}", flush=True)
    mitmdump(["--mode", f"reverse:{cfg.upstream.url}@{cfg.listen.host}:{cfg.listen.port}",
              "--set", f"confdir={runtime_dir / 'mitmproxy'}"])
    return 0


def disable_fsync() -> None:
    """Benchmark only: make fsync/fdatasync no-ops in this process (see the module docstring)."""
    os.fsync = lambda fd: None
    os.fdatasync = lambda fd: None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy")
    parser.add_argument("kind", choices=("floor", "stock", "nofsync"))
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    if args.kind == "floor":
        return run_floor(args.config)
    if args.kind == "stock":
        return run_stock(args.config)
    disable_fsync()
    cfg = load_config(args.config)
    return run_proxy(cfg, build_services(cfg))


if __name__ == "__main__":
    sys.exit(main())
