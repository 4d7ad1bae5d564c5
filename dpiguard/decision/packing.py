"""Redis replies packed into one bytes object, for the facts kept in the decision cache.

A full decision cache holds about as many care-team facts (:class:`dpiguard.decision.access.AccessFacts`)
as decisions. Kept as Python containers (a tuple of (field, value) tuples per hash, one bytes object per
field and value), one set of facts took about 1,300 bytes: a ``bytes`` object costs 33 bytes before its
first byte, a tuple 40 to 56. Packed, the same replies take one object, a byte or two per item larger
than their content, and the collector never tracks it (1,310 → 720 bytes per cached set of facts, with
the cache's own structures, measured with tracemalloc on facts shaped like the release profile's).

The packing is exact: :func:`unpack` gives back what :func:`pack` was given, ``bytes`` as ``bytes``,
``str`` as ``str`` (a client may decode replies), ``None`` as ``None``, hashes as dicts in their order,
tuples as tuples. It is not a wire format: it lives only in one process's memory, so it has no version
and never sees untrusted input. Still, a buffer it cannot read (truncated, an unknown tag) raises
ValueError, and :meth:`~dpiguard.decision.access.AccessFacts.unpacked` checks the number of values.
"""

from __future__ import annotations

import struct
from typing import Any

_NONE, _BYTES, _STR, _HASH, _TUPLE = 0, 1, 2, 3, 4
# Each item starts with one byte: its tag in the top three bits, then its size (the length of bytes and
# str, the number of items of a hash or tuple): 0-29 in the low five bits themselves, 30: in the next byte,
# 31: in the next four bytes (little-endian). Most fields and values of the care-team hashes are shorter
# than 256 bytes, so they cost one or two bytes more than their content.
_INLINE, _ONE_BYTE, _FOUR_BYTES = 30, 30, 31
_READ_AT = struct.Struct("<d")


def _head(tag: int, n: int) -> bytes:
    if n < _INLINE:
        return bytes(((tag << 5) | n,))
    if n < 256:
        return bytes(((tag << 5) | _ONE_BYTE, n))
    return bytes(((tag << 5) | _FOUR_BYTES,)) + n.to_bytes(4, "little")


def _put_scalar(out: list, value: Any) -> None:
    if value is None:
        out.append(_head(_NONE, 0))
    elif type(value) is bytes:
        out.append(_head(_BYTES, len(value)))
        out.append(value)
    elif type(value) is str:
        data = value.encode("utf-8", "surrogatepass")
        out.append(_head(_STR, len(data)))
        out.append(data)
    else:
        raise TypeError(f"cannot pack a {type(value).__name__}")


def pack(read_at: float, values: tuple | list) -> bytes:
    """``read_at`` and ``values`` (each None, bytes, str, a dict of bytes/str to bytes/str, or a tuple of
    bytes/str/None) as one bytes."""
    out = [_READ_AT.pack(read_at)]
    for value in values:
        if type(value) is dict:
            out.append(_head(_HASH, len(value)))
            for field, item in value.items():
                _put_scalar(out, field)
                _put_scalar(out, item)
        elif type(value) is tuple:
            out.append(_head(_TUPLE, len(value)))
            for item in value:
                _put_scalar(out, item)
        else:
            _put_scalar(out, value)
    return b"".join(out)


def unpack(blob: bytes) -> tuple[float, list]:
    """The ``(read_at, values)`` given to :func:`pack`. Raises ValueError on a buffer it did not make."""
    if type(blob) is not bytes or len(blob) < _READ_AT.size:
        raise ValueError("packed replies: truncated")
    (read_at,) = _READ_AT.unpack_from(blob, 0)
    values: list = []
    i, end = _READ_AT.size, len(blob)
    while i < end:
        tag, n, i = _read_head(blob, i)
        if tag == _HASH:
            mapping = {}
            for _ in range(n):
                field, i = _scalar(blob, i)
                mapping[field], i = _scalar(blob, i)
            values.append(mapping)
        elif tag == _TUPLE:
            items = []
            for _ in range(n):
                item, i = _scalar(blob, i)
                items.append(item)
            values.append(tuple(items))
        else:
            value, i = _scalar_body(blob, i, tag, n)
            values.append(value)
    return read_at, values


def _read_head(blob: bytes, i: int) -> tuple[int, int, int]:
    if i >= len(blob):
        raise ValueError("packed replies: truncated")
    byte = blob[i]
    tag, n = byte >> 5, byte & 31
    if n < _INLINE:
        return tag, n, i + 1
    width = 1 if n == _ONE_BYTE else 4
    if i + 1 + width > len(blob):
        raise ValueError("packed replies: truncated")
    return tag, int.from_bytes(blob[i + 1:i + 1 + width], "little"), i + 1 + width


def _scalar(blob: bytes, i: int) -> tuple[Any, int]:
    tag, n, i = _read_head(blob, i)
    return _scalar_body(blob, i, tag, n)


def _scalar_body(blob: bytes, i: int, tag: int, n: int) -> tuple[Any, int]:
    if tag == _NONE:
        if n:
            raise ValueError("packed replies: malformed")
        return None, i
    j = i + n
    if j > len(blob):
        raise ValueError("packed replies: truncated")
    if tag == _BYTES:
        return blob[i:j], j
    if tag == _STR:
        return blob[i:j].decode("utf-8", "surrogatepass"), j
    raise ValueError(f"packed replies: unknown tag {tag}")
