"""Start mitmproxy in reverse-proxy mode with the dpiguard addon, from a validated Config."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

from mitmproxy import master as mitmproxy_master
from mitmproxy import options
from mitmproxy.addons import block, core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig, update_alt_svc

from dpiguard.careteam.mllp import MllpServer, listener_settings
from dpiguard.config import Config
from dpiguard.edge.addon import DpiGuard


def mitmproxy_options(cfg: Config, runtime_dir: Path) -> dict:
    """The mitmproxy options that put it in front of the upstream the way dpiguard needs."""
    opts: dict = {
        "mode": [f"reverse:{cfg.upstream.url}@{cfg.listen.host}:{cfg.listen.port}"],
        # Connect upstream only once a request was allowed: refused requests never reach the DPI.
        "connection_strategy": "lazy",
        "ssl_insecure": False,  # upstream TLS is always verified
        "confdir": str(runtime_dir / "mitmproxy"),
        "termlog_verbosity": "warn",
    }
    if cfg.upstream.ca_file:
        opts["ssl_verify_upstream_trusted_ca"] = str(cfg.path(cfg.upstream.ca_file))
    if cfg.tls_enabled:
        opts["certs"] = [f"*={_combined_pem(cfg, runtime_dir)}"]
    return opts


def _combined_pem(cfg: Config, runtime_dir: Path) -> Path:
    """mitmproxy wants certificate chain and key in one PEM file; build it (mode 0600)."""
    cert = cfg.path(cfg.tls.cert_file).read_text()
    key = cfg.path(cfg.tls.key_file).read_text()
    if "PRIVATE KEY" not in key:
        raise ValueError(f"tls.key_file {cfg.path(cfg.tls.key_file)} holds no PEM private key")
    if "CERTIFICATE" not in cert:
        raise ValueError(f"tls.cert_file {cfg.path(cfg.tls.cert_file)} holds no PEM certificate")
    runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = runtime_dir / "client-facing.pem"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.strip() + "\n" + cert.strip() + "\n")
    return target


def proxy_addons() -> list:
    """The mitmproxy addons ``dpiguard run`` loads, in mitmproxy's own order: what a reverse proxy in front
    of the DPI needs, and nothing else.

    mitmproxy calls every loaded addon for every event of every request (a ``getattr`` per addon and hook,
    a dozen hooks per request): the ~35 default addons of ``mitmdump`` (``DumpMaster``) cost about 0.4 ms
    of CPU per request on the benchmark's machine even with their options off (benchmarks/results). Kept:

    ``core``          mitmproxy's options and their checks;
    ``block``         ``block_global`` (on by default): connections from public IP addresses are closed;
    ``disable_h2c``   no HTTP/2 over cleartext, a smuggling path: strips ``Upgrade: h2c``, kills prior knowledge;
    ``proxyserver``   the listening server and its connection options (``stream_large_bodies``...);
    ``next_layer``    the protocol layers of each connection (reverse mode, TLS, HTTP/1, HTTP/2);
    ``tlsconfig``     TLS towards clients (``tls.cert_file``) and verification of the DPI's certificate;
    ``update_alt_svc`` rewrites the DPI's ``Alt-Svc`` so that clients do not go around the proxy;
    ``errorcheck``    an error at startup (a port taken...) stops the process instead of serving half.

    Left out: everything for interactive use, replay, scripting, flow saving (a trace of patient data
    outside dpiguard's own), header or body rewriting, upstream-proxy and proxy authentication, DNS mode,
    and mitmproxy's onboarding app."""
    return [core.Core(), block.Block(), disable_h2c.DisableH2C(), proxyserver.Proxyserver(), next_layer.NextLayer(),
            tlsconfig.TlsConfig(), update_alt_svc.UpdateAltSvc(), errorcheck.ErrorCheck()]


class FreezeStartupHeap:
    """mitmproxy addon, loaded last: once the proxy runs, everything built at startup (modules, the policy
    tables, the services, mitmproxy's own) leaves the cycle collector's view (``gc.freeze()``).

    Python's collector regularly walks every object it tracks that is old enough; a proxy allocates a
    dozen objects per request, so under load a full walk of the startup heap fell on some requests
    and held the event loop for tens of milliseconds: the 99th percentile at 16 connections was about
    75 ms for dpiguard and 40 ms for mitmproxy alone, against about 30 ms once the startup heap is frozen
    (benchmarks/results), for the same CPU per request. Frozen objects are still freed when nothing
    refers to them any more (reference counting); only a cycle among them is never collected (a policy
    set replaced by a reload, if it held one: a few of them over a process's life)."""

    def running(self) -> None:
        gc.collect()  # what is garbage already is not frozen
        gc.freeze()


def proxy_master(opts: options.Options, addons: tuple = ()) -> mitmproxy_master.Master:
    """The mitmproxy master of ``dpiguard run`` (and of the benchmark's floor): mitmproxy's log to the
    terminal, :func:`proxy_addons`, the caller's ``addons`` (dpiguard's), and :class:`FreezeStartupHeap`
    last; the caller sets the options."""
    master = mitmproxy_master.Master(opts, with_termlog=True)
    master.addons.add(*proxy_addons(), *addons, FreezeStartupHeap())
    return master


class PortInUse(ValueError):
    """A port dpiguard must listen on is taken; ``str()`` is one line saying what to do."""


def ensure_port_free(host: str, port: int, hint: str) -> None:
    """PortInUse unless ``host:port`` can be bound now (checked before anything prints "listening")."""
    if not port:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers themselves do
        try:
            probe.bind(address)
        except OSError as exc:
            raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}") from None


def run_proxy(cfg: Config, services: Any, adt_processor: Any = None) -> int:
    """Serve until SIGINT/SIGTERM. ``services`` (dpiguard.services.Services) is built, and so every
    file validated, before anything listens; ``adt_processor``: the ADT feed to serve on the same loop
    (``adt.enabled``), or None. A port in use is PortInUse, before anything listens."""
    ensure_port_free(cfg.listen.host, cfg.listen.port,
                     "another program uses it (dpiguard already running?): stop it, or set listen.port "
                     "(DPIGUARD_LISTEN__PORT)")
    if adt_processor is not None:
        if cfg.adt.listen_port == cfg.listen.port:
            raise PortInUse(f"adt.listen_port and listen.port are both {cfg.listen.port}: give the ADT feed its own port")
        ensure_port_free(cfg.adt.listen_host, cfg.adt.listen_port,
                         "another program uses it: stop it, or set adt.listen_port (DPIGUARD_ADT__LISTEN_PORT)")
    runtime_dir = Path(os.environ.get("DPIGUARD_RUNTIME_DIR") or tempfile.mkdtemp(prefix="dpiguard-"))
    mitm_opts = mitmproxy_options(cfg, runtime_dir)

    async def main() -> int:
        opts = options.Options()
        master = proxy_master(opts, (DpiGuard(services),))
        opts.update(**mitm_opts)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, master.shutdown)
        adt_server = None
        if adt_processor is not None:  # the ADT feed listener shares the loop, the Redis client and the trace
            pools = getattr(services, "pools", None)
            adt_server = await MllpServer(adt_processor, listener_settings(cfg), pools and pools["adt"]).start()
            print(f"dpiguard: ADT feed (HL7 MLLP) on {cfg.adt.listen_host}:{adt_server.port}", flush=True)
        print(f"dpiguard: listening on {'https' if cfg.tls_enabled else 'http'}://{cfg.listen.host}:{cfg.listen.port}"
              f" → {cfg.upstream.url} (policy {services.policies.version})", flush=True)
        try:
            await master.run()
        finally:
            if adt_server is not None:
                await adt_server.stop()
        return 0

    logging.getLogger("dpiguard").setLevel(logging.INFO)
    return asyncio.run(main())
