"""The suite's port picker (tests/redis_server.free_port) never hands out one port twice.

A sentinel setup picks its five ports before any server binds one; the kernel's bind(0) had returned
one of them twice, and a data node then answered on a sentinel's port (CI, 2026-12-04)."""

import socket

from tests.redis_server import free_port


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(1024 < p < _ephemeral_start() for p in ports)
    with socket.socket() as s:  # a handed-out port is free to bind
        s.bind(("127.0.0.1", ports[-1]))

