"""Proxy processes of the benchmark, other than plain ``dpiguard run``.

``python -m benchmarks.proxy floor --config FILE``
    (b) mitmproxy alone: the same mitmproxy, started the same way as ``dpiguard run`` (same
    ``DumpMaster``, same options from :func:`dpiguard.runner.mitmproxy_options`: reverse mode, lazy
    upstream connections, same log level), but without the dpiguard addon. This is the floor of the
    architecture: what any mitmproxy addon costs at least.

``python -m benchmarks.proxy durable --config FILE``
    (c, durable trace) ``dpiguard run`` with every trace record forced to disk before the decision
    returns (``fdatasync`` after each append, on the event loop, failures refused like any audit
    failure). dpiguard's trace writer has no durable mode of its own yet; this measures what one
    synchronous flush per decision costs, the upper bound for any durable mode.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

from dpiguard.audit import AuditError, AuditLog
from dpiguard.config import load_config
from dpiguard.runner import mitmproxy_options, run_proxy


def run_floor(config_path: str) -> int:
    from mitmproxy import options
    from mitmproxy.tools.dump import DumpMaster

    cfg = load_config(config_path)
    runtime_dir = Path(os.environ.get("DPIGUARD_RUNTIME_DIR") or tempfile.mkdtemp(prefix="bench-floor-"))
    mitm_opts = mitmproxy_options(cfg, runtime_dir)

    async def main() -> int:
        opts = options.Options()
        master = DumpMaster(opts, with_termlog=True, with_dumper=False)
        opts.update(**mitm_opts)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, master.shutdown)
        print(f"floor: listening on {cfg.listen.host}:{cfg.listen.port} → {cfg.upstream.url}", flush=True)
        await master.run()
        return 0

    return asyncio.run(main())


def make_audit_durable() -> None:
    """Make every AuditLog append durable (fdatasync) before it returns."""
    plain_write = AuditLog.write

    def durable_write(self: AuditLog, record: dict) -> None:
        plain_write(self, record)
        with self._lock:
            if self._fd is None:
                raise AuditError("audit log is not open")
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                self.errors += 1
                raise AuditError(f"cannot flush audit log {self.path}: {exc}") from exc

    AuditLog.write = durable_write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy")
    parser.add_argument("kind", choices=("floor", "durable"))
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    if args.kind == "floor":
        return run_floor(args.config)
    make_audit_durable()
    return run_proxy(load_config(args.config))


if __name__ == "__main__":
    sys.exit(main())
