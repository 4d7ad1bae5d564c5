"""Multi-key writes that work on every topology (standalone, Sentinel, Redis Cluster).

Redis Cluster runs a MULTI/EXEC transaction or a Lua script only when every key is in one slot, and
refuses PUBLISH inside a pipeline. dpiguard's writers therefore keep each *transaction* on the keys of
one hash tag (one user, one patient, one grant, one chain: see :mod:`dpiguard.storage.keys`) and write
the keys of other slots (indexes, queues) in *stages*, in an order that is safe if a write fails half
way: an index entry is added before the authoritative write and removed after it, so an index may keep
a stale entry (every reader checks the authoritative key) but never misses a live one.

- :func:`run_stages`: on a standalone server or a Sentinel master every stage goes into one MULTI/EXEC
  (all or nothing, as before); on a Cluster each stage is one non-transactional pipeline, executed
  only once the previous stage was acknowledged by every node (a cluster pipeline sends to its nodes
  in no particular order, so order *within* a stage is not guaranteed across slots).
- :func:`publish_each`: invalidations after the write committed, one PUBLISH per message.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

Stage = Callable[[Any], None]  # queues commands on a pipeline


def is_cluster(client: Any) -> bool:
    """True for a ``redis.cluster.RedisCluster`` client."""
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def run_stages(client: Any, stages: Sequence[Stage]) -> list[Any]:
    """Queue and execute ``stages`` in order (see the module docstring); returns every reply."""
    if not is_cluster(client):
        pipe = client.pipeline(transaction=True)
        for stage in stages:
            stage(pipe)
        return pipe.execute() if len(pipe) else []
    replies: list[Any] = []
    for stage in stages:
        pipe = client.pipeline(transaction=False)
        stage(pipe)
        if len(pipe):
            replies += pipe.execute()
    return replies


def publish_each(client: Any, channel: str, messages: Iterable[str]) -> None:
    """One PUBLISH per message, after the writes (Redis Cluster refuses PUBLISH in a pipeline)."""
    for message in messages:
        client.publish(channel, message)
