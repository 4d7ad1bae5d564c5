"""The mitmproxy master of ``dpiguard run``: the addons it keeps do their job, the ones it leaves out
are really gone (dpiguard/edge/runner.py, :func:`proxy_addons`).

The in-process checks read the master's options; the end-to-end one goes through a real ``dpiguard run``
process, a real Redis and the demo DPI, whose requests are recorded."""

from __future__ import annotations

import asyncio
import gc
import weakref

import httpx
import pytest
from mitmproxy import options

from dpiguard.edge.runner import FreezeStartupHeap, proxy_master

from .stack import build_stack

pytestmark = pytest.mark.timeout(180)

KEPT = ["core", "block", "disableh2c", "proxyserver", "nextlayer", "tlsconfig", "updatealtsvc",
        "errorcheck"]


def _master_options(addons: tuple = ()) -> tuple[list[str], options.Options]:
    async def build():
        opts = options.Options()
        master = proxy_master(opts, addons)
        return [type(a).__name__.lower() for a in master.addons.chain], opts
    return asyncio.run(build())


class Caller:
    """Stands for the addon the caller adds (dpiguard's)."""


def test_master_loads_only_what_a_reverse_proxy_needs():
    names, _ = _master_options()
    assert names == ["termlog"] + KEPT + ["freezestartupheap"], names
    names, _ = _master_options((Caller(),))
    assert names == ["termlog"] + KEPT + ["caller", "freezestartupheap"], names  # frozen after the caller's start


def test_startup_heap_leaves_the_cycle_collector():
    """Once running, what was built at startup is out of the collector's walks (gc.freeze), and garbage
    made before is collected first, not frozen.

    The frozen count itself is not compared across a collection: frozen objects that lose their last
    reference are still freed (reference counting), and other threads of the suite do so at any time.
    A cycle built before the freeze and dropped after it tells the collector's view apart instead."""
    gc.unfreeze()
    kept = [[i] for i in range(1000)]
    garbage = []
    garbage.append(garbage)  # a cycle: only the collector frees it
    probe = weakref.ref(Caller())  # gone at once (no cycle)
    cycle = Caller()
    cycle.me = cycle
    cycle_ref = weakref.ref(cycle)
    del garbage, cycle
    startup = Caller()
    startup.me = startup  # a cycle still referred to at startup, dropped once the proxy runs
    startup_ref = weakref.ref(startup)
    try:
        FreezeStartupHeap().running()
        assert gc.get_freeze_count() >= 1000, gc.get_freeze_count()
        assert cycle_ref() is None and probe() is None  # collected before the freeze
        del startup
        gc.collect()
        assert startup_ref() is not None  # frozen: the collector's walks no longer reach it
        assert all(gc.is_tracked(x) for x in kept[:3])
    finally:
        gc.unfreeze()
    gc.collect()
    assert startup_ref() is None  # back in the collector's view, the dropped cycle is freed


def test_options_of_left_out_addons_do_not_exist():
    """Flow saving, scripts, rewriting, replay, upstream/proxy authentication and the onboarding app cannot
    be switched on by an option: their addons are not loaded."""
    _, opts = _master_options()
    for name in ("save_stream_file", "hardump", "scripts", "modify_headers", "modify_body", "map_local",
                 "map_remote", "server_replay", "client_replay", "proxyauth", "upstream_auth", "onboarding",
                 "stickycookie", "anticache"):
        assert name not in opts, name
    # kept: their options are there, with mitmproxy's defaults
    assert opts.block_global is True
    assert opts.connection_strategy in ("eager", "lazy")
    assert opts.ssl_insecure is False
    assert opts.keep_alt_svc_header is False


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("master"))
    s.start_proxy("m")
    yield s
    s.close()


def test_h2c_upgrade_headers_never_reach_the_dpi(stack):
    proxy = stack.proxies[0]
    stack.upstream_app.clear()
    r = httpx.get(f"{proxy.url}/static/style.css",
                  headers={"Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings", "HTTP2-Settings": "AAMAAABkAAQAAP__"})
    assert r.status_code == 200
    seen = [x for x in stack.upstream_app.seen if x["path"] == "/static/style.css"]
    assert seen, "the public asset was forwarded"
    for record in seen:
        assert "upgrade" not in record["headers"] and "http2-settings" not in record["headers"], record["headers"]

