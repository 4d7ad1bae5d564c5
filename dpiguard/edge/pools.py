"""Bounded thread pools for the blocking work of the proxy, one per kind of work.

mitmproxy runs one event loop per process; anything that blocks (a Redis round trip, an argon2 hash, a
FHIR answer check, an ADT message) runs in a worker thread. With one shared executor (asyncio's
default, ``min(32, cpu + 4)`` threads), a burst of logins (argon2 takes ~50 ms of CPU each) or slow FHIR
answers could take every thread, and cache-miss decisions would wait behind them. Each kind of work
therefore has its own pool, sized by the ``threads`` section of the configuration:

=============  ===================================================================  ==============
pool           work                                                                 default threads
=============  ===================================================================  ==============
``decisions``  decisions that ask Redis (cache misses), session touches              16
``portal``     dpiguard's own pages: logins (argon2 + TOTP), logout, break-glass     4
``fhir``       FHIR write bodies and FHIR answers (checked whole before they leave)  8
``adt``        HL7 ADT messages of the MLLP listener, when it runs inside the proxy  2
=============  ===================================================================  ==============

A full pool queues its own work only; the others keep their threads. Every wait inside a job is
bounded (Redis: :func:`dpiguard.storage.clients.wait_bound`), so a queue drains.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")

POOLS = ("decisions", "portal", "fhir", "adt")


class Pools:
    """The four pools (see the module docstring). ``sizes``: pool name → threads."""

    def __init__(self, sizes: dict[str, int] | None = None):
        sizes = {"decisions": 16, "portal": 4, "fhir": 8, "adt": 2, **(sizes or {})}
        self.executors = {name: ThreadPoolExecutor(max_workers=int(sizes[name]), thread_name_prefix=f"dpiguard-{name}")
                          for name in POOLS}

    def __getitem__(self, name: str) -> ThreadPoolExecutor:
        return self.executors[name]

    async def run(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in pool ``name`` and await its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executors[name], functools.partial(fn, *args, **kwargs))

    def submit(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        """Fire and forget (errors are the job's own business)."""
        self.executors[name].submit(fn, *args)

    def shutdown(self) -> None:
        for executor in self.executors.values():
            executor.shutdown(wait=False, cancel_futures=True)


async def run_in(services: Any, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn`` in the pool ``name`` of ``services.pools`` (asyncio's default executor without pools)."""
    pools = getattr(services, "pools", None)
    if pools is None:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return await pools.run(name, fn, *args, **kwargs)
