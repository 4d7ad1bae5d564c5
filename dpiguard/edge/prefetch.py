"""Care-team facts read by the event loop itself, so that a cold decision needs no worker thread.

A decision the in-process caches cannot take raises :class:`~dpiguard.decision.verdict.NeedIO`. Most of the
time what is missing is the care-team facts of one user and patient (``NeedIO.facts``): one pipelined
Redis read (:meth:`dpiguard.decision.access.AccessDecider.facts_commands`). Handing that read to a worker
thread costs two thread wake-ups and two GIL hand-overs on the event loop's core, about half of a cold
decision's CPU in the proxy (benchmarks/results). :class:`FactsReader` makes the same read with an
asynchronous client on the loop, keeps the facts with the same generation check as a worker would
(:meth:`~dpiguard.decision.pipeline.Pipeline.store_facts`), and the decision is then taken in-process.

Every topology: the client (:meth:`dpiguard.storage.clients.RedisSpec.async_client`) is a ``redis.asyncio``
client to the standalone server, to the master the sentinels name (asked again after a failover), or to
the Redis Cluster (the read's commands go to the nodes of their slots, one round trip per node involved,
as the sync client's pipeline does). Whatever else a decision needs from Redis (a session, the pages of a
FHIR search) still goes to the worker threads.

Failures fail closed: a read that fails or does not finish within the Redis wait bound
(:func:`dpiguard.storage.clients.wait_bound`, the same as a worker's) makes the request a refusal
(``internal_error``), exactly as the worker's read would.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis

from dpiguard.decision.access import facts_from_replies


class FactsReader:
    """Reads care-team facts for the pipeline on the running event loop (see the module docstring).

    ``client``: a ``redis.asyncio`` client (:meth:`dpiguard.storage.clients.RedisSpec.async_client`); it binds
    to the loop that first uses it, mitmproxy's. ``bound``: seconds one read may take. ``concurrency``: reads
    under way at once (``threads.decisions``, so no more Redis connections than the workers would open);
    the others wait their turn, as queued worker jobs do."""

    def __init__(self, client: Any, bound: float, concurrency: int = 16):
        self.client = client
        self.bound = bound
        self.concurrency = concurrency
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the client's connections belong to
        self._slots: asyncio.Semaphore | None = None  # reads under way at once, as many as decision workers

    async def read(self, pipeline: Any, user: str, patient: str) -> bool:
        """Read and keep the facts of ``user`` and ``patient``; False when they could not be kept (an
        invalidation came meanwhile, or the cache is off): the caller decides through a worker then.
        Raises ``redis.RedisError`` when the read failed or took longer than the bound."""
        cache = pipeline.cache
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop, self._slots = loop, asyncio.Semaphore(self.concurrency)
        if not cache.enabled or loop is not self._loop:  # another loop (an in-process test): the workers read
            return False
        async with self._slots:  # a burst queues here, as it would for the workers; the bound starts with the read
            generation = cache.generation()  # before the read: an invalidation after it rejects the facts
            now = time.time()
            commands = pipeline.access.facts_commands(user, patient, pipeline.policies)
            try:
                async with asyncio.timeout(self.bound):
                    pipe = self.client.pipeline(transaction=False)
                    for command, args in commands:
                        getattr(pipe, command)(*args)
                    replies = await pipe.execute()
            except TimeoutError:
                raise redis.TimeoutError(f"care-team read not answered within {self.bound:g} s") from None
        return pipeline.store_facts(user, patient, facts_from_replies(user, patient, now, replies), generation)
