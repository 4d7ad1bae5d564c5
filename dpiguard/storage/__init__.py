"""Shared state in Redis: connections for every topology, every key name, the invalidation bus.

* :mod:`.clients` - ``redis.url`` parsed (standalone, Sentinel, Cluster, TLS, ACL) into clients;
* :mod:`.keys`    - every key and channel name dpiguard uses, with its hash tag (one place);
* :mod:`.bus`     - pub/sub invalidation of the in-process caches of every instance.

Imports nothing of dpiguard but this package.
"""

from dpiguard.storage.bus import InvalidationBus, format_event, parse_event
from dpiguard.storage.clients import RedisSpec, RedisURLError, as_text, client_for, spec_of
from dpiguard.storage.keys import Keys

__all__ = ["InvalidationBus", "format_event", "parse_event", "RedisSpec", "RedisURLError", "as_text", "client_for", "spec_of", "Keys"]
