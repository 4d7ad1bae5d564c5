"""dpiguard's own paging cursor for FHIR searches.

dpiguard pages filtered search results itself (docs/fhir.md, "Paging and counts"): the ``next`` and
``previous`` links it gives carry one parameter, ``_cursor``, an opaque token that says which search
(path and query as the client wrote them), which page (offset and size, counted in **visible**
matches) and for whom. It is signed (HMAC-SHA256 with a key derived from the data key of
``secrets.data_key_file``) and expires; anything else is refused, so no paging state of the DPI (offsets,
page tokens) ever comes from the client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DEFAULT_TTL = 8 * 3600
MAX_TOKEN = 6000


class CursorError(ValueError):
    """Not a cursor dpiguard issued to this user for this search, or expired."""


@dataclass(frozen=True, slots=True)
class Cursor:
    path: str
    query: str  # the client's raw query, without _count and _cursor
    offset: int
    size: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class CursorSigner:
    def __init__(self, secret: bytes, ttl: int = DEFAULT_TTL):
        if len(secret) < 32:
            raise ValueError("the cursor key needs at least 32 bytes")
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                         info=b"dpiguard fhir paging cursor v1").derive(secret)
        self.ttl = ttl

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:20]

    def issue(self, user: str, cursor: Cursor, now: float) -> str:
        payload = orjson.dumps({"u": user, "p": cursor.path, "q": cursor.query, "o": cursor.offset,
                                "c": cursor.size, "e": int(now) + self.ttl})
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def read(self, token: str, user: str, path: str, now: float) -> Cursor:
        if not isinstance(token, str) or len(token) > MAX_TOKEN or token.count(".") != 1:
            raise CursorError("malformed page link")
        body, _, mac = token.partition(".")
        try:
            payload, given = _unb64(body), _unb64(mac)
        except (ValueError, TypeError):
            raise CursorError("malformed page link") from None
        if not hmac.compare_digest(self._mac(payload), given):
            raise CursorError("this page link was not issued by dpiguard")
        data = orjson.loads(payload)
        if data.get("u") != user or data.get("p") != path:
            raise CursorError("this page link was issued for another user or search")
        if not isinstance(data.get("e"), int) or data["e"] < now:
            raise CursorError("this page link has expired: run the search again")
        offset, size, query = data.get("o"), data.get("c"), data.get("q")
        if not (isinstance(offset, int) and offset >= 0 and isinstance(size, int) and size > 0
                and isinstance(query, str)):
            raise CursorError("malformed page link")
        return Cursor(path, query, offset, size)
